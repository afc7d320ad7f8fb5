"""A tiny real FluxPipeline built from config, for tests (no downloads): the CLIP / T5 encoders, tokenizers and VAE
of tests/tiny_diffusers.py, a 1 + 1 block FluxTransformer2DModel with a guidance embedding (as FLUX.1-dev) and the
FLUX.1 scheduler config (dynamic shift). At 32 pixels the latents are 16x16x4, packed into 8x8 = 64 tokens of 16."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_diffusers import PROMPTS, clip_text_encoder, clip_tokenizer, t5_encoder, t5_tokenizer, vae

TINY_FLUX_SIZE = 32  # pixels; VAE factor 2, 2x2 packing: a multiple of 4
# FLUX.1-dev's scheduler_config.json (black-forest-labs/FLUX.1-dev, scheduler/)
FLUX_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                  "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


def tiny_flux(guidance_embeds: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 4, 8))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                        vae=vae(1, shift_factor=0.1159, scaling_factor=0.3611),
                        text_encoder=clip_text_encoder(tok, 2), tokenizer=tok,
                        text_encoder_2=t5_encoder(tok2, 3), tokenizer_2=tok2, transformer=transformer)


def save_tiny_flux(folder: Path, **kwargs) -> Path:
    tiny_flux(**kwargs).save_pretrained(folder)
    return folder


def load_flux(folder: Path, **overrides):
    """The flux backbone on a saved tiny pipeline through the registry, with `PROMPTS` unless `prompts` is given."""
    from tdm.config import BackboneConfig
    from tdm.registry import build_backbone

    fields = {"name": "flux", "teacher": str(folder), "height": TINY_FLUX_SIZE, "width": TINY_FLUX_SIZE,
              **overrides}
    backbone = build_backbone(BackboneConfig(**fields))
    if not fields.get("prompts"):
        backbone.conditions.prompts = list(PROMPTS)
    return backbone


def flux_overrides(folder: Path, iterations: int = 2) -> list[str]:
    """The flux-dev-lora preset on the tiny pipeline, as tiny_diffusers.tiny_overrides sets the other families'
    (float32, batch 2, rank 4 with alpha 8, EMA, a checkpoint per iteration, learning rates that move the
    adapters in two iterations); gradient checkpointing stays on, as the preset sets it."""
    return [f"backbone.teacher={folder}", f"backbone.prompts={folder.parent / 'prompts.txt'}",
            f"backbone.height={TINY_FLUX_SIZE}", f"backbone.width={TINY_FLUX_SIZE}", "backbone.dtype=float32",
            "train.mixed_precision=no", "train.batch_size=2", f"train.iterations={iterations}", "train.log_every=1",
            "train.checkpoint_every=1", "train.keep_checkpoints=0", "train.ema_decay=0.5", "train.lora_rank=4",
            "train.lora_alpha=8", "optim.generator_lr=1e-3", "optim.fake_lr=1e-3", "optim.warmup_steps=0"]
