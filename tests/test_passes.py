"""Passes per training iteration, counted on the real trainer (method.md H.2; issue 13): each sample's rollout runs
only the levels its draws need and the generator's student forward comes from it, with gradient."""

import pytest
import torch
from torch import nn

from tdm.config import load_config
from tdm.trainer import Trainer

ROLES = ("student", "teacher", "fake_score")


class PassCounter:
    """Forward and backward equivalents of each role (samples / batch) through forward hooks: a backward is
    counted on the outputs that carry gradient, so a forward split into several calls still counts once."""

    def __init__(self, modules: dict[str, nn.Module], batch: int):
        self.batch = batch
        self.reset()
        for role, module in modules.items():
            module.register_forward_hook(lambda m, args, out, role=role: self._forward(role, args[0], out))

    def reset(self):
        self.forwards, self.backwards = dict.fromkeys(ROLES, 0.0), dict.fromkeys(ROLES, 0.0)

    def _forward(self, role: str, x: torch.Tensor, out: torch.Tensor):
        self.forwards[role] += x.shape[0] / self.batch
        if out.requires_grad:
            out.register_hook(lambda grad: self._backward(role, grad))

    def _backward(self, role: str, grad: torch.Tensor):
        self.backwards[role] += grad.shape[0] / self.batch


def counted_iterations(trainer: Trainer, iterations: int) -> list[tuple[dict, dict, int]]:
    """Per iteration: forwards and backwards per role, and the rollout levels the draws need (sum over samples)."""
    counter = PassCounter({role: getattr(trainer, role) for role in ROLES}, trainer.config.train.batch_size)
    draw_iteration, drawn = trainer.tdm.draw_iteration, []
    trainer.tdm.draw_iteration = lambda *a, **kw: drawn.append(draw_iteration(*a, **kw)) or drawn[-1]
    result = []
    for _ in range(iterations):
        counter.reset()
        trainer.train_step()
        (fake,), gen = drawn[-1]
        levels = int((gen.num_steps - torch.minimum(fake.k, gen.k) + 1).sum())
        result.append((dict(counter.forwards), dict(counter.backwards), levels))
    return result


@pytest.mark.parametrize("generator_forward", ["rollout", "recompute"])
def test_digits_iteration_counts_at_batch_64(tmp_path, generator_forward):
    """K = 4, k uniform: 3.125 student forwards per sample on average (one with gradient), teacher one 2B call,
    fake 1F/1B + 1F: at most 7.2F + 2B (recomputing the generator's forward: about 7.75F)."""
    config = load_config("digits-demo", ["train.eval_every=0", f"train.generator_forward={generator_forward}"])
    assert config.train.batch_size == 64 and config.tdm.num_steps == 4
    trainer = Trainer(config, tmp_path)
    totals = []
    for forwards, backwards, levels in counted_iterations(trainer, 20):
        assert backwards == {"student": 1.0, "teacher": 0.0, "fake_score": 1.0}
        assert forwards["teacher"] == 2.0 and forwards["fake_score"] == 2.0
        if generator_forward == "rollout":  # exactly the levels each sample needs, nothing computed twice
            assert forwards["student"] == levels / 64
        totals.append(sum(forwards.values()))
    trainer.close()
    mean = sum(totals) / len(totals)
    if generator_forward == "rollout":
        assert mean <= 7.2
    else:
        assert 7.5 < mean < 8.0


def _one_step(config, out):
    trainer = Trainer(config, out)
    logs = trainer.train_step()
    grads = {f"{role}/{name}": p.grad.clone() for role in ("student", "fake_score")
             for name, p in getattr(trainer, role).named_parameters() if p.grad is not None}
    trainer.close()
    return logs, grads


def _assert_same_training(config_of, tmp_path):
    """One iteration with the generator's forward taken from the rollout and recomputed: the same losses and the
    same gradients of both roles, to floating-point tolerance (the sub-batches round differently: measured on digits,
    5e-6 relative in the generator loss, 5e-4 of a gradient's largest entry). Weights after
    an AdamW step are not compared: its first update is lr * sign(gradient), which flips on rounding noise."""
    (logs_a, grads_a), (logs_b, grads_b) = (_one_step(config_of(mode), tmp_path / mode)
                                            for mode in ("rollout", "recompute"))
    for key in ("fake/loss", "generator/loss"):
        assert logs_a[key] == pytest.approx(logs_b[key], rel=1e-4), key
    assert grads_a.keys() == grads_b.keys() and any(k.startswith("student/") for k in grads_a)
    differ = [k for k in grads_a if (grads_a[k] - grads_b[k]).norm() > 1e-3 * grads_b[k].norm() + 1e-12]
    assert not differ, differ[:5]


def test_generator_forward_from_the_rollout_trains_as_the_recomputed_one_on_digits(tmp_path):
    _assert_same_training(lambda mode: load_config("digits-demo", [
        "train.eval_every=0", "train.batch_size=16", "optim.generator_lr=1e-3", "optim.fake_lr=1e-3",
        f"train.generator_forward={mode}"]), tmp_path)


@pytest.mark.parametrize("family", ["sd15", "pixart-alpha"])
def test_generator_forward_from_the_rollout_trains_as_the_recomputed_one_on_lora_roles(family, tiny_dirs, tmp_path):
    """LoRA roles on one base with gradient checkpointing (the presets' setting): the student's forward, taken in
    the rollout, is recomputed in its backward under the student's adapter after the fake adapter has stepped."""
    from test_lora_families import PRESETS
    from tiny_diffusers import PROMPTS, tiny_overrides

    (tiny_dirs[family].parent / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    _assert_same_training(lambda mode: load_config(PRESETS[family], [
        *tiny_overrides(family, tiny_dirs), "train.ema_decay=0", f"train.generator_forward={mode}"]), tmp_path)
