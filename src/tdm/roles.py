"""The three roles of TDM: a frozen teacher, a trainable student and a trainable fake score."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn


@dataclass
class Roles:
    teacher: nn.Module     # frozen by construction: eval mode, no parameter requires grad
    student: nn.Module     # the few-step generator G
    fake_score: nn.Module  # tracks the student's diffused distribution (F)

    @classmethod
    def separate_copies(cls, teacher: nn.Module, initial: nn.Module) -> Roles:
        """Full fine-tuning: student and fake score are independent copies of `initial`."""
        teacher = teacher.eval().requires_grad_(False)
        student = copy.deepcopy(initial).train().requires_grad_(True)
        fake_score = copy.deepcopy(initial).train().requires_grad_(True)
        return cls(teacher, student, fake_score)
