"""Preemption by signal, exact resume after it, non-finite updates, checkpoint rotation."""

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from tdm.checkpoint import latest_checkpoint
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
