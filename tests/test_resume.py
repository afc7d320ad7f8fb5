"""Resume continues the same run: changed configs, damaged checkpoints, the last good checkpoint, one run per
folder."""

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tdm.checkpoint import is_complete, latest_checkpoint, prune_checkpoints, save_checkpoint
from tdm.cli import main
from tdm.config import load_config
from tdm.errors import TrainingAborted
from tdm.files import sha256_file
from tdm.toys.digits import WEIGHTS_DIR
from tdm.trainer import Trainer
from test_reliability import ENV, SMALL, _cmd, _wait_for


def _distill(out, *overrides, flags=()):
    return main(["distill", "--config", "digits-demo", "--out", str(out), "--no-report",
                 *[a for s in (*SMALL, *overrides) for a in ("--set", s)], *flags])


def _error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("tdm:")]
    assert len(lines) == 1 and lines[0].startswith("tdm: error: ") and "Traceback" not in err, err
    return lines[0]


def _contents(folder):
    return {str(p.relative_to(folder)): sha256_file(p) for p in folder.rglob("*") if p.is_file()}


def test_resuming_with_a_changed_run_is_refused_and_names_the_changes(tmp_path, capsys):
    run = tmp_path / "run"
    assert _distill(run, "train.iterations=2") == 0
    before = _contents(run)
    teacher = tmp_path / "teacher.safetensors"  # a copy of the shipped teacher: a working but other file
    for suffix in (".safetensors", ".json"):
        shutil.copy(WEIGHTS_DIR / f"digits_teacher{suffix}", teacher.with_suffix(suffix))
    capsys.readouterr()
    code = _distill(run, "train.iterations=4", "tdm.num_steps=2", f"backbone.teacher={teacher}",
                    flags=["--resume", "auto"])
    line = _error_line(capsys.readouterr().err)
    assert code == 2
    assert "tdm.num_steps 4 -> 2" in line and f'backbone.teacher "" -> "{teacher}"' in line, line
    assert "train.iterations" not in line.split("; only")[0], line  # an allowed change is not listed
    assert "--allow-config-change" in line
    assert _contents(run) == before, "nothing may be written"


