"""Training diagnostics: per-step-index losses and warnings when a run drifts or collapses.

A distillation run can look fine in its loss curves while the student collapses (its samples lose their
spread) or drifts (their mean or scale walks away from the teacher's). At every evaluation (train.eval_every)
the trainer compares the student's K-step samples with the teacher's samples on the same conditions
(`sample_statistics`); `Diagnostics` checks them against fixed thresholds and warns once a condition has held
at `PATIENCE` evaluations in a row, and again only after it has cleared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

COLLAPSE_STD_RATIO = 0.5  # student sample std below half the teacher's: modes are being dropped
DRIFT_STD_RATIO = 2.0     # ... above twice the teacher's: the student is blowing up
DRIFT_MEAN = 0.5          # |mean difference| above half a teacher std: a global colour or brightness shift
SATURATION = 0.05         # over 5% of student sample elements outside the range of the teacher's samples
PATIENCE = 2              # consecutive evaluations before a warning


def sample_statistics(student: Tensor, teacher: Tensor) -> dict[str, float]:
    """Means, stds and saturation (fraction of student elements outside [min, max] of the teacher's samples)."""
    student, teacher = student.float(), teacher.float()
    outside = (student < teacher.min()) | (student > teacher.max())
    return {"eval/student_mean": float(student.mean()), "eval/student_std": float(student.std()),
            "eval/teacher_mean": float(teacher.mean()), "eval/teacher_std": float(teacher.std()),
            "eval/saturation": float(outside.float().mean())}


def per_step_losses(loss: Tensor, k: Tensor, prefix: str) -> dict[str, Tensor]:
    """Mean per-sample loss for each student step index k present in the batch: `<prefix>/loss_k<k>`."""
    return {f"{prefix}/loss_k{int(j)}": loss[k == j].detach().mean() for j in torch.unique(k)}


def _conditions(logs: dict[str, float]) -> dict[str, str | None]:
    """Each condition's message if it holds in these logs, else None (missing statistics: never holds)."""
    if "eval/student_std" not in logs:
        return {}
    s_std, t_std = logs["eval/student_std"], max(logs["eval/teacher_std"], 1e-12)
    ratio, shift = s_std / t_std, abs(logs["eval/student_mean"] - logs["eval/teacher_mean"]) / t_std
    return {
        "collapse": (f"student sample std is {ratio:.2f} x the teacher's (< {COLLAPSE_STD_RATIO}): the student "
                     f"may be collapsing") if ratio < COLLAPSE_STD_RATIO else None,
        "scale drift": (f"student sample std is {ratio:.2f} x the teacher's (> {DRIFT_STD_RATIO})"
                        if ratio > DRIFT_STD_RATIO else None),
        "mean drift": (f"student sample mean is {shift:.2f} teacher stds from the teacher's (> {DRIFT_MEAN})"
                       if shift > DRIFT_MEAN else None),
        "saturation": (f"{100 * logs['eval/saturation']:.1f}% of student sample elements lie outside the range of "
                       f"the teacher's samples (> {100 * SATURATION:.0f}%)"
                       if logs["eval/saturation"] > SATURATION else None),
    }


@dataclass
class Diagnostics:
    streaks: dict[str, int] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)       # conditions warned about and not yet cleared
    warnings: list[dict] = field(default_factory=list)  # every warning given: {"step", "condition", "message"}

    def update(self, step: int, logs: dict[str, float]) -> list[str]:
        """Feed one logged iteration (only evaluations carry the statistics); returns the warnings to give now."""
        new = []
        for condition, message in _conditions(logs).items():
            self.streaks[condition] = self.streaks.get(condition, 0) + 1 if message else 0
            if message is None:
                self.warned.discard(condition)
            elif self.streaks[condition] >= PATIENCE and condition not in self.warned:
                self.warned.add(condition)
                self.warnings.append({"step": step, "condition": condition, "message": message})
                new.append(f"iteration {step}: {condition}: {message}")
        return new
