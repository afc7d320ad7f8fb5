"""A tiny real ZImagePipeline built from config (no downloads): single-stream DiT, Qwen3 text encoder with a
byte-level tokenizer and a Qwen-style chat template, the tiny VAE of tiny_diffusers. Latents 8x8 at 16 pixels."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_diffusers import _bytes_to_unicode, vae

SIZE = 16  # pixels: VAE factor 2 x patch 2 divides it; latents 8x8
# Qwen3's template for one user turn with a generation prompt (enable_thinking=True adds nothing)
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    chars = list(_bytes_to_unicode().values())
    tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token=None,
                         pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def qwen3_encoder(tokenizer, seed: int):
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id)
    return Qwen3Model(config).eval()


def transformer(seed: int = 0):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                     n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                     axes_dims=[8, 4, 4], axes_lens=[512, 32, 32])
    with torch.no_grad():  # the pad tokens start at zero; give them values, as trained ones have
        for name in ("x_pad_token", "cap_pad_token"):
            getattr(model, name).normal_()
    return model


def pipeline(shift: float = 6.0, dynamic: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    tok = qwen_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic)
    return ZImagePipeline(scheduler=scheduler, vae=vae(1, shift_factor=0.1159, scaling_factor=0.3611),
                          text_encoder=qwen3_encoder(tok, 2), tokenizer=tok, transformer=transformer())


def save_tiny_z_image(folder: Path, **kwargs) -> Path:
    pipeline(**kwargs).save_pretrained(folder)
    return folder
