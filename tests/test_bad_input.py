"""Bad input costs seconds: one clear line naming the field or file, exit code 2, nothing half-written."""

import json

import pytest
import torch
from torch import nn

from tdm.checkpoint import save_checkpoint
from tdm.cli import main
from tdm.config import load_config, to_dict

SETS = [  # (preset, override, what the message must contain)
    ("digits-demo", "train.iteratons=5", "unknown config key 'train.iteratons' (did you mean 'iterations'?)"),
    ("digits-demo", "trian.iterations=5", "unknown config key 'trian' (did you mean 'train'?)"),
    ("digits-demo", "train.iterations=five", "train.iterations: expected an integer"),
    ("digits-demo", "train.iterations=0", "train.iterations must be >= 1"),
    ("digits-demo", "train.batch_size=-1", "train.batch_size must be >= 1"),
    ("digits-demo", "train.ema_decay=1.5", "train.ema_decay must lie in [0, 1)"),
    ("digits-demo", "train.mixed_precision=fp8", "train.mixed_precision must be one of"),
    ("digits-demo", "train.stop_signals=[SIGFOO]", "train.stop_signals: unknown signal names ['SIGFOO']"),
    ("digits-demo", "train.keep_checkpoints=-2", "train.keep_checkpoints must be >= 0"),
    ("digits-demo", "train.roles=full", "train.roles must be separate or lora"),
    ("digits-demo", "train.lora_rank=0", "train.lora_rank must be >= 1"),
    ("digits-demo", "train.lora_alpha=0", "train.lora_alpha must be > 0"),
    ("digits-demo", "train.lora_targets=['']", "train.lora_targets: entries must be non-empty"),
    ("digits-demo", "backbone.gradient_checkpointing=true", "backbone.gradient_checkpointing: only the diffusers"),
    ("digits-demo", "tdm.num_steps=0", "tdm.num_steps must be >= 1"),
    ("digits-demo", "tdm.num_steps=2000", "tdm.num_steps must be <= tdm.total_steps"),
    ("digits-demo", "tdm.interval=sideways", "tdm.interval must be one of"),
    ("digits-demo", "tdm.importance_weight=sometimes", "tdm.importance_weight must be one of"),
    ("digits-demo", "tdm.generator_loss=l1", "tdm.generator_loss must be one of"),
    ("digits-demo", "tdm.timesteps=[999, 500]", "tdm.timesteps has 2 entries"),
    ("digits-demo", "tdm.timesteps=[200, 400, 600, 800]", "tdm.timesteps must strictly decrease"),
    ("digits-demo", "tdm.guidance_scale=-1", "tdm.guidance_scale must be >= 0"),
    ("digits-demo", "tdm.randmid=maybe", "tdm.randmid: expected true or false"),
    ("digits-demo", "optim.generator_lr=0", "optim.generator_lr and optim.fake_lr must be > 0"),
    ("digits-demo", "optim.betas=[0.9]", "optim.betas: expected a list of 2 values"),
    ("digits-demo", "optim.betas=[0.0, 1.5]", "optim.betas must lie in [0, 1)"),
    ("digits-demo", "optim.fake_updates=0", "optim.fake_updates must be >= 1"),
    ("digits-demo", "eval.student_steps=[0]", "eval.teacher_steps and eval.student_steps must be >= 1"),
    ("digits-demo", "backbone.name=sd99", "backbone.name must be one of"),
    ("digits-demo", "backbone.prediction=v_prediction", "backbone.prediction: the digits teacher predicts epsilon"),
    ("digits-demo", "backbone.teacher=/no/such/teacher.safetensors", "backbone.teacher: /no/such/teacher.safetensors"),
    ("toy-gmm", "backbone.teacher=perfect", "backbone.teacher: toy-gmm takes exact or mlp"),
    ("toy-gmm", "backbone.prediction=velocity", "backbone.prediction must be one of"),
    ("digits-demo", "train", "--set expects group.key=value"),
]


def _run(tmp_path, capsys, argv):
    out = tmp_path / "run"
    code = main([*argv[:1], "--out", str(out), *argv[1:]])
    err = capsys.readouterr().err.strip()
    return code, err, out


