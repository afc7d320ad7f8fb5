"""Each role's optimiser (optim.optimizer) and learning-rate schedule (optim.lr_scheduler).

Schedules come from `diffusers.optimization.get_scheduler`, as in diffusers' training scripts. One schedule shape
serves both roles, each scaled to its own lr; optim.warmup_steps warms up the generator only (the fake score must
track the student from the first iteration). Both schedules step once per iteration, after the updates, whether or
not an update was skipped: the lr of iteration n is a function of n alone (diffusers' convention: warm-up starts
at lr 0), so a resumed run replays it exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import OptimConfig
from .optional import require

GENERATOR, FAKE_SCORE = "generator", "fake_score"


def check_optimizer_packages(optim: OptimConfig) -> None:
    """Import what optim.optimizer and optim.lr_scheduler need (before any model loads): a missing package is a
    one-line error with its install line."""
    if optim.optimizer == "adamw8bit":
        require("bitsandbytes", "optim.optimizer=adamw8bit")
    if optim.lr_scheduler != "constant" or optim.warmup_steps:
        require("diffusers.optimization", f"optim.lr_scheduler={optim.lr_scheduler} with optim.warmup_steps="
                f"{optim.warmup_steps}", install="diffusers")


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, optim: OptimConfig,
                    grad_scaler: bool = False) -> torch.optim.Optimizer:
    """optim.optimizer over `params`: torch's AdamW, or bitsandbytes' 8-bit AdamW (same betas and weight decay).

    torch's AdamW takes its fused kernel where torch has one for every parameter's device: one kernel per step
    instead of a loop over the parameters (digits: 0.8 vs 2.2 ms per step on one CPU thread; README
    "Performance"); the same update to float rounding. Not under fp16's `grad_scaler`: accelerate tells a skipped
    step by the optimiser's step not being called, and the scaler calls a fused step always (it skips inside)."""
    kwargs = {"lr": lr, "betas": optim.betas, "weight_decay": optim.weight_decay}
    if optim.optimizer == "adamw8bit":
        bnb = require("bitsandbytes", "optim.optimizer=adamw8bit")
        return bnb.optim.AdamW8bit(params, **kwargs)
    params = list(params)
    return torch.optim.AdamW(params, **kwargs, fused=(not grad_scaler and has_fused_kernel(params)) or None)


def has_fused_kernel(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter: floating point, on a device it supports (CUDA
    since torch 2.0, the CPU and others since 2.4)."""
    since_2_4 = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    devices = {"cuda", "cpu", "xpu", "mps", "hpu"} if since_2_4 else {"cuda"}
    return all(p.is_floating_point() and p.device.type in devices for p in params)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, role: str,
                       num_training_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """`role`'s schedule over `num_training_steps` iterations, or None where the lr is constant and diffusers is
    not installed (the toy teachers need no diffusers)."""
    warmup = optim.warmup_steps if role == GENERATOR else 0
    name = "constant_with_warmup" if optim.lr_scheduler == "constant" and warmup else optim.lr_scheduler
    try:
        optimization = require("diffusers.optimization", f"optim.lr_scheduler={name}", install="diffusers")
    except ImportError:
        if name == "constant":
            return None
        raise
    return optimization.get_scheduler(name, optimizer, num_warmup_steps=warmup,
                                      num_training_steps=num_training_steps, num_cycles=optim.lr_num_cycles,
                                      power=optim.lr_power)

