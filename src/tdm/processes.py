"""The processes of a multi-process launch (`accelerate launch`, `torchrun`) that share out a set of samples.

Each process computes whole batches of the set, strided (process p of P takes batches p, p + P, ...); every
sample's noise, seed and condition depend only on its index in the set, so the split changes no sample. The main
process gathers the pieces in index order and alone scores and writes; the others return None. One process (a
plain `python` start) is `ONE_PROCESS`: it computes every batch and gathers nothing.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .launch import check_process_count


@dataclass(frozen=True)
class Processes:
    index: int = 0
    count: int = 1
    local_index: int = 0
    group: Any = None  # a gloo process group: the pieces are CPU objects, whatever backend the launch uses

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def device(self, device: str) -> str:
        """`cuda` without an index means this process's own GPU when several processes share a machine."""
        if self.count > 1 and device == "cuda":
            return f"cuda:{self.local_index}"
        return device

    def batch_starts(self, num_items: int, batch_size: int) -> range:
        """The first index of each batch this process computes."""
        return range(self.index * batch_size, num_items, self.count * batch_size)

    def barrier(self) -> None:
        """Wait for every process (so that a timing starts together)."""
        if self.count > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def finish(self) -> None:
        """Wait for every process (the others for the main one to write), then leave the process group, so that
        no process exits while another still talks to it. Last, once per launch."""
        if self.count > 1:
            import torch.distributed as dist

            gc.collect()  # networks freed before the group goes: a rank exiting with them can abort (SIGABRT)
            dist.barrier(group=self.group)
            dist.destroy_process_group()

    def gather(self, pieces: Iterable[tuple[int, Any]]) -> list | None:
        """Every process's (index, item) pieces on the main process, as items in index order; None elsewhere.
        A collective: every process calls it the same number of times."""
        pieces = list(pieces)
        if self.count == 1:
            return [item for _, item in sorted(pieces, key=lambda p: p[0])]
        import torch.distributed as dist

        received = [None] * self.count if self.is_main else None
        dist.gather_object(pieces, received, dst=0, group=self.group)
        if not self.is_main:
            return None
        return [item for _, item in sorted((p for part in received for p in part), key=lambda p: p[0])]


ONE_PROCESS = Processes()


@functools.cache
def launched_processes() -> Processes:
    """The launch's processes: joins the process group (gloo on CPU-only machines, as training) when started
    with more than one, else `ONE_PROCESS`. An `accelerate launch` that started fewer processes than it asked
    for is an error (tdm.launch)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        check_process_count(1)
        return ONE_PROCESS
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    check_process_count(state.num_processes)
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Processes(state.process_index, state.num_processes, state.local_process_index, group)
