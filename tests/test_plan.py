"""`tdm plan`: counts on the meta device against closed forms and real builds, the memory model's sharding, and the
command on a shipped preset (offline: nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdm.cli import main
from tdm.config import load_config
from tdm.errors import ConfigError
from tdm.plan.architectures import Architecture
from tdm.plan.counting import saved_bytes
from tdm.plan.planner import plan

pytest.importorskip("diffusers")
pytest.importorskip("peft")

RANK, C1, C2, TEXT = 16, 32, 64, 32
TINY_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
             "block_out_channels": (C1, C2), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": TEXT,
             "attention_head_dim": 8, "norm_num_groups": 8}


def _tiny(tmp_path, extra: str = "") -> tuple:
    preset = tmp_path / "tiny.yaml"
    preset.write_text("backbone: {name: sd15, height: 64, width: 64, dtype: float32, gradient_checkpointing: false}\n"
                      f"train: {{roles: lora, lora_rank: {RANK}, lora_targets: [attention], batch_size: 2, "
                      f"mixed_precision: 'no'{extra}}}\n")
    arch = Architecture("tiny", str(preset), "sd15", "UNet2DConditionModel", TINY_UNET, latent=(4, 8, 8),
                        context={"encoder_hidden_states": (5, TEXT)})
    return load_config(str(preset)), arch


def test_saved_bytes_of_a_small_network_match_a_closed_form():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    # first linear: its input (weights excluded); GELU: its input; second linear: its input
    assert saved_bytes(net, lambda: net(x))[0] == (3 * 8 + 3 * 16 + 3 * 16) * 4


def test_attention_saves_as_a_fused_kernel_on_meta_and_cpu():
    def attention_bytes(device):
        q = torch.randn(1, 4, 256, 16, device=device, requires_grad=True)
        return saved_bytes(nn.Linear(1, 1), lambda: F.scaled_dot_product_attention(q, q, q))[0]

    # q (shared by key and value), the output and a float32 log-sum-exp per query; not the 256 x 256 scores
    assert attention_bytes("meta") == attention_bytes("cpu") == (2 * 4 * 256 * 16 + 4 * 256) * 4


def test_tiny_unet_counts_match_closed_forms_and_a_real_build(tmp_path):
    config, arch = _tiny(tmp_path)
    result = plan(config, gpus=4, gpu_memory_gib=1, mfu=0.5, peak_tflops=100, arch=arch)
    lora, separate = (result["strategies"][s]["counts"] for s in ("lora", "separate"))
    real = sum(p.numel() for p in arch.build("cpu").parameters())
    assert lora.base_params == separate.base_params == separate.trainable_params == real
    # rank r on a Linear(i, o) adds r (i + o); each transformer block at width C: self-attention q, k, v, out
    # (C -> C) 8 r C, cross-attention q, out 4 r C and k, v (text -> C) 2 r (TEXT + C): r (14 C + 2 TEXT).
    # Width 32: one down and two up blocks; width 64: the mid block.
    assert lora.trainable_params == RANK * (3 * (14 * C1 + 2 * TEXT) + (14 * C2 + 2 * TEXT))
    assert result["strategies"]["lora"]["optimiser_bytes_per_role"] == 8 * lora.trainable_params
    ddp, fsdp = result["layouts"]["ddp/separate"], result["layouts"]["fsdp/separate"]
    assert ddp["weights"] == 3 * 4 * real and fsdp["weights"] == 3 * 4 * real // 4
    assert ddp["optimiser"] == 16 * real and fsdp["optimiser"] == 16 * real // 4
    assert ddp["ddp_buckets"] == 8 * real and fsdp["ddp_buckets"] == 0
    assert ddp["gradients_held"] == 4 * real and fsdp["gradients_held"] == 4 * real // 4  # the other role's
    assert 0 < lora.activations_checkpointed < lora.activations
    assert result["strategies"]["lora"]["tflop_per_iteration_per_gpu"] > 0
    assert {m["fits"] for m in result["layouts"].values()} == {"yes"}  # a few MiB in 1 GiB


def test_activations_scale_with_the_batch(tmp_path):
    config, arch = _tiny(tmp_path)
    result = plan(config, 1, 1e-5, 0.4, 100, arch=arch)  # 10 KiB per GPU
    assert {m["fits"] for m in result["layouts"].values()} == {"no"}
    at_2 = result["strategies"]["lora"]["counts"]
    at_4 = plan(load_config(str(tmp_path / "tiny.yaml"), ["train.batch_size=4"]), 1, 1, 0.4, 100,
                arch=arch)["strategies"]["lora"]["counts"]
    assert at_4.activations == 2 * at_2.activations


def test_plan_refuses_what_it_cannot_plan(tmp_path):
    config, arch = _tiny(tmp_path)
    with pytest.raises(ConfigError, match="--mfu"):
        plan(config, 8, 80, 1.5, 989, arch=arch)
    with pytest.raises(ConfigError, match="backbone.name: no shipped architecture"):
        plan(load_config("digits-demo"), 8, 80, 0.4, 989)


def test_tdm_plan_on_a_preset_prints_every_row_offline(capsys):
    assert main(["plan", "--config", "sd15-lora", "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "nothing downloaded" in out and "859.52 M" in out  # SD1.5's UNet
    for row in ("lora      teacher", "lora      student", "separate  fake score", "without checkpointing",
                "ddp lora", "ddp separate", "fsdp lora", "fsdp separate", "s/iteration", "Fits in 8 x 80 GiB:"):
        assert row in out, row


def test_the_architecture_is_the_released_teachers_where_a_family_has_two_at_one_size():
    from tdm.plan.planner import architecture_for

    assert architecture_for(load_config("wan2.1-t2v-14b-lora")).name == "wan2.1-t2v-14b"
    assert architecture_for(load_config("wan2.2-t2v-a14b-lora")).experts == 2
    local = load_config("wan2.1-t2v-14b-lora", ["backbone.teacher=/models/my-wan"])
    assert architecture_for(local).name == "wan2.2-t2v-a14b"  # unknown teacher: the first shipped at that size
    assert architecture_for(load_config("wan2.1-t2v-1.3b-lora")).name == "wan2.1-t2v-1.3b"
