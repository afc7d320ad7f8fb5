"""Reward post-training (tdm reward, tdm.reward_stage): it starts from a distillation run's student, trains the three
roles, resumes bit-exactly after an interruption, and exports the student as distillation does."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tdm.checkpoint import latest_checkpoint
from tdm.cli import main
from tdm.config import from_dict, load_config, to_dict
from tdm.reward_stage import RewardTrainer
from tdm.runs import open_run

DIGITS = ["train.batch_size=8", "train.log_every=1", "train.eval_every=0", "train.ema_decay=0.9",
          "optim.generator_lr=1e-4", "optim.fake_lr=5e-4", "train.report_to=none"]
REWARD = ["reward.group_size=4", "reward.lr=1e-3", "train.checkpoint_every=2", "train.keep_checkpoints=0"]


def _sets(overrides):
    return [a for s in overrides for a in ("--set", s)]


def _checkpoint_tensors(path):
    return {f"{p.name}/{k}": v for p in sorted(path.glob("*.safetensors")) if p.name != "rng.safetensors"
            for k, v in load_file(p).items()}


def _reward(start, out, reward, overrides, iterations, resume=False):
    return main(["reward", "--from", str(start), "--reward", reward, "--out", str(out), "--no-report",
                 *_sets([*overrides, f"train.iterations={iterations}"]), *(["--resume", "auto"] if resume else [])])


def _resumes_exactly(start, tmp_path, reward, overrides):
    """A run of 4 iterations and one stopped after 2 and resumed end with the same weights and optimiser states of
    all three roles; returns the full run's last checkpoint."""
    assert _reward(start, tmp_path / "full", reward, overrides, 4) == 0
    assert _reward(start, tmp_path / "split", reward, overrides, 2) == 0
    assert _reward(start, tmp_path / "split", reward, overrides, 4, resume=True) == 0
    last = latest_checkpoint(tmp_path / "full" / "checkpoints")
    a, b = _checkpoint_tensors(last), _checkpoint_tensors(latest_checkpoint(tmp_path / "split" / "checkpoints"))
    assert a.keys() == b.keys()
    for prefix in ("student.", "fake_score.", "reward_model.", "generator.optim", "fake_score.optim",
                   "reward_model.optim"):
        assert any(k.startswith(prefix) for k in a), prefix
    for key in a:
        assert torch.equal(a[key], b[key]), key
    middle = _checkpoint_tensors(tmp_path / "full" / "checkpoints" / "step_0000002")
    for role in ("student.", "fake_score.", "reward_model."):  # all three roles train
        assert any(not torch.equal(v, middle[k]) for k, v in a.items() if k.startswith(role)), role
    return last


def test_digits_reward_stage_starts_from_the_run_resumes_exactly_and_exports(tmp_path):
    start = tmp_path / "distilled"
    assert main(["distill", "--config", "digits-demo", "--out", str(start), "--no-report",
                 *_sets([*DIGITS, "train.iterations=2"])]) == 0
    run = open_run(start)
    config = from_dict(to_dict(run.config), ["reward.name=digits-class", *REWARD])
    trainer = RewardTrainer(config, tmp_path / "probe", run)
    distilled = load_file(run.checkpoint / "student_ema.safetensors")
    assert all(torch.equal(v, trainer.student.state_dict()[k]) for k, v in distilled.items())
    x, t, cond = torch.randn(4, 1, 8, 8), torch.full((4,), 500), torch.arange(4)
    with torch.no_grad():  # the surrogate starts as its reference, the teacher
        assert torch.equal(trainer.reward_model(x, t, cond), trainer.teacher(x, t, cond))
    logs = trainer.train_step()
    assert {"reward/mean", "reward_model/loss", "reward_model/bradley_terry", "generator/reward_term",
            "generator/regulariser", "fake/loss"} <= logs.keys()
    trainer.close()

    last = _resumes_exactly(start, tmp_path, "digits-class", REWARD)
    assert main(["export", "--checkpoint", str(last), "--out", str(tmp_path / "export")]) == 0
    assert any((tmp_path / "export").iterdir())


def test_reward_stage_refuses_groups_that_do_not_fit_the_batch(tmp_path, capsys):
    config = load_config("digits-demo", [*DIGITS, "reward.name=digits-class", "reward.group_size=3"])
    with pytest.raises(Exception, match="reward.group_size"):
        RewardTrainer(config, tmp_path)


