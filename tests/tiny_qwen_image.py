"""A tiny real QwenImagePipeline built from config, for tests (no downloads): a 2-block QwenImageTransformer2DModel,
a 2-layer Qwen2.5-VL text model with a byte-level tokenizer built in code, a 4x AutoencoderKLQwenImage and the
scheduler config of Qwen/Qwen-Image (dynamic exponential shift). 32 pixels -> 8x8 latents -> 16 packed tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_diffusers import _bytes_to_unicode

TINY_SIZE = 32  # pixels: latents 8x8 (VAE factor 4), 4x4 = 16 tokens of 2x2 patches
# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_IMAGE_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
                        "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                        "time_shift_type": "exponential", "use_dynamic_shifting": True}


def qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return tok


def qwen_text_encoder(tokenizer, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=len(tokenizer),
                              pad_token_id=tokenizer.pad_token_id, vision_start_token_id=len(tokenizer),
                              vision_end_token_id=len(tokenizer), image_token_id=len(tokenizer),
                              video_token_id=len(tokenizer))
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_qwen_image(text_encoder: bool = True):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tok = qwen_tokenizer()
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    torch.manual_seed(1)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                 latents_std=[1.5, 0.5, 1.0, 2.0])
    return QwenImagePipeline(transformer=transformer, vae=vae, tokenizer=tok,
                             text_encoder=qwen_text_encoder(tok, 2) if text_encoder else None,
                             scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER))


def save_tiny_qwen_image(folder: Path) -> Path:
    build_qwen_image().save_pretrained(folder)
    return folder
