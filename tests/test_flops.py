"""benchmarks/flops.py's counting: closed-form FLOPs of plain layers, the backward of a full fine-tune (~2 forwards)
and of LoRA (~1), checkpointing's recompute, the pass counts of both schedules, tdm's expected rollout depth, and
the real architectures against their presets. On a tiny UNet built from config, on the meta device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks are scripts, not a package
from flops import (  # noqa: E402
    expected_student_forwards,
    monte_carlo_student_forwards,
    pass_flops,
    passes,
    preset_settings,
    schedule_flops,
)
from tdm.plan.architectures import ARCHITECTURES, Architecture  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def _tiny_unet(tmp_path: Path, latent: tuple[int, ...] = (4, 8, 8)) -> Architecture:
    """An SD-style UNet at 64 px (8x8 latents) with a preset of its own: LoRA rank 2 on the attention."""
    preset = tmp_path / "tiny.yaml"
    preset.write_text("backbone: {name: sd15, height: 64, width: 64, gradient_checkpointing: true}\n"
                      "tdm: {guidance_scale: 3.5}\ntrain: {roles: lora, lora_rank: 2, batch_size: 4}\n")
    config = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16,),
                  down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                  cross_attention_dim=24, attention_head_dim=4, norm_num_groups=4)
    return Architecture("tiny", str(preset), "sd15", "UNet2DConditionModel", config, latent=latent,
                        context={"encoder_hidden_states": (5, 24)})


def test_plain_layers_count_2mnk_and_checkpointing_adds_one_forward():
    x = torch.empty(2, 3, 6, 6, device="meta")  # M = 2 samples
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 10), nn.Tanh()).to("meta")
    conv = 2 * (2 * 6 * 6) * 8 * (3 * 3 * 3)  # 2 x output positions x out channels x (in channels x kernel)
    linear = 2 * 2 * 10 * (8 * 6 * 6)         # 2 M N K
    plain = passes(net, lambda m: m(x))
    assert plain == {"forward": conv + linear, "forward_grad": conv + linear,
                     # weight gradients of both layers, the input gradient of the linear layer only (x needs none)
                     "backward": conv + 2 * linear}
    recomputed = passes(net, lambda m: checkpoint(m, x, use_reentrant=False))
    assert recomputed["forward_grad"] == plain["forward_grad"]
    assert recomputed["backward"] == plain["backward"] + plain["forward"]  # tanh saves its output: all recomputed
    # torch stops a recompute once every saved tensor is back: a last linear layer's output is not saved
    no_tanh = passes(net[:3], lambda m: checkpoint(m, x, use_reentrant=False))
    assert no_tanh["backward"] == plain["backward"] + conv


@pytest.fixture(scope="module")
def tiny_counts(tmp_path_factory):
    """pass_flops of the tiny UNet for each role strategy, without and with checkpointing (about 2 s each)."""
    arch = _tiny_unet(tmp_path_factory.mktemp("tiny-unet"))
    return {(roles, ckpt): pass_flops(arch, roles, ckpt) for roles in ("separate", "lora") for ckpt in (False, True)}


def test_full_fine_tune_backward_is_two_forwards_lora_backward_one(tiny_counts):
    full, lora = tiny_counts["separate", False], tiny_counts["lora", False]
    assert full["teacher_forward"] == full["forward"] == full["forward_grad"]
    assert 1.85 < full["backward"] / full["forward"] <= 2.0  # conv_in's input gradient is not needed
    assert lora["teacher_forward"] < lora["forward"] < 1.05 * lora["teacher_forward"]  # the rank-2 branches
    # activation gradients through the frozen weights (attention's: two matmuls per forward one) + the adapters'
    assert 0.95 < lora["backward"] / lora["forward"] < 1.2
    assert lora["forward_backward"] == pytest.approx(lora["forward_grad"] + lora["backward"])


def test_checkpointing_recomputes_the_blocks_in_the_backward(tiny_counts):
    for roles in ("separate", "lora"):
        plain, ckpt = tiny_counts[roles, False], tiny_counts[roles, True]
        assert ckpt["forward_grad"] == plain["forward_grad"]
        recompute = ckpt["backward"] - plain["backward"]
        # the checkpointed blocks' forward; conv_in, conv_out, the time embedding and resamplers are not recomputed
        assert 0.5 * plain["forward"] < recompute <= plain["forward"]


def test_expected_student_forwards_formula_and_tdm_draws():
    assert expected_student_forwards(1) == 1
    assert expected_student_forwards(2) == 1.75
    assert expected_student_forwards(4) == 3.125
    for K in (2, 4):
        assert monte_carlo_student_forwards(K, samples=40_000) == pytest.approx(expected_student_forwards(K), abs=0.03)


def test_schedule_pass_counts():
    unit = {"teacher_forward": 1.0, "forward": 1.0, "forward_grad": 1.0, "backward": 2.0, "forward_backward": 3.0}
    cfg = schedule_flops(unit, 4, 3.5)
    # official: 11 forwards + 2 backwards (method.md H.2) = 15 forwards; tdm: 7.125 + 2 backwards
    assert cfg["official"] == {"student": 8.0, "teacher": 3.0, "fake": 4.0, "total": 15.0}
    assert cfg["tdm"] == {"student": 5.125, "teacher": 2.0, "fake": 4.0, "total": 11.125}
    assert cfg["ratio"] == pytest.approx(11.125 / 15)
    unguided = schedule_flops(unit, 4, 1.0)
    assert (unguided["tdm"]["teacher"], unguided["official"]["teacher"]) == (1.0, 2.0)


def test_architectures_match_their_presets(tmp_path):
    for arch in ARCHITECTURES.values():
        settings = preset_settings(arch)
        assert settings["roles"] in ("lora", "separate")
        assert arch.learned_sigma == (arch.family == "pixart-alpha")
    with pytest.raises(ValueError, match="does not match"):
        preset_settings(_tiny_unet(tmp_path, latent=(4, 16, 16)))
