"""Bad input costs seconds: one clear line naming the field or file, exit code 2, nothing half-written."""

import json
import tempfile
from pathlib import Path

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
    leftovers = [p for p in out.rglob("*")] if out.is_dir() else []
    assert not [p for p in leftovers if p.is_file()], leftovers  # no tensorboard event file either


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
    (lambda t: ["--config", str(_write(t / "twice.yaml", "train:\n  iterations: 5\ntrain:\n  batch_size: 2\n"))],
     "twice.yaml:3: duplicate key 'train' (first at line 1)"),
    (lambda t: ["--config", str(_write(t / "key.yaml", "train:\n  iterations: 5\n  seed: 1\n  iterations: 6\n"))],
     "key.yaml:4: duplicate key 'train.iterations' (first at line 2)"),
    (lambda t: ["--config", str(_write(t / "empty.yaml", "# nothing yet\n"))], "empty.yaml: the file is empty"),
    (lambda t: ["--config", str(_write(t / "group.yaml", "train: 5\n")), "--set", "train.iterations=2"],
     "group.yaml:1: train: expected a group of train.* keys (a mapping), got 5"),
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


# ---- output paths: checked before any heavy work (a missing teacher, run or checkpoint is never reached)

def _unwritable_folder(tmp_path):
    """A folder no file can be created in: read-only permission bits, or where those do not stop this user
    (root), /sys, which refuses new files even to root. Skipped where neither fails."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            tempfile.TemporaryFile(dir=candidate).close()
        except OSError:
            return candidate
    pytest.skip("no unwritable folder here: permissions do not stop this user and /sys is writable")


COMMANDS = {  # command -> argv before --out; every other input is missing, so the --out check must come first
    "distill": lambda t: ["distill", "--config", "sd15-lora", "--set", f"backbone.teacher={t / 'no-teacher'}",
                          "--set", f"backbone.prompts={t / 'no-prompts.txt'}"],
    "demo": lambda t: ["demo"],
    "evaluate": lambda t: ["evaluate", str(t / "no-run")],
    "export": lambda t: ["export", "--checkpoint", str(t / "no-checkpoint")],
    "generate": lambda t: ["generate", "--model", str(t / "no-export"), "--prompt", "a cat"],
    "cache-prompts": lambda t: ["cache-prompts", "--prompts", str(t / "no-prompts.txt"), "--model", "no-model",
                                "--family", "clip"],
}
OUTS = {  # kind of bad --out -> (its path, what the message must contain)
    "a file": (lambda t: _write(t / "taken", "a file"), "taken is a file (expected a folder"),
    "under a file": (lambda t: _write(t / "taken", "a file") / "run", "cannot create a folder under the file"),
    "unwritable": (lambda t: _unwritable_folder(t) / "run", "cannot write in"),
}


@pytest.mark.parametrize("kind", OUTS)
@pytest.mark.parametrize("command", COMMANDS)
def test_bad_out_is_refused_before_any_heavy_work(tmp_path, capsys, command, kind):
    make_out, expected = OUTS[kind]
    out = make_out(tmp_path)
    code = main([*COMMANDS[command](tmp_path), "--out", str(out)])
    _assert_clear(code, capsys.readouterr().err.strip(), out, expected)


# ---- folders tdm did not create are never written into

@pytest.mark.parametrize("command", ["distill", "demo", "evaluate"])
def test_a_folder_of_someone_elses_files_is_refused(tmp_path, capsys, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my notes")
    (out / "metrics.json").write_text("{}")
    argv = {"distill": ["distill", "--config", "digits-demo"], "demo": ["demo", "--set", "train.iterations=1"],
            "evaluate": ["evaluate", str(tmp_path / "no-run")]}[command]
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "is not empty (metrics.json, report.md) and is not a tdm run folder" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.md"]
    assert (out / "report.md").read_text() == "my notes"


def test_tdm_run_folders_are_accepted(tmp_path):
    from tdm.checkpoint import STATE_FILE
    from tdm.output_dirs import MARKER, check_run_dir, claim_run_dir

    new, empty, marked, old, locked = (tmp_path / n for n in ("new", "empty", "marked", "old", "locked"))
    empty.mkdir()
    claim_run_dir(marked, "tdm distill ...")
    (marked / "report.md").write_text("written by tdm")
    (old / "checkpoints" / "step_0000002").mkdir(parents=True)  # a run from before the marker
    (old / "checkpoints" / "step_0000002" / STATE_FILE).write_text("{}")
    locked.mkdir()
    (locked / ".tdm.lock").write_text("")  # names starting with .tdm are tdm's own
    for folder in (new, empty, marked, old, locked):
        assert check_run_dir(folder) == folder
    assert not new.exists()  # checking creates nothing
    assert json.loads((marked / MARKER).read_text())["command"] == "tdm distill ..."


def test_distill_marks_its_run_folder_and_accepts_it_again(tmp_path, capsys):
    from tdm.output_dirs import MARKER

    sets = [a for s in ("train.iterations=1", "train.batch_size=4", "train.eval_every=0") for a in ("--set", s)]
    out = tmp_path / "run"
    assert main(["distill", "--config", "digits-demo", "--out", str(out), "--no-report", *sets]) == 0
    assert (out / MARKER).is_file()
    assert main(["distill", "--config", "digits-demo", "--out", str(out), "--no-report", *sets,
                 "--resume", "auto"]) == 0
    assert "resuming from" in capsys.readouterr().out


# ---- diffusers teachers (tiny pipelines)

def _prompts_file(tmp_path):
    return _write(tmp_path / "prompts.txt", "a red cat\ntwo dogs\n")


DIFFUSERS_CASES = [  # (preset, teacher family folder, extra overrides, what the message must contain)
    ("sd15-lora", "sdxl", [], "is a StableDiffusionXLPipeline, but backbone.name=sd15 expects a "
                              "StableDiffusionPipeline; for it set backbone.name=sdxl"),
    ("pixart-alpha-512", "sd15", [], "is a StableDiffusionPipeline, but backbone.name=pixart-alpha expects a "
                                     "PixArtAlphaPipeline; for it set backbone.name=sd15"),
    ("sd15-lora", "sd15", ["backbone.prompts="], "backbone.prompts: training the sd15 teacher needs prompts"),
]


@pytest.mark.parametrize("preset, family, extra, expected", DIFFUSERS_CASES, ids=[c[3][:40] for c in DIFFUSERS_CASES])
def test_bad_diffusers_teacher_inputs(tmp_path, capsys, tiny_dirs, preset, family, extra, expected):
    sets = [f"backbone.teacher={tiny_dirs[family]}", f"backbone.prompts={_prompts_file(tmp_path)}",
            "backbone.height=16", "backbone.width=16", "backbone.dtype=float32", "train.mixed_precision=no",
            "train.batch_size=2", "train.iterations=1", *extra]
    code, err, out = _run(tmp_path, capsys, ["distill", "--config", preset, *[a for s in sets for a in ("--set", s)]])
    _assert_clear(code, err, out, expected)
    assert not out.exists()  # nothing was created: no tensorboard folder, no marker
