"""The options of `tdm evaluate` (kept light: the command line reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import TDMError

FEATURE_CHOICES = ("auto", "inception", "digits-classifier", "none")


@dataclass(frozen=True)
class EvaluateOptions:
    teacher_steps: tuple[int, ...] = (50, 4)        # the first is the reference of fd_* / kid_*
    student_steps: tuple[int, ...] = (1, 2, 4, 8)
    num_samples: int = 1000                         # per sampler, balanced over the evaluation conditions
    seed: int = 1234                                # noise seed of every row; the reference teacher uses seed + 1
    batch_size: int = 250
    features: str = "auto"                          # auto | inception | digits-classifier | none
    inception: str | None = None                    # path of inception-2015-12-05.pt (else $TDM_INCEPTION, caches)
    reference_dir: str | None = None                # folder of reference images: fd_reference, kid_reference
    clip_model: str | None = None                   # transformers CLIP hub id or folder: clip_score
    preference: tuple[str, ...] = ()                # hpsv2 | imagereward | pickscore, each optionally =MODEL
    latency_repeats: int = 10                       # single-sample generations timed per sampler (0 = skip)
    grid_columns: int = 20
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")

    def __post_init__(self):
        if not self.teacher_steps or min(self.teacher_steps) < 1 or min(self.student_steps, default=1) < 1:
            raise TDMError("--teacher-steps needs at least one value; all step counts must be >= 1")
        if self.num_samples < 2 or self.batch_size < 1 or self.grid_columns < 1 or self.latency_repeats < 0:
            raise TDMError(f"--num-samples must be >= 2, --batch-size and --grid-columns >= 1, --latency-repeats "
                           f">= 0; got {self.num_samples}, {self.batch_size}, {self.grid_columns}, "
                           f"{self.latency_repeats}")
        if self.features not in FEATURE_CHOICES:
            raise TDMError(f"--features must be one of {FEATURE_CHOICES}, got {self.features!r}")
