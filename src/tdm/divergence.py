"""When a run began to diverge, so that an abort names a checkpoint from before it.

Two signs start a divergence: a skipped (non-finite) update, and a jump: an optimiser step after which a role's
trainable weights have more than JUMP_FACTOR times the norm they had before it, or a non-finite norm. A jump
catches weights that are finite but blown up: at generator lr 1e30 one AdamW step moves every weight by ~1e30
and only the next iteration's loss is non-finite, so the checkpoint written in between holds ruined weights.
The norm of a healthy role's weights changes by far less per step (see JUMP_FACTOR). A divergence ends after
`recovery` healthy iterations in a row (no skipped update, no jump). Good checkpoints are those with a step up to
the iteration where the divergence began: they were written before it (a checkpoint of step s holds the weights
that iteration s starts from). Where the run stands (`DivergenceRecord`) is part of its checkpointed TrainState.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.nn.utils import get_total_norm
from tqdm.auto import tqdm

from .checkpoint import complete_checkpoints

# Largest growth of a role's weight norm in one update, measured on healthy runs: the first 300 iterations of the
# digits demo 1.000017 (student), 1.000027 (fake score); 400 of toy-gmm 1.000014, 1.00018. Doubling in one
# update is never healthy.
JUMP_FACTOR = 2.0


@dataclass
class DivergenceRecord:
    """Where the run stands, checkpointed with its TrainState: the iteration at which the current divergence
    began (None: healthy) and the healthy iterations in a row since the last sign of one."""

    began: int | None = None
    healthy_in_a_row: int = 0

    def began_by(self, step: int) -> int:
        """Where the divergence began, seen from iteration `step` failing now: that iteration if none was recorded."""
        return step if self.began is None else self.began

    def last_good_checkpoint(self, root: Path, step: int) -> Path | None:
        """The newest complete checkpoint written before the divergence began (`began_by(step)`)."""
        good = [p for p in complete_checkpoints(root) if int(p.name.removeprefix("step_")) <= self.began_by(step)]
        return good[-1] if good else None


def _norm(params: list[torch.Tensor]) -> torch.Tensor:
    norm = get_total_norm(params)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP: over every rank's shard


class DivergenceWatch:
    def __init__(self, recovery: int, verbose: bool = True):
        """`recovery`: healthy iterations in a row that end a divergence; `verbose`: print jump warnings."""
        self.recovery, self.verbose = recovery, verbose
        self._unhealthy = False  # a jump or a skipped update in the current iteration

    @contextmanager
    def watch(self, role: str, optimizer: torch.optim.Optimizer, step: int):
        """Around `optimizer.step()` of iteration `step`: compare the norm of its weights before and after."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        before = _norm(params)  # stays on the device: one sync per step, for the comparison below
        yield
        after = _norm(params)
        if not bool(~torch.isfinite(after) | ((after > JUMP_FACTOR * before) & (before > 0))):
            return
        self._unhealthy = True
        if self.verbose:
            tqdm.write(f"tdm: warning: the {role}'s weight norm jumped from {float(before):.4g} to {float(after):.4g} "
                       f"in the update of iteration {step}: checkpoints from here on are not counted as good",
                       file=sys.stderr)

    def skipped(self) -> None:
        """A (non-finite) update of the current iteration was skipped."""
        self._unhealthy = True

    def end_iteration(self, record: DivergenceRecord, step: int) -> None:
        """After iteration `step`: a jump or a skipped update in it begins a divergence (or continues one);
        `recovery` healthy iterations in a row end it."""
        if self._unhealthy:
            record.began = step if record.began is None else record.began
            record.healthy_in_a_row = 0
        else:
            record.healthy_in_a_row += 1
            if record.healthy_in_a_row >= self.recovery:
                record.began = None
        self._unhealthy = False
