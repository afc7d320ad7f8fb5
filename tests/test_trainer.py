"""The trainer on the shipped digits teacher: roles, checkpoints, exact resume, logging, two processes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tdm.checkpoint import is_complete, latest_checkpoint
from tdm.config import load_config
from tdm.trainer import Trainer

SMALL = ["train.batch_size=8", "train.log_every=2", "train.eval_every=0", "train.ema_decay=0.9",
         "optim.generator_lr=1e-4", "optim.fake_lr=5e-4", "optim.warmup_steps=2"]


def _train(out, iterations, resume=None, extra=()):
    trainer = Trainer(load_config("digits-demo", [*SMALL, f"train.iterations={iterations}",
                                                  "train.checkpoint_every=3", *extra]), out)
    if resume:
        trainer.resume(resume)
    trainer.train()
    trainer.close()
    return trainer


def _checkpoint_tensors(path):
    """Weights and optimiser states (the global RNG state depends on what ran before in this process)."""
    return {f"{p.name}/{k}": v for p in sorted(path.glob("*.safetensors")) if p.name != "rng.safetensors"
            for k, v in load_file(p).items()}


@pytest.mark.parametrize("roles", ["separate", "lora"])
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path, roles):
    extra = [f"train.roles={roles}"]
    full = _train(tmp_path / "full", 6, extra=extra)
    _train(tmp_path / "split", 3, extra=extra)
    resumed = _train(tmp_path / "split", 6, resume="auto", extra=extra)
    assert resumed.state.step == 6
    a = _checkpoint_tensors(latest_checkpoint(tmp_path / "full" / "checkpoints"))
    b = _checkpoint_tensors(latest_checkpoint(tmp_path / "split" / "checkpoints"))
    assert a.keys() == b.keys() and any(k.startswith("student_ema") for k in a)
    assert any(k.startswith("generator.optim") for k in a) and any(k.startswith("fake_score.optim") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the resumed history keeps what the first run logged (including its last step, 3)
    assert {h["step"] for h in full.history} <= {h["step"] for h in resumed.history}


def test_roles_move_and_the_teacher_does_not(tmp_path):
    trainer = Trainer(load_config("digits-demo", [*SMALL, "train.iterations=2"]), tmp_path)
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    fake_before = {k: v.clone() for k, v in trainer.fake_score.state_dict().items()}
    trainer.train()
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert any(not torch.equal(v, trainer.student.state_dict()[k]) for k, v in student_before.items())
    assert any(not torch.equal(v, trainer.fake_score.state_dict()[k]) for k, v in fake_before.items())
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    trainer.close()


def test_checkpoint_is_complete_and_an_incomplete_one_is_skipped(tmp_path):
    _train(tmp_path, 6)
    root = tmp_path / "checkpoints"
    newest = latest_checkpoint(root)
    assert newest.name == "step_0000006" and is_complete(newest)
    state = json.loads((newest / "state.json").read_text())
    assert state["step"] == 6 and state["config"]["train"]["iterations"] == 6
    assert {"student.safetensors", "fake_score.safetensors", "generator.optim.safetensors"} <= set(state["files"])
    assert not list(root.glob(".*tmp*")), "no temporary folder may be left behind"
    (newest / "state.json").unlink()  # as if killed before the manifest was written
    assert latest_checkpoint(root).name == "step_0000003"
    shutil.rmtree(root / "step_0000003")
    (newest / "fake_score.safetensors").write_bytes(b"")
    assert latest_checkpoint(root) is None


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(
    os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_processes_train_and_checkpoint(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "-m", "tdm.cli", "distill", "--config", "digits-demo",
           "--out", str(tmp_path), "--no-report", *[a for s in [*SMALL, "train.iterations=4"] for a in ("--set", s)]]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000004"


@pytest.mark.parametrize("fresh", [False, True])
def test_further_fake_updates_reuse_the_rollout_or_draw_fresh_ones(tmp_path, fresh):
    """optim.fake_updates = 3: the generator's rollout (its own conditions and noise) feeds the first fake update;
    the other two reuse it, or with optim.fresh_fake_rollouts each rolls out new conditions and noise."""
    trainer = Trainer(load_config("digits-demo", [*SMALL, "optim.fake_updates=3",
                                                  f"optim.fresh_fake_rollouts={str(fresh).lower()}"]), tmp_path)
    rollouts, seen = [], []
    rollout = trainer._rollouts

    def recording_rollouts(noise, cond, *draws):
        rollouts.append((noise, cond, rollout(noise, cond, *draws)))
        return rollouts[-1][2]

    def recording(step):
        def record(micro, *rest):
            seen.append(micro)  # [(rows, cond, trajectory)] per micro-batch
            return step(micro, *rest)
        return record

    trainer._rollouts = recording_rollouts
    trainer.fake_score_step, trainer.generator_step = map(recording, (trainer.fake_score_step, trainer.generator_step))
    trainer.train_step()
    assert len(rollouts) == (3 if fresh else 1) and len(seen) == 4
    (noise, cond, micro), generator = rollouts[0], seen[3]
    assert generator is micro and seen[0] is micro  # consistent with its draws
    (_, micro_cond, traj), = micro
    assert torch.equal(micro_cond, cond)
    for fake_micro, rolled in zip(seen[1:3], rollouts[1:] if fresh else [rollouts[0]] * 2):
        assert fake_micro is rolled[2]
        if fresh:
            assert not torch.equal(rolled[0], noise) and not torch.equal(fake_micro[0][2].x0[4], traj.x0[4])
    trainer.close()
