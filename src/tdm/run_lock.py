"""One run per folder: `<out>/.tdm.lock`, an exclusive fcntl.flock held for the run's life.

Only the launch's rank 0 takes it (RANK is unset for a plain `python` run): the ranks of one multi-process run
share the folder and must not block each other. The kernel drops the lock when its holder dies, so a killed
run never leaves a folder locked; the file itself is removed on a normal exit.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import TDMError

LOCK_FILE = ".tdm.lock"


class RunFolderInUse(TDMError):
    """Another tdm run holds the folder's lock."""


class RunLock:
    def __init__(self, out: str | Path):
        self.out, self.path = Path(out), Path(out) / LOCK_FILE
        self._fd: int | None = None
        self._created_folder = False

    def __enter__(self) -> RunLock:
        if os.environ.get("RANK", "0") != "0":
            return self
        self._created_folder = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._fd = self._acquire()
        except OSError as err:
            raise TDMError(f"--out {self.out}: cannot create {LOCK_FILE}: {err.strerror or err}") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        return self

    def _acquire(self) -> int:
        """Lock the file now at self.path (a holder that exits removes it: retry if it was replaced meanwhile)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunFolderInUse(f"--out {self.out} is in use by another tdm run (pid {holder}, which holds "
                                     f"{self.path}); wait for it to end or choose another --out") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # still locked: a waiting run retries on the new file
        os.close(self._fd)
        self._fd = None
        if self._created_folder and not any(self.out.iterdir()):
            self.out.rmdir()  # nothing was written (e.g. the run failed before training)
