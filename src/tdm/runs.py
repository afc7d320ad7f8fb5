"""Opening a run: a run folder (its newest complete checkpoint) or a checkpoint folder, with the resolved config
and step its manifest records and its student rebuilt as the trainer built it. `tdm export` (a checkpoint) and
`tdm evaluate` (a run or a checkpoint) open them only through here; the files' names stay tdm.checkpoint's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from .checkpoint import CheckpointError, holds_weights, is_complete, latest_checkpoint, load_checkpoint, read_manifest
from .config import Config, from_dict
from .roles import STUDENT, STUDENT_EMA, Roles

if TYPE_CHECKING:
    from .backbones.base import Backbone


@dataclass(frozen=True)
class Run:
    checkpoint: Path  # the complete checkpoint folder opened
    config: Config    # its resolved config (plus any overrides given to open_run)
    step: int         # training iterations done
    has_ema: bool     # the run kept an EMA of the student (train.ema_decay > 0)

    @property
    def sampled_weights(self) -> str:
        """The weights `load_student()` loads by default: the EMA when kept (what the trainer samples)."""
        return STUDENT_EMA if self.has_ema else STUDENT

    def load_student(self, backbone: Backbone, ema: bool | None = None) -> nn.Module:
        """The student (ema=False) or its EMA (ema=True; None: the EMA when kept), frozen, rebuilt from the run's
        config on `backbone` (Roles.from_config) and loaded after checking hashes and, for LoRA, the base."""
        name = self.sampled_weights if ema is None else (STUDENT_EMA if ema else STUDENT)
        roles = Roles.from_config(self.config, backbone, to_load=True)
        student = roles.student_ema() if name == STUDENT_EMA and roles.shared is not None else roles.student
        load_checkpoint(self.checkpoint, {name: student}, {}, roles.base_fingerprint)
        return student.eval().requires_grad_(False)


def open_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> Run:
    """A complete checkpoint folder; `overrides` (`group.key=value`) change its saved config, e.g. where the
    teacher now lives."""
    manifest = read_manifest(Path(path))
    return Run(Path(path), from_dict(manifest["config"], overrides), manifest["step"],
               holds_weights(manifest, STUDENT_EMA))


def open_run(path: str | Path) -> Run:
    """A checkpoint folder itself, or the newest complete checkpoint of a run folder (`<run>/checkpoints`)."""
    path = Path(path)
    checkpoint = path if is_complete(path) else latest_checkpoint(path / "checkpoints")
    if checkpoint is None:
        raise CheckpointError(f"{path} is neither a complete tdm checkpoint nor a run folder with one under "
                              f"{path / 'checkpoints'}")
    return open_checkpoint(checkpoint)
