"""A tiny real FluxPipeline built from config, for tests (no downloads): the CLIP / T5 encoders, tokenizers and VAE
of tests/tiny_diffusers.py, a 1 + 1 block FluxTransformer2DModel with a guidance embedding (as FLUX.1-dev) and the
FLUX.1 scheduler config (dynamic shift). At 32 pixels the latents are 16x16x4, packed into 8x8 = 64 tokens of 16."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_diffusers import PROMPTS, _bytes_to_unicode, clip_text_encoder, clip_tokenizer, t5_encoder, t5_tokenizer, vae

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


# a Qwen chat template (the Klein pipeline formats each prompt as a user turn)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_tokenizer(max_length: int = 64):
    """A byte-level Qwen2 tokenizer without merges (one token per byte) and the chat template above."""
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>", model_max_length=max_length)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_flux2_klein(is_distilled: bool = False):
    """FLUX.2 [klein] base: a 27-layer Qwen3 of width 16 (the pipeline stacks hidden states 9, 18 and 27), a
    1 + 1 block Flux2Transformer2DModel without guidance embedding, a 2-level AutoencoderKLFlux2 with 4 latent
    channels (16 after 2x2 patchify, batch-normalised with non-trivial statistics)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen_tokenizer()
    torch.manual_seed(2)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=8, max_position_embeddings=1024)).eval()
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          guidance_embeds=False, axes_dims_rope=(4, 4, 4, 4))
    torch.manual_seed(1)
    klein_vae = AutoencoderKLFlux2(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16)
    klein_vae.bn.running_mean.uniform_(-0.5, 0.5)
    klein_vae.bn.running_var.uniform_(0.5, 2.0)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=klein_vae,
                              text_encoder=text_encoder, tokenizer=tok, transformer=transformer,
                              is_distilled=is_distilled)


def save_tiny_flux(folder: Path, **kwargs) -> Path:
    tiny_flux(**kwargs).save_pretrained(folder)
    return folder


def save_tiny_flux2_klein(folder: Path, **kwargs) -> Path:
    tiny_flux2_klein(**kwargs).save_pretrained(folder)
    return folder


def load_flux(folder: Path, name: str = "flux", **overrides):
    """The `name` backbone on a saved tiny pipeline through the registry, with `PROMPTS` unless `prompts` is given."""
    from tdm.config import BackboneConfig
    from tdm.registry import build_backbone

    fields = {"name": name, "teacher": str(folder), "height": TINY_FLUX_SIZE, "width": TINY_FLUX_SIZE,
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
