"""Preemption by signal, exact resume after it, non-finite updates, checkpoint rotation."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tdm.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from tdm.cli import main

SMALL = ["train.batch_size=8", "train.log_every=1", "train.eval_every=0", "train.ema_decay=0.9",
         "optim.generator_lr=1e-4", "optim.fake_lr=5e-4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cmd(out, *overrides, resume=False):
    cmd = [sys.executable, "-m", "tdm.cli", "distill", "--config", "digits-demo", "--out", str(out), "--no-report"]
    cmd += [a for s in (*SMALL, *overrides) for a in ("--set", s)]
    return cmd + (["--resume", "auto"] if resume else [])


def _weights(run):
    path = latest_checkpoint(run / "checkpoints")
    return {f"{p.name}/{k}": v for p in sorted(path.glob("*.safetensors")) if p.name != "rng.safetensors"
            for k, v in load_file(p).items()}


def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path):
    run = tmp_path / "interrupted"
    proc = subprocess.Popen(_cmd(run, "train.iterations=100000"), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((run / "tensorboard").glob("events.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # inside the training loop
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out and "--resume auto" in out
    stopped_at = int(latest_checkpoint(run / "checkpoints").name.split("_")[1])
    assert 0 < stopped_at < 100000
    total = stopped_at + 3
    resumed = subprocess.run(_cmd(run, f"train.iterations={total}", resume=True), env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = subprocess.run(_cmd(tmp_path / "straight", f"train.iterations={total}"), env=ENV,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = _weights(run), _weights(tmp_path / "straight")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_updates_are_skipped_then_the_run_aborts(tmp_path, capsys):
    code = main(["distill", "--config", "digits-demo", "--out", str(tmp_path), "--no-report",
                 *[a for s in (*SMALL, "optim.generator_lr=1e30", "train.iterations=50", "train.checkpoint_every=1",
                               "train.max_nonfinite=3") for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 3
    assert "non-finite" in err and "update skipped" in err
    assert "training aborted:" in err and "3 non-finite updates in a row" in err and "last good checkpoint" in err
    assert latest_checkpoint(tmp_path / "checkpoints") is not None


def _torchrun(out, *overrides, resume=False):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--nproc_per_node", "2", *_cmd(out, *overrides, resume=resume)[1:]]


def test_two_processes_stop_together_and_resume_exactly(tmp_path):
    """SIGUSR1 to one rank only: both ranks stop at the same iteration, rank 0 checkpoints, and the resumed
    2-process run ends with the weights of an uninterrupted 2-process run."""
    run = tmp_path / "ddp"
    proc = subprocess.Popen(_torchrun(run, "train.iterations=100000"), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: list((run / "tensorboard").glob("events.*")))
    time.sleep(2.0)
    workers = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()  # the two ranks
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by" in out
    stopped_at = int(latest_checkpoint(run / "checkpoints").name.split("_")[1])
    total = stopped_at + 2
    resumed = subprocess.run(_torchrun(run, f"train.iterations={total}", resume=True), env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run(_torchrun(tmp_path / "straight", f"train.iterations={total}"), env=ENV,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = _weights(run), _weights(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    code = main(["distill", "--config", "digits-demo", "--out", str(tmp_path), "--no-report",
                 *[a for s in (*SMALL, "train.iterations=6", "train.checkpoint_every=1", "train.keep_checkpoints=2")
                   for a in ("--set", s)]])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000005", "step_0000006"]


def test_resume_auto_skips_a_corrupted_checkpoint(tmp_path, capsys):
    args = [a for s in (*SMALL, "train.iterations=4", "train.checkpoint_every=2") for a in ("--set", s)]
    assert main(["distill", "--config", "digits-demo", "--out", str(tmp_path), "--no-report", *args]) == 0
    newest = latest_checkpoint(tmp_path / "checkpoints")
    data = bytearray((newest / "fake_score.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "fake_score.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["distill", "--config", "digits-demo", "--out", str(tmp_path), "--no-report", *args,
                 "--resume", "auto"]) == 0
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "is corrupted" in captured.err
    assert "resuming from" in captured.out and "step_0000002" in captured.out
    moved = tmp_path / "checkpoints" / "damaged" / newest.name / "fake_score.safetensors"
    assert moved.read_bytes() == bytes(data), "the damaged checkpoint is moved aside, not written over"


def _wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def _straight(tmp_path, total):
    run = tmp_path / f"straight{total}"
    result = subprocess.run(_cmd(run, f"train.iterations={total}", "train.checkpoint_every=2"), env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return _weights(run)


def _resume_and_compare(tmp_path, run, total):
    resumed = subprocess.run(_cmd(run, f"train.iterations={total}", "train.checkpoint_every=2", resume=True),
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list((run / "checkpoints").glob(".*tmp*")), "stale temporary folders must be cleaned up"
    a, b = _weights(run), _straight(tmp_path, total)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("when", ["before the first checkpoint", "after a checkpoint"])
def test_sigkill_during_training_loses_nothing_but_the_last_iterations(tmp_path, when):
    run = tmp_path / "killed"
    every = 100000 if when == "before the first checkpoint" else 2
    proc = subprocess.Popen(_cmd(run, "train.iterations=100000", f"train.checkpoint_every={every}"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if every == 2:
        _wait_for(lambda: latest_checkpoint(run / "checkpoints") is not None)
    else:
        _wait_for(lambda: list((run / "tensorboard").glob("events.*")))
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    newest = latest_checkpoint(run / "checkpoints")
    stopped_at = int(newest.name.split("_")[1]) if newest else 0
    _resume_and_compare(tmp_path, run, stopped_at + 3)


def test_sigkill_inside_a_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    run = tmp_path / "killed_in_write"
    env = {**ENV, "TDM_TEST_PAUSE_IN_CHECKPOINT": "4:60"}
    proc = subprocess.Popen(_cmd(run, "train.iterations=100000", "train.checkpoint_every=2"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert _drain_until_pause(proc)
    proc.kill()
    proc.wait()
    root = run / "checkpoints"
    assert list(root.glob(".step_0000004.tmp-*")), "the kill must land inside the write"
    assert latest_checkpoint(root).name == "step_0000002"
    _resume_and_compare(tmp_path, run, 7)


def _drain_until_pause(proc):
    for line in proc.stderr:
        if "paused inside the checkpoint write of step 4" in line:
            return True
    return False


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs: room for one digits checkpoint (12 MB) but not two. Skipped where mount is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount_point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_is_a_clear_error_and_keeps_the_previous_checkpoint(small_disk, capsys):
    out = small_disk / "run"
    args = [a for s in (*SMALL, "train.iterations=4", "train.checkpoint_every=2") for a in ("--set", s)]
    code = main(["distill", "--config", "digits-demo", "--out", str(out), "--no-report", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert "tdm: error: cannot write checkpoint" in err and "No space left on device" in err
    root = out / "checkpoints"
    assert latest_checkpoint(root).name == "step_0000002" and not list(root.glob(".*tmp*"))
    assert main(["distill", "--config", "digits-demo", "--out", str(out), "--no-report", *args[:-2],
                 "--set", "train.iterations=2", "--resume", "auto"]) == 0  # the survivor loads; nothing to write


def test_unwritable_checkpoint_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the checkpoint folder should be")
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*file/step_0000001"):
        save_checkpoint(blocker, 1, {"m": nn.Linear(2, 2)}, {}, {"torch": torch.get_rng_state()}, {})
