"""torch's CPU threads matched to the cores other processes leave free (train.threads = 0).

torch runs each op on all its threads and waits for the slowest. When another process competes for the cores,
one of them is often descheduled and the others wait for it: on 2 cores beside one busy process, 2 threads made
the digits demo's iteration 4.4x slower, where 1 thread runs at its own speed (benchmarks/shared_cpu.py). So
every `interval` seconds the budget reads how much CPU the other processes used (/proc/stat less this process's
own time) and sets the threads to the cores left, between 1 and torch's default. Linux only; elsewhere, or with
an explicit count (train.threads, OMP_NUM_THREADS), the threads stay as they are.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

PROC_STAT = Path("/proc/stat")


def _busy_seconds() -> float | None:
    """CPU time all processes have used since boot (user, nice, system, irq, softirq, steal), in seconds."""
    try:
        fields = PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def plan_threads(cores: int, others: float, max_threads: int) -> int:
    """Threads for the cores that `others` (cores the other processes kept busy) leave, rounded to the nearest,
    between 1 and `max_threads`."""
    return max(1, min(max_threads, int(cores - others + 0.5)))


class ThreadBudget:
    """Call `update()` once per iteration; it re-plans at most every `interval` seconds."""

    def __init__(self, interval: float = 2.0, max_threads: int | None = None):
        self.interval = interval
        self.max_threads = max_threads or torch.get_num_threads()
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._last = self._sample()
        self.enabled = self._last[1] is not None and self.max_threads > 1

    @staticmethod
    def _sample() -> tuple[float, float | None, float]:
        return time.monotonic(), _busy_seconds(), time.process_time()

    def update(self) -> int:
        """Re-plan if `interval` has passed; the thread count now in use."""
        if not self.enabled or time.monotonic() - self._last[0] < self.interval:
            return torch.get_num_threads()
        now = self._sample()
        wall, busy, own = (b - a for a, b in zip(self._last, now))
        self._last = now
        threads = plan_threads(self.cores, max(0.0, busy - own) / wall, self.max_threads)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads


def thread_budget(threads: int) -> ThreadBudget | None:
    """train.threads: > 0 fixes torch's CPU threads; 0 adapts them with a `ThreadBudget`, unless OMP_NUM_THREADS
    fixes them (torchrun sets it to 1 per rank)."""
    if threads > 0:
        torch.set_num_threads(threads)
        return None
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    budget = ThreadBudget()
    return budget if budget.enabled else None
