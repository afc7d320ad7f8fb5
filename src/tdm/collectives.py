"""Decisions every process of a sharded run takes together: a network sharded with FSDP runs a collective in each
call, so a data-dependent call must be made on every process or on none."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` or a submodule is sharded across processes by FSDP2's `fully_shard` (its weights are
    DTensors outside its forward, plain gathered tensors inside)."""
    return torch.distributed.is_initialized() and any(isinstance(m, FSDPModule) for m in module.modules())


def all_ranks_true(flag: torch.Tensor) -> bool:
    """Whether `flag` (a boolean scalar) is true on every rank."""
    return _reduced(flag, torch.distributed.ReduceOp.MIN)


def any_rank(mask: torch.Tensor) -> bool:
    """Whether `mask` has a true entry on any rank (a loop over data-dependent calls goes on while one has)."""
    return _reduced(mask.any(), torch.distributed.ReduceOp.MAX)


def _reduced(flag: torch.Tensor, op: torch.distributed.ReduceOp) -> bool:
    """A boolean scalar reduced over all ranks with `op` (MIN: all of them, MAX: any)."""
    flag = flag.float().reshape(1)
    torch.distributed.all_reduce(flag, op=op)
    return bool(flag.item() > 0)
