"""Graceful stops: a stop signal (SIGTERM, SIGINT, SLURM's SIGUSR1, ...) ends training after the current
iteration with a checkpoint, instead of killing it mid-step."""

from __future__ import annotations

import signal
from types import FrameType


class StopSignals:
    """Context manager that records the first of `names` received; `received` is its name or None."""

    def __init__(self, names: tuple[str, ...]):
        self.signals = [getattr(signal, n) for n in names]
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
