"""One way to open a run: a run folder or a checkpoint, its config and step, its student (the EMA when kept)."""

import ast
import re
from pathlib import Path

import pytest
import torch

import tdm
from tdm.checkpoint import CheckpointError
from tdm.config import load_config
from tdm.runs import open_checkpoint, open_run
from tdm.trainer import Trainer


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_open_run_takes_a_run_or_a_checkpoint_and_loads_the_ema_when_kept(tmp_path):
    config = load_config("digits-demo", ["train.batch_size=8", "train.eval_every=0", "train.ema_decay=0.9",
                                         "train.iterations=2", "train.checkpoint_every=1"])
    trainer = Trainer(config, tmp_path)
    trainer.train()
    run = open_run(tmp_path)  # the run folder: its newest complete checkpoint
    assert run.checkpoint == tmp_path / "checkpoints" / "step_0000002" and run.step == 2
    assert run.config == config and run.has_ema and run.sampled_weights == "student_ema"
    assert open_run(tmp_path / "checkpoints" / "step_0000001").step == 1
    assert _equal(run.load_student(trainer.backbone), trainer.ema)
    student = run.load_student(trainer.backbone, ema=False)
    assert _equal(student, trainer.accelerator.unwrap_model(trainer.student))
    assert not any(p.requires_grad for p in student.parameters()) and not student.training
    assert open_checkpoint(run.checkpoint, ["eval.seed=7"]).config.eval.seed == 7
    with pytest.raises(CheckpointError, match="is not a complete tdm checkpoint"):
        open_checkpoint(tmp_path)  # a run folder: tdm export takes checkpoints only
    trainer.close()
    with pytest.raises(CheckpointError, match="neither a complete tdm checkpoint nor a run folder"):
        open_run(tmp_path / "checkpoints")


def _string_constants(path: Path) -> list[str]:
    """A module's string literals (f-string parts included), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_only_checkpoint_py_names_the_files_of_a_checkpoint():
    src = Path(tdm.__file__).parent
    files = re.compile(r"^((student|student_ema|fake_score|rng)\.safetensors|\.optim\.(safetensors|json))$")
    offenders = [f"{p.relative_to(src)}: {s!r}" for p in sorted(src.rglob("*.py")) if p.name != "checkpoint.py"
                 for s in _string_constants(p) if files.match(s)]
    assert not offenders, offenders
