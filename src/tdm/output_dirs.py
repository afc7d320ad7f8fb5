"""Output folders: checked before any heavy work, and never a folder of someone else's files.

Every command that writes checks its --out first (`check_output_dir`): an existing folder or one that can be
created, in which a file can really be written (a temporary file is created and removed: permission bits do not
stop root, a read-only file system does). Run folders (distill, demo, evaluate) must besides be absent, empty or
tdm's own (`check_run_dir`): a folder holding the marker `.tdm-run.json` that tdm writes when it first writes
there (`claim_run_dir`), or a run of a tdm from before the marker (its `checkpoints/step_*` folders). tdm never
writes into a folder of files it did not write. Names starting with `.tdm` are tdm's own (marker, run lock).
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .errors import TDMError
from .files import write_text_atomic

MARKER = ".tdm-run.json"


class OutputDirError(TDMError, ValueError):
    """An output path that cannot be used; the message names the option and the path."""


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (an absolute path's root always does)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Raise unless `path` is a writable folder or can be created as one; creates nothing."""
    path = existing = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise OutputDirError(f"{flag} {path} is a file (expected a folder, new or existing)")
        existing = _nearest_existing(path)
        if not existing.is_dir():
            raise OutputDirError(f"{flag} {path}: cannot create a folder under the file {existing}")
        fd, probe = tempfile.mkstemp(prefix=".tdm-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputDirError(f"{flag} {path}: cannot write in {existing} ({err.strerror or err})") from None
    return path


def is_tdm_run(path: Path) -> bool:
    """Whether the folder is tdm's: it holds the marker, or checkpoints of a run from before the marker."""
    return (path / MARKER).is_file() or any(p.is_dir() for p in path.glob("checkpoints/step_*"))


def check_run_dir(path: str | Path, flag: str = "--out") -> Path:
    """`check_output_dir`, and refuse a non-empty folder that is not a tdm run: tdm would write over its files."""
    path = check_output_dir(path, flag)
    if path.is_dir() and not is_tdm_run(path):
        foreign = sorted(p.name for p in path.iterdir() if not p.name.startswith(".tdm"))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputDirError(f"{flag} {path} is not empty ({shown}) and is not a tdm run folder (no {MARKER}); "
                                 f"tdm writes only into new, empty or its own folders: pass another --out")
    return path


def claim_run_dir(path: str | Path, command: str) -> None:
    """Create the run folder if needed and mark it as tdm's (once: a resumed run keeps its first marker)."""
    from . import __version__

    marker = Path(path) / MARKER
    if not marker.is_file():
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_text_atomic(marker, json.dumps({"tdm_version": __version__, "command": command, "created": created},
                                             indent=2) + "\n")
