"""train.compile: torch.compile of the roles' networks gives the run an uncompiled one gives, and the same checkpoint.

Compiling needs a C++ compiler on the CPU (inductor); the test that compiles is skipped where none works, and
the clear error for that case is tested by pointing inductor at a compiler that does not exist."""

import pytest
import torch
from safetensors.torch import load_file

from tdm.checkpoint import latest_checkpoint
from tdm.config import load_config, to_dict
from tdm.config_change import changed_keys
from tdm.errors import ConfigError
from tdm.roles import require_compiler
from tdm.toys.gmm import GMMBackbone
from tdm.trainer import Trainer
from test_bad_input import _assert_clear, _run

# The GMM toy with its MLP teacher (barely fitted: the test compares runs, not quality), so that the roles are the
# MLP's copies or adapters: it compiles in tens of seconds on one CPU thread (the digits UNet takes minutes).
SMALL = ["backbone.teacher=mlp", "train.batch_size=16", "train.iterations=3", "train.eval_every=0",
         "train.log_every=1", "train.ema_decay=0", "eval.num_samples=0", "train.lora_targets=[net.0, net.2]"]


def _compiler_missing() -> str | None:
    try:
        require_compiler(torch.device("cpu"))
    except ConfigError as e:
        return str(e)
    return None


def _train(out, roles: str, compile_: bool):
    config = load_config("toy-gmm", [*SMALL, f"train.roles={roles}", f"train.compile={str(compile_).lower()}"])
    backbone = GMMBackbone(teacher="mlp", prediction="v_prediction", fit_steps=5)  # lora adapts it in place: one each
    trainer = Trainer(config, out, backbone=backbone)
    trainer.train()
    trainer.close()
    return trainer


@pytest.mark.skipif(_compiler_missing() is not None, reason=f"torch.compile cannot run here: {_compiler_missing()}")
@pytest.mark.parametrize("roles", ["separate", "lora"])
def test_compiled_training_matches_and_writes_the_same_checkpoint(tmp_path, roles):
    """Same seed, with and without train.compile: the same losses (to float tolerance: fused kernels round
    differently) and checkpoints with the same files and keys. Under lora each role's adapter is guarded, so
    switching adapters recompiles instead of running another role's graph (which would change the losses)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _train(tmp_path / "eager", roles, False), _train(tmp_path / "compiled", roles, True)
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert [h["step"] for h in eager.history] == [h["step"] for h in compiled.history] == [1, 2, 3]
    for a, b in zip(eager.history, compiled.history):
        for key in ("fake/loss", "generator/loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    files = [latest_checkpoint(tmp_path / run / "checkpoints") for run in ("eager", "compiled")]
    assert sorted(p.name for p in files[0].iterdir()) == sorted(p.name for p in files[1].iterdir())
    for name in ("student.safetensors", "fake_score.safetensors"):
        a, b = load_file(files[0] / name), load_file(files[1] / name)
        assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)  # AdamW steps are ~lr = 2e-4


def test_no_compiler_is_a_clear_error_naming_the_key(tmp_path, capsys):
    from torch._inductor import config as inductor

    with inductor.patch({"cpp.cxx": (None, str(tmp_path / "no-such-c++"))}):
        code, err, out = _run(tmp_path, capsys, ["distill", "--config", "toy-gmm", "--no-report", "--set",
                                                 "train.compile=true"])
    _assert_clear(code, err, out, "train.compile: torch.compile on the CPU needs a C++ compiler")


def test_compile_may_change_on_resume():
    """Compiling computes the same iteration: a run may resume with or without it."""
    saved = to_dict(load_config("toy-gmm"))
    assert changed_keys(saved, load_config("toy-gmm", ["train.compile=true"])) == []