def _assert_clear(code, err, out, expected):
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("tdm:")]
    assert len(lines) == 1 and lines[0].startswith("tdm: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    leftovers = [p for p in out.rglob("*")] if out.exists() else []
    assert not [p for p in leftovers if p.is_file() and not p.name.startswith("events.")], leftovers


@pytest.mark.parametrize("preset, override, expected", SETS, ids=[s[1] for s in SETS])
def test_bad_config_values(tmp_path, capsys, preset, override, expected):
    code, err, out = _run(tmp_path, capsys, ["distill", "--config", preset, "--set", override])
    _assert_clear(code, err, out, expected)


def _garbage(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    path.with_suffix(".json").write_text(json.dumps({"kwargs": {}}))
    return path


def _foreign_checkpoint(tmp_path):
    """A complete, valid checkpoint made for another model (a 3x3 linear layer)."""
    config = to_dict(load_config("digits-demo"))
    lin = nn.Linear(3, 3)
    opt = torch.optim.AdamW(lin.parameters())
    return save_checkpoint(tmp_path / "foreign", 5, {"student": lin, "fake_score": lin}, {"generator": opt,
                           "fake_score": opt}, {"torch": torch.get_rng_state()}, config)


def _corrupted_checkpoint(tmp_path):
    path = _foreign_checkpoint(tmp_path)
    data = bytearray((path / "student.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    (path / "student.safetensors").write_bytes(bytes(data))
    return path


FILES = [  # (argv builder, what the message must contain)
    (lambda t: ["--config", str(t / "missing.yaml")], "missing.yaml does not exist"),
    (lambda t: ["--config", "digit-demo"], "unknown preset 'digit-demo' (did you mean 'digits-demo'?)"),
    (lambda t: ["--config", str(_write(t / "bad.yaml", "train: [1, 2\n"))], "bad.yaml: not valid YAML"),
    (lambda t: ["--config", str(_write(t / "list.yaml", "- 1\n- 2\n"))], "list.yaml: expected a mapping"),
    (lambda t: ["--config", str(_write(t / "off.yaml", "tdm:\n  importance_weight: off\n"))], "quote the value"),
    (lambda t: ["--config", "digits-demo", "--set", f"backbone.teacher={_garbage(t)}"],
     "backbone.teacher: cannot load"),
    (lambda t: ["--config", "digits-demo", "--resume", str(t / "nowhere")], "nowhere is not a complete tdm checkpoint"),
    (lambda t: ["--config", "digits-demo", "--resume", str(_foreign_checkpoint(t))],
     "student.safetensors does not match this run's student"),
    (lambda t: ["--config", "digits-demo", "--resume", str(_corrupted_checkpoint(t))],
     "student.safetensors is corrupted"),
    (lambda t: ["--config", "sd15-lora", *_zero_snr_epsilon_teacher(t)],
     "scheduler config: prediction_type='epsilon' on a table with zero terminal SNR, from rescale_betas_zero_snr"),
]


def _zero_snr_epsilon_teacher(tmp_path):
    """--set arguments for the tiny SD1.5 pipeline with its epsilon scheduler rescaled to zero terminal SNR."""
    pytest.importorskip("diffusers")
    from tiny_diffusers import PROMPTS, TINY_SIZE, save_tiny

    folder = save_tiny("sd15", tmp_path / "zero-snr")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "rescale_betas_zero_snr": True}))
    prompts = _write(tmp_path / "prompts.txt", "\n".join(PROMPTS))
    sets = [f"backbone.teacher={folder}", f"backbone.prompts={prompts}", f"backbone.height={TINY_SIZE['sd15']}",
            f"backbone.width={TINY_SIZE['sd15']}", "train.mixed_precision=no"]
    return [a for s in sets for a in ("--set", s)]


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("build, expected", FILES, ids=[f[1][:40] for f in FILES])
def test_bad_files(tmp_path, capsys, build, expected):
    code, err, out = _run(tmp_path, capsys, ["distill", *build(tmp_path)])
    _assert_clear(code, err, out, expected)


def test_nothing_is_ever_unpickled():
    """Untrusted files are read as safetensors, JSON or YAML (safe_load) only."""
    from pathlib import Path

    src = Path(__file__).parents[1] / "src" / "tdm"
    for path in src.rglob("*.py"):
        text = path.read_text()
        for banned in ("torch.load(", "pickle", "yaml.load(", "yaml.unsafe_load", "weights_only=False"):
            assert banned not in text, f"{path.name} uses {banned}"
