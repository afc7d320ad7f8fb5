"""A teacher tdm has never seen: the README's "Distil your own model" section run as written, and the registry's
import paths, entry points and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tdm.backbones.base import Backbone
from tdm.checkpoint import read_manifest
from tdm.config import BackboneConfig, load_config
from tdm.core.prediction import PredictionType
from tdm.core.schedules import DiscreteVP
from tdm.errors import ConfigError
from tdm.registry import build_backbone, check_backbone_matches

ROOT = Path(__file__).resolve().parents[1]


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def code_blocks(section: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def test_the_readme_own_teacher_example_runs_and_resume_evaluate_export_work_on_its_run(tmp_path, capsys):
    blocks = code_blocks(readme_section("Distil your own model"))
    files = {}
    for lang, code in blocks:
        if lang in ("python", "yaml"):  # each starts with "# <file name>"
            name = code.splitlines()[0].lstrip("# ").strip()
            files[name] = code
            (tmp_path / name).write_text(code)
    assert set(files) == {"teachers.py", "mine.yaml"}
    commands = next(code for lang, code in blocks if lang == "bash")
    # `tdm` and `python` as a user's shell finds them: the console script does not put the current folder on
    # sys.path (-P), so `teachers:MyTeacher` imports only because tdm adds it
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, call in (("tdm", f'{sys.executable} -P -m tdm.cli "$@"'), ("python", f'{sys.executable} "$@"')):
        (shims / name).write_text(f"#!/bin/sh\nexec {call}\n")
        (shims / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-e", "-c", commands], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from runs/mine/checkpoints/step_0000100 at iteration 100" in done.stdout

    run = tmp_path / "runs" / "mine"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000100", "step_0000200"]
    manifest = read_manifest(run / "checkpoints" / "step_0000200")
    assert manifest["config"]["backbone"]["name"] == "teachers:MyTeacher"
    report = (run / "report.md").read_text()
    assert "| student, 4 steps | 4 |" in report and "measured in the raw samples" in report
    assert "real data (floor)" not in report and "The floor row" not in report  # no floor row: none mentioned
    assert "![samples](samples.png)" in report and (run / "samples.png").is_file()  # 2-D samples: scatter plots
    rows = json.loads((tmp_path / "runs" / "mine-eval" / "metrics.json").read_text())["rows"]
    assert {r["sampler"] for r in rows} >= {"teacher50", "student4"} and all("fd_teacher50" in r for r in rows)

    export = tmp_path / "mine-student"
    recipe = json.loads((export / "recipe.json").read_text())
    assert recipe["backbone"]["name"] == "teachers:MyTeacher" and recipe["grid"] == [899.0, 674.0, 449.0, 224.0]
    from tdm.cli import main

    assert main(["generate", "--model", str(export), "--prompt", "x", "--out", str(tmp_path / "gen")]) != 0
    assert "a network export of a MyTeacher teacher, without a stock pipeline" in capsys.readouterr().err
    exported = load_file(export / "network.safetensors")
    checkpoint = load_file(run / "checkpoints" / "step_0000100" / "student.safetensors")
    assert exported.keys() == checkpoint.keys() and all(torch.equal(exported[k], checkpoint[k]) for k in exported)


# ------------------------------------------------------------------------------ the registry's own teachers

MODULE = textwrap.dedent('''
    import torch
    from torch import nn
    from tdm.backbones.base import Backbone
    from tdm.core.prediction import PredictionType
    from tdm.core.schedules import DiscreteVP


    class Plain(Backbone):
        sample_shape = (2,)
        prediction = PredictionType.EPSILON

        def __init__(self):
            self.schedule = DiscreteVP.from_betas("linear", 1000, 1e-4, 0.02)
            self.teacher = nn.Linear(2, 2)

        def sample_conditions(self, batch, generator):
            return torch.zeros(batch, dtype=torch.long)

        def null_condition(self, batch):
            return torch.zeros(batch, dtype=torch.long)


    def make(config):
        plain = Plain()
        plain.made_from = config.teacher
        return plain


    def two_arguments(a, b):
        return Plain()


    def not_a_backbone(config):
        return nn.Linear(2, 2)

    NOT_CALLABLE = 3
''')


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    (tmp_path / "own_teachers.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("own_teachers", None)


def test_import_path_builds_a_class_or_a_factory_with_default_evaluation_methods(own_module):
    plain = build_backbone(BackboneConfig(name="own_teachers:Plain"))
    assert plain.name == "Plain" and plain.metrics(torch.zeros(3, 2), None) == {} and plain.floor_metrics(3) == {}
    assert torch.equal(plain.evaluation_conditions(5), plain.evaluation_conditions(5))
    made = build_backbone(BackboneConfig(name="own_teachers:make", teacher="weights.pt"))
    assert made.made_from == "weights.pt"


@pytest.mark.parametrize("name, message", [
    ("no_such_module_here:Plain", "cannot import module 'no_such_module_here'"),
    ("own_teachers:Missing", "module 'own_teachers' has no 'Missing'"),
    ("own_teachers:", "is not an import path (expected module:Name"),
    ("own_teachers:NOT_CALLABLE", "names a int, not a Backbone subclass"),
    ("own_teachers:not_a_backbone", "made a Linear, not a tdm Backbone"),
    ("own_teachers:two_arguments", "must take the BackboneConfig as its only argument"),
    ("no-such-family", "an installed tdm.backbones entry point"),
])
def test_bad_backbone_names_get_one_line_errors(own_module, name, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        build_backbone(BackboneConfig(name=name))
    assert "\n" not in str(err.value) and "backbone.name" in str(err.value)


def test_an_installed_entry_point_names_a_backbone(own_module):
    dist = own_module / "own_teachers-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: own-teachers\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tdm.backbones]\nplain-teacher = own_teachers:make\n"
                                           "broken = own_teachers:Nowhere\n")
    assert isinstance(build_backbone(BackboneConfig(name="plain-teacher")), Backbone)
    with pytest.raises(ConfigError, match="entry point 'broken' .* does not load"):
        build_backbone(BackboneConfig(name="broken"))


class _Unnamed(Backbone):
    sample_shape = (2,)
    prediction = PredictionType.EPSILON
    schedule = DiscreteVP.from_betas("linear", 1000, 1e-4, 0.02)
    teacher = torch.nn.Linear(2, 2)

    def sample_conditions(self, batch, generator):
        return torch.zeros(batch, dtype=torch.long)

    def null_condition(self, batch):
        return torch.zeros(batch, dtype=torch.long)


def test_the_trainer_refuses_a_backbone_its_saved_config_would_not_rebuild(tmp_path, own_module):
    from tdm.trainer import Trainer

    config = load_config("toy-gmm", ["train.iterations=1"])  # backbone.name: toy-gmm
    with pytest.raises(ConfigError, match=r"names 'toy-gmm' but the backbone given is a '_Unnamed'; set "
                                          r"backbone.name to the import path .*test_own_backbone:_Unnamed"):
        Trainer(config, tmp_path / "run", backbone=_Unnamed())
    plain = build_backbone(BackboneConfig(name="own_teachers:Plain"))
    with pytest.raises(ConfigError, match="names 'toy-gmm' but the backbone given is a 'Plain'"):
        check_backbone_matches(config.backbone, plain)
    with pytest.raises(ConfigError, match="names 'own_teachers:Plain' but the backbone given is a _Unnamed"):
        check_backbone_matches(BackboneConfig(name="own_teachers:Plain"), _Unnamed())
    check_backbone_matches(BackboneConfig(name="own_teachers:Plain"), plain)  # consistent: accepted
