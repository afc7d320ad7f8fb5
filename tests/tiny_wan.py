"""Tiny real Wan pipelines built from config, for tests (no downloads): a Wan 2.1 style single-expert pipeline and
a Wan 2.2 A14B style two-expert one (`transformer` for t >= boundary, `transformer_2` below it).

Latents [4, 3, 8, 8] (channels, latent frames, height, width) at 64 x 64 pixels and 9 frames."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_diffusers import t5_tokenizer

WAN_SIZE, WAN_FRAMES = 64, 9  # pixels; (9 - 1) / 4 + 1 = 3 latent frames, 64 / 8 = 8 latent pixels
BOUNDARY_RATIO = 0.6  # two experts: transformer for pipeline timesteps >= 600, transformer_2 below
FLOW_SHIFT = 3.0      # Wan2.1-T2V-1.3B-Diffusers' scheduler config


def umt5_encoder(tokenizer, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8)
    return UMT5EncoderModel(config).eval()


def wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def wan_vae(seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                            latents_std=[1.5, 2.0, 0.8, 1.2])  # 8x spatial, 4x temporal


def build_wan(two_experts: bool = False, expand_timesteps: bool = False):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    tok = t5_tokenizer(max_length=512)  # WanPipeline's max_sequence_length
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=FLOW_SHIFT, num_train_timesteps=1000)  # as the hub's config
    return WanPipeline(tokenizer=tok, text_encoder=umt5_encoder(tok, 2), vae=wan_vae(1), scheduler=scheduler,
                       transformer=wan_transformer(0), transformer_2=wan_transformer(3) if two_experts else None,
                       boundary_ratio=BOUNDARY_RATIO if two_experts else None, expand_timesteps=expand_timesteps)


def save_wan(folder: Path, two_experts: bool = False, expand_timesteps: bool = False) -> Path:
    build_wan(two_experts, expand_timesteps).save_pretrained(folder)
    return folder


def load_wan(folder: Path, **overrides):
    """The wan backbone on a saved tiny pipeline, through the registry, at the tiny size, with tiny_diffusers'
    PROMPTS as its training prompts unless `prompts` is given."""
    from tdm.config import BackboneConfig
    from tdm.registry import build_backbone
    from tiny_diffusers import PROMPTS

    fields = {"name": "wan", "teacher": str(folder), "height": WAN_SIZE, "width": WAN_SIZE, "frames": WAN_FRAMES,
              **overrides}
    backbone = build_backbone(BackboneConfig(**fields))
    if not fields.get("prompts"):
        backbone.conditions.prompts = list(PROMPTS)
    return backbone
