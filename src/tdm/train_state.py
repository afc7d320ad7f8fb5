"""A run's progress, written into every checkpoint's manifest (key "trainer") and restored on resume.

The step, per role the fault counters (the streak of non-finite updates that train.max_nonfinite bounds, all
skipped updates, fp16 overflows) and the last finite loss, where a divergence stands, and the length of the
learning-rate schedules (fixed at the run's first start; their position is the step). A resumed run goes on
from exactly this state: a fault streak in progress when the run stopped keeps counting, and an abort names the
same last finite loss and last good checkpoint as the uninterrupted run would. The checkpoint bookkeeping (which
checkpoint holds the current step) is kept here too, but not saved: it is where the state was loaded from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .divergence import DivergenceRecord

ROLES = ("fake_score", "student")  # the trainable roles, in the order an iteration updates them
COUNTERS = ("nonfinite_in_a_row", "skipped", "overflows", "last_finite_loss")  # the per-role entries


def _per_role(value):
    return field(default_factory=lambda: dict.fromkeys(ROLES, value))


@dataclass
class TrainState:
    step: int = 0                                                  # iterations done: the index of the next one
    nonfinite_in_a_row: dict[str, int] = _per_role(0)              # the current streak of skipped updates
    skipped: dict[str, int] = _per_role(0)                         # skipped (non-finite) updates in the run
    overflows: dict[str, int] = _per_role(0)                       # fp16: updates the grad scaler skipped
    last_finite_loss: dict[str, float | None] = _per_role(None)    # the latest finite loss (mean over the batch)
    divergence: DivergenceRecord = field(default_factory=DivergenceRecord)
    lr_schedule_steps: int | None = None  # the lr schedules' length: train.iterations at the run's first start
    checkpoint_path: Path | None = None   # the newest checkpoint written or loaded (rank 0 knows the path)
    checkpointed_step: int | None = None  # the step it holds, on every rank

    def track(self, roles) -> TrainState:
        """Add fault counters for trainable roles beyond distillation's two (e.g. reward_model)."""
        for name in COUNTERS:
            counters = getattr(self, name)
            for role in roles:
                counters.setdefault(role, None if name == "last_finite_loss" else 0)
        return self

    def manifest_entry(self) -> dict:
        """What a checkpoint records of this state (JSON); its step has a key of its own in the manifest."""
        return {**{name: dict(getattr(self, name)) for name in COUNTERS}, "divergence": asdict(self.divergence),
                "lr_schedule_steps": self.lr_schedule_steps}

    @classmethod
    def resumed(cls, path: Path, step: int, entry: dict | None) -> TrainState:
        """The state checkpoint `path` of `step` holds, whose manifest recorded `entry`. Checkpoints written
        before the counters were saved hold only the divergence record, or nothing: the rest starts afresh."""
        entry = entry or {}
        state = cls(step=step, checkpoint_path=path, checkpointed_step=step,
                    **{name: {**getattr(cls(), name), **entry[name]} for name in COUNTERS if name in entry})
        if "divergence" in entry:
            state.divergence = DivergenceRecord(**entry["divergence"])
        state.lr_schedule_steps = entry.get("lr_schedule_steps")
        return state
