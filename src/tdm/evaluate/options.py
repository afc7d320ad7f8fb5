"""The options of `tdm evaluate`: the shared evaluation settings (tdm.config.EvalConfig, also the end-of-run
report's `eval` group) plus the command's own. Its flags are derived from these fields (tdm.flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import EvalConfig, setting
from ..errors import TDMError

FEATURE_CHOICES = ("auto", "inception", "clip", "digits-classifier", "none")


@dataclass(frozen=True)
class EvaluateOptions(EvalConfig):
    batch_size: int = setting(250, "samples per sampling call (timed)")
    features: str = setting("auto", "feature network of FD / KID (auto: digits classifier for digits, else "
                                    "Inception if found, else CLIP with --clip-model)", choices=FEATURE_CHOICES)
    inception: str | None = setting(None, "inception-2015-12-05.pt (else $TDM_INCEPTION, ~/.cache/tdm/, "
                                          "$TORCH_HOME/hub/checkpoints/; never downloaded)", metavar="PATH")
    reference_dir: str | None = setting(None, "folder of reference images for fd_reference, kid_reference",
                                        metavar="DIR")
    clip_model: str | None = setting(None, "transformers CLIP model (hub id or folder) for clip_score",
                                     metavar="ID_OR_DIR")
    preference: tuple[str, ...] = setting((), "hpsv2, imagereward, pickscore (each needs its package or model "
                                              "installed)", metavar="NAME[=MODEL]")
    latency_repeats: int = setting(10, "single-sample runs timed per sampler (0: skip)")
    grid_columns: int = setting(20, "conditions per sampler in samples.png")
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu",
                        metadata={"help": "default: cuda if available, else cpu"})

    def __post_init__(self):  # the flags' names; replaces EvalConfig's checks, which name the eval.* keys
        if not self.teacher_steps or min(self.teacher_steps) < 1 or min(self.student_steps, default=1) < 1:
            raise TDMError("--teacher-steps needs at least one value; all step counts must be >= 1")
        if self.num_samples < 2 or self.batch_size < 1 or self.grid_columns < 1 or self.latency_repeats < 0:
            raise TDMError(f"--num-samples must be >= 2, --batch-size and --grid-columns >= 1, --latency-repeats "
                           f">= 0; got {self.num_samples}, {self.batch_size}, {self.grid_columns}, "
                           f"{self.latency_repeats}")
        if self.features not in FEATURE_CHOICES:
            raise TDMError(f"--features must be one of {FEATURE_CHOICES}, got {self.features!r}")