def test_tiny_diffusers_reward_stage_with_lora_roles_resumes_exactly_and_exports(tmp_path, tiny_dirs, monkeypatch):
    from tiny_diffusers import PROMPTS, cli_sets, tiny_overrides

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    family_sets = [*tiny_overrides("sd15", tiny_dirs), f"backbone.prompts={prompts}"]
    start = tmp_path / "distilled"
    assert main(["distill", "--config", "sd15-lora", "--out", str(start), "--no-report",
                 *cli_sets([*family_sets, "train.report_to=none"])]) == 0
    overrides = [*family_sets, "train.report_to=none", "reward.group_size=2", "reward.lr=1e-3",
                 "train.keep_checkpoints=0", "train.checkpoint_every=2"]
    last = _resumes_exactly(start, tmp_path, "jpeg-compressibility", overrides)
    assert main(["export", "--checkpoint", str(last), "--out", str(tmp_path / "export")]) == 0
    assert list((tmp_path / "export").rglob("*.safetensors"))

    # a reward that reads the text gets each sample's prompt, the same for a whole group
    (tmp_path / "prompt_reward.py").write_text(
        "import json\n"
        "def prompt_length(images, conditions, prompts):\n"
        "    with open('seen.json', 'a') as f:\n"
        "        f.write(json.dumps(prompts) + '\\n')\n"
        "    return [float(len(p)) for p in prompts]\n")
    monkeypatch.chdir(tmp_path)
    assert _reward(start, tmp_path / "prompted", "prompt_reward:prompt_length", [*overrides, "train.batch_size=4"],
                   1) == 0
    seen = [json.loads(line) for line in (tmp_path / "seen.json").read_text().splitlines()]
    batch = seen[0]
    assert len(batch) == 4 and set(batch) <= set(PROMPTS)
    assert all(batch[i] == batch[i + 1] for i in range(0, len(batch), 2))  # groups of reward.group_size=2


def test_the_safeguard_warns_when_the_reward_rises_while_fd_to_the_teacher_passes_its_bound(tmp_path):
    trainer = RewardTrainer(load_config("digits-demo", [*DIGITS, "reward.name=digits-class", "reward.group_size=4"]),
                            tmp_path)
    start = {"step": 0, "eval/reward_mean": 0.3, "eval/fd_teacher": 5.0}
    for step, reward, fd in ((10, 0.5, 9.0), (20, 0.2, 11.0), (30, 0.5, 11.0), (40, 0.6, 12.0)):
        logs = {"eval/reward_mean": reward, "eval/fd_teacher": fd}
        trainer.history = [start, {"step": step, **logs}]
        trainer.state.step = step
        trainer._warn(None, logs)
    assert [w["step"] for w in trainer.diagnostics.warnings] == [30]  # over 2 x 5.0 with a higher reward, once
    assert trainer.diagnostics.warnings[0]["condition"] == "reward hacking"
    trainer.close()


def test_two_process_reward_stage_resumes_bit_for_bit(tmp_path):
    """The stage under a 2-process DDP launch (gloo): a run stopped after 2 iterations and resumed with --resume auto
    ends at iteration 3 bit for bit as an uninterrupted one (all three roles and their optimisers)."""
    from test_accelerate import ACCELERATE_CONFIG, _launch

    start = tmp_path / "distilled"
    assert main(["distill", "--config", "digits-demo", "--out", str(start), "--no-report",
                 *_sets([*DIGITS, "train.iterations=2"])]) == 0
    config = ACCELERATE_CONFIG.format(kind="MULTI_GPU", cpu="false").replace("mixed_precision: bf16",
                                                                             "mixed_precision: 'no'")

    def reward(out, iterations, *flags):
        result = _launch(tmp_path, config, "reward", "--from", str(start), "--reward", "digits-class", "--out",
                         str(out), "--no-report", *_sets([*REWARD, f"train.iterations={iterations}"]), *flags)
        assert result.returncode == 0, result.stderr[-3000:]

    reward(tmp_path / "full", 3)
    reward(tmp_path / "split", 2)
    reward(tmp_path / "split", 3, "--resume", "auto")
    assert json.loads((tmp_path / "full" / "launch.json").read_text())["num_processes"] == 2
    a = _checkpoint_tensors(tmp_path / "full" / "checkpoints" / "step_0000003")
    b = _checkpoint_tensors(tmp_path / "split" / "checkpoints" / "step_0000003")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert any(k.startswith("reward_model.") for k in a)
