"""Which checkpoint a run resumes from, and what happens to damaged ones.

`--resume auto` takes the newest checkpoint that loads. Damaged ones (no complete manifest, or a file whose hash
differs from it) are never deleted or written over: once a run goes on without them they move to
`checkpoints/damaged/`. Where step folders exist but none loads, the run stops instead of silently starting
from scratch; --start-fresh moves them aside and starts from scratch on purpose.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .checkpoint import STATE_FILE, CheckpointCorrupted, complete_checkpoints, move_aside, read_manifest
from .config import Config
from .config_change import check_config_change
from .errors import TDMError

T = TypeVar("T")
INCOMPLETE = f"no complete {STATE_FILE}"


class ResumeError(TDMError):
    """--resume cannot continue the run as asked."""


def _incomplete(root: Path) -> list[Path]:
    complete = set(complete_checkpoints(root))
    return sorted(p for p in root.glob("step_*") if p.is_dir() and p not in complete)


def no_usable_checkpoint(root: Path, damaged: list[tuple[Path, str]]) -> ResumeError:
    listing = "; ".join(f"{path.name}: {why}" for path, why in damaged)
    return ResumeError(f"--resume auto: no usable checkpoint in {root} ({listing}); they are left untouched; "
                       f"pass --start-fresh to move them to {root / 'damaged'} and train from scratch")


def check_resume(out: Path, where: str | None, config: Config, allow_config_change: bool,
                 start_fresh: bool) -> Path | None:
    """Checks of --resume that need no model (run them before building one): the flags fit, a checkpoint to
    resume exists where step folders exist, and its config matches this run's. Returns the checkpoint expected
    to load (None: start from scratch)."""
    if start_fresh and where != "auto":
        raise ResumeError("--start-fresh applies only with --resume auto")
    if allow_config_change and where is None:
        raise ResumeError("--allow-config-change applies only with --resume")
    if where is None:
        return None
    if where == "auto":
        root = out / "checkpoints"
        complete = complete_checkpoints(root)
        if not complete:
            incomplete = _incomplete(root)
            if incomplete and not start_fresh:
                raise no_usable_checkpoint(root, [(p, INCOMPLETE) for p in incomplete])
            return None
        path = complete[-1]
    else:
        path = Path(where)
    check_config_change(path, read_manifest(path)["config"], config, allow_config_change)
    return path


def check_loaded(path: Path | None, expected: Path | None, config: Config, allow_config_change: bool) -> None:
    """Where --resume auto fell back past a damaged checkpoint to an older one, check that one's config too."""
    if path is not None and path != expected:
        check_config_change(path, read_manifest(path)["config"], config, allow_config_change)


def load_newest(root: Path, load: Callable[[Path], T]) -> tuple[Path | None, T | None, list[tuple[Path, str]]]:
    """`load` the newest complete checkpoint under root whose hashes match, newest first. Returns its path,
    what `load` returned (None, None if none loaded) and every damaged checkpoint seen with the reason."""
    damaged = [(p, INCOMPLETE) for p in _incomplete(root)]
    for path in reversed(complete_checkpoints(root)):
        try:
            return path, load(path), damaged
        except CheckpointCorrupted as err:
            damaged.append((path, str(err)))
    return None, None, damaged


def set_aside(damaged: list[tuple[Path, str]]) -> None:
    """Move damaged checkpoints out of the way of new ones with the same step, saying where they went."""
    for path, why in damaged:
        print(f"tdm: warning: skipping {path}: {why}; moved it to {move_aside(path)}", file=sys.stderr)
