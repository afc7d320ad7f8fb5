"""A tiny real SD3.5-medium-like pipeline built from config (no downloads): the MMDiT-X transformer with dual
attention (a second, image-only attention `attn2`) in its first layer and RMS QK-norm, on the tiny SD3 parts."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_diffusers import BUILDERS


def pipeline():
    from diffusers import SD3Transformer2DModel

    pipe = BUILDERS["sd3"]()
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2,
                                             attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                             joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
                                             dual_attention_layers=(0,), qk_norm="rms_norm")
    return pipe


def save_tiny_sd35(folder: Path) -> Path:
    pipeline().save_pretrained(folder)
    return folder