def test_resume_may_change_length_and_cadences_and_the_flag_allows_the_rest(tmp_path, capsys):
    run = tmp_path / "run"
    assert _distill(run, "train.iterations=2") == 0
    assert _distill(run, "train.iterations=3", "train.checkpoint_every=1", "train.log_every=2",
                    "train.keep_checkpoints=5", "eval.num_samples=10", flags=["--resume", "auto"]) == 0
    assert "changed config" not in capsys.readouterr().err
    assert _distill(run, "train.iterations=4", "tdm.num_steps=2", flags=["--resume", "auto",
                                                                          "--allow-config-change"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "changed config" in line]
    assert len(warnings) == 1 and warnings[0].startswith("tdm: warning: ") and "tdm.num_steps 4 -> 2" in warnings[0]
    manifest = json.loads((latest_checkpoint(run / "checkpoints") / "state.json").read_text())
    assert manifest["step"] == 4 and manifest["config"]["tdm"]["num_steps"] == 2


@pytest.mark.parametrize("damage", ["incomplete", "corrupted"])
def test_resume_auto_with_only_damaged_checkpoints_stops_and_start_fresh_moves_them_aside(tmp_path, capsys, damage):
    run, settings = tmp_path / "run", ("train.iterations=4", "train.checkpoint_every=2")
    assert _distill(run, *settings) == 0
    root = run / "checkpoints"
    for name in ("step_0000002", "step_0000004"):
        if damage == "incomplete":
            (root / name / "state.json").unlink()
        else:
            data = bytearray((root / name / "student.safetensors").read_bytes())
            data[-1] ^= 0xFF
            (root / name / "student.safetensors").write_bytes(bytes(data))
    damaged = _contents(root)
    capsys.readouterr()
    code = _distill(run, *settings, flags=["--resume", "auto"])
    line = _error_line(capsys.readouterr().err)
    assert code == 2
    assert "no usable checkpoint" in line and "step_0000002" in line and "step_0000004" in line, line
    assert "--start-fresh" in line
    assert _contents(root) == damaged, "damaged checkpoints stay as they are"
    assert _distill(run, *settings, flags=["--resume", "auto", "--start-fresh"]) == 0
    assert capsys.readouterr().err.count("moved it to") == 2
    assert _contents(root / "damaged") == damaged, "moved aside, byte for byte"
    assert latest_checkpoint(root).name == "step_0000004"


def test_prune_moves_damaged_step_folders_aside_and_a_save_never_overwrites_one(tmp_path):
    root = tmp_path / "checkpoints"

    def save(step):
        return save_checkpoint(root, step, {"m": nn.Linear(2, 2)}, {}, {"torch": torch.get_rng_state()}, {})

    save(2)
    for name in ("step_0000001", "step_0000003"):  # damaged by something else: no manifest
        (root / name).mkdir()
        (root / name / "m.safetensors").write_text(f"what was left of {name}")
    (root / ".step_0000005.tmp-999999").mkdir()  # a killed writer's half-write: tdm's own, removed
    save(4)
    prune_checkpoints(root, keep=0)
    assert sorted(p.name for p in root.iterdir()) == ["damaged", "step_0000002", "step_0000004"]
    (root / "step_0000003").mkdir()  # damaged again under the same name
    (root / "step_0000003" / "m.safetensors").write_text("second")
    save(3)
    corrupted = bytearray((root / "step_0000004" / "m.safetensors").read_bytes())
    corrupted[-1] ^= 0xFF  # complete, but its content differs from the manifest
    (root / "step_0000004" / "m.safetensors").write_bytes(bytes(corrupted))
    save(4)
    assert sorted(p.name for p in (root / "damaged").iterdir()) == ["step_0000001", "step_0000003",
                                                                     "step_0000003.1", "step_0000004"]
    assert (root / "damaged" / "step_0000001" / "m.safetensors").read_text() == "what was left of step_0000001"
    assert (root / "damaged" / "step_0000003.1" / "m.safetensors").read_text() == "second"
    assert (root / "damaged" / "step_0000004" / "m.safetensors").read_bytes() == bytes(corrupted)
    assert all(is_complete(root / f"step_000000{s}") for s in (2, 3, 4))


def _trainer(out, *overrides):
    return Trainer(load_config("digits-demo", [*SMALL, "train.checkpoint_every=1", *overrides]), out)


def test_an_abort_names_the_last_checkpoint_from_before_the_weights_blew_up(tmp_path):
    """Generator lr 1e30 from iteration 3: its update leaves finite weights near 1e30 (checkpoint 4 holds them),
    then every loss is non-finite. The divergence's start survives a resume (from checkpoint 5)."""
    root = tmp_path / "checkpoints"
    healthy = _trainer(tmp_path, "train.iterations=3")
    healthy.train()
    healthy.close()
    blown = _trainer(tmp_path, "train.iterations=5", "optim.generator_lr=1e30")
    blown.resume("auto")
    blown.train()
    blown.close()
    assert max(v.abs().max() for v in load_file(root / "step_0000004" / "student.safetensors").values()) > 1e20
    resumed = _trainer(tmp_path, "train.iterations=50", "optim.generator_lr=1e30", "train.max_nonfinite=2")
    assert resumed.resume("auto").name == "step_0000005"
    with pytest.raises(TrainingAborted, match="2 non-finite updates in a row") as info:
        resumed.train()
    resumed.close()
    named = Path(re.search(r"last good checkpoint.*: (\S+)$", str(info.value)).group(1))
    assert named.name == "step_0000003", str(info.value)
    weights = load_file(named / "student.safetensors")
    assert all(torch.isfinite(v).all() and v.abs().max() < 100 for v in weights.values())


def test_a_fault_streak_in_progress_continues_exactly_after_resume(tmp_path, capsys):
    """Generator lr 1e30: iteration 0's update blows the student up and every later update is non-finite, so
    train.max_nonfinite=3 aborts at iteration 3. A run that ends after iteration 2 (its checkpoint holds a streak
    of 2) and resumes with --resume auto aborts at the same iteration with the same message, after the same
    warnings. (When the streak was not checkpointed, the resumed run counted from 0 and aborted at iteration 5
    without the last finite loss.)"""
    faulty = ("optim.generator_lr=1e30", "train.max_nonfinite=3")

    def run(out, iterations, flags=()):
        code = _distill(out, *faulty, f"train.iterations={iterations}", flags=flags)
        err = capsys.readouterr().err
        return code, [line.replace(str(out), "<run>") for line in re.findall(r"tdm: [^\r\n]*", err)]  # not the bar

    code, straight = run(tmp_path / "straight", 10)
    assert code == 3 and "3 non-finite updates in a row" in straight[-1] and "last at iteration 3;" in straight[-1]
    assert "last finite fake_score loss: None" not in straight[-1]
    interrupted = tmp_path / "interrupted"
    code, first = run(interrupted, 3)
    assert code == 0 and latest_checkpoint(interrupted / "checkpoints").name == "step_0000003"
    code, resumed = run(interrupted, 10, ["--resume", "auto"])
    assert code == 3
    assert first + resumed == straight


def test_a_second_run_on_the_same_folder_stops_at_once_and_the_first_finishes(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(_cmd(run, "train.iterations=100000"), env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)

    def training():
        return list((run / "tensorboard").glob("events.*"))

    _wait_for(lambda: (run / ".tdm.lock").exists() or training())  # the first holds the folder
    second = subprocess.run(_cmd(run, "train.iterations=2"), env=ENV, capture_output=True, text=True, timeout=300)
    line = _error_line(second.stderr)
    assert second.returncode == 2
    assert f"--out {run} is in use by another tdm run (pid {first.pid}" in line, line
    _wait_for(training)
    assert first.poll() is None, "the first run is still training"
    first.send_signal(signal.SIGTERM)  # it stops after this iteration, with a checkpoint
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out and latest_checkpoint(run / "checkpoints") is not None
    assert not (run / ".tdm.lock").exists()
