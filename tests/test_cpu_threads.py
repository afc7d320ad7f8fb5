"""torch's CPU threads follow the cores other processes leave free (tdm.cpu_threads, train.threads = 0)."""

import subprocess
import sys
import time

import pytest
import torch

from tdm.cpu_threads import ThreadBudget, plan_threads, thread_budget


def test_plan_threads_takes_the_cores_left():
    assert plan_threads(2, 0.0, 2) == 2
    assert plan_threads(2, 0.67, 2) == 1  # one busy process beside 2 threads gets a fair 2/3 of a core
    assert plan_threads(2, 1.33, 2) == 1  # never below one thread
    assert plan_threads(8, 0.2, 4) == 4   # never above torch's default
    assert plan_threads(8, 3.0, 8) == 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_busy_process_takes_a_thread_away(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    busy = subprocess.Popen([sys.executable, "-u", "-c", "print('ready'); exec('while True: pass')"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().strip() == "ready"  # spinning before the budget's first sample
        torch.set_num_threads(2)
        budget = ThreadBudget(interval=0.5)
        budget.cores = 2  # as on a 2-core machine, whatever this one has
        assert budget.enabled and budget.max_threads == 2
        # A loaded machine may starve the busy process for one interval; it must take the thread within a few.
        a = torch.randn(256, 256)
        threads, end = 2, time.monotonic() + 6.0
        while threads != 1 and time.monotonic() < end:
            a = (a @ a).tanh()
            threads = budget.update()
        assert threads == 1 and torch.get_num_threads() == 1
    finally:
        busy.kill()
        busy.wait()
        torch.set_num_threads(before)


def test_an_explicit_thread_count_is_kept(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert thread_budget(1) is None and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert thread_budget(0) is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
