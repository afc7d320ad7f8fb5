"""Tiny real diffusers pipelines built from config, for tests (environment.md section 2; no downloads).

`save_tiny(family, folder)` writes a whole pipeline with `save_pretrained`, so tests load it through the same
`from_pretrained` path a user takes. Latents are 8x8 (frames: 3) at the `TINY_SIZE` pixel sizes below.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

TINY_SIZE = {"sd15": 16, "sdxl": 16, "pixart-alpha": 16, "sd3": 16, "cogvideox": 64}  # pixels; latents 8x8
TINY_FRAMES = 9  # CogVideoX: (9 - 1) / 4 + 1 = 3 latent frames


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-symbol table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 32):
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        vocab += [(ch, -5.0), ("\u2581" + ch, -4.0)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def clip_text_encoder(tokenizer, seed: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=32,
                            max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_encoder(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


def vae(seed: int, **kwargs):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16, **kwargs)  # 2x downsampling


def _sd15():
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False)
    return StableDiffusionPipeline(vae=vae(1), text_encoder=clip_text_encoder(tok, 2), tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
                                norm_num_groups=8)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae(1), text_encoder=clip_text_encoder(tok, 2), tokenizer=tok,
                                     text_encoder_2=clip_text_encoder(tok2, 3, projection=True), tokenizer_2=tok2,
                                     unet=unet, scheduler=scheduler)


def _pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    tok = t5_tokenizer()
    torch.manual_seed(0)
    # sample_size 128 switches on the resolution / aspect-ratio micro-conditions, as in PixArt-alpha 1024
    transformer = PixArtTransformer2DModel(sample_size=128, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=3, caption_channels=32, in_channels=4,
                                           cross_attention_dim=24, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=t5_encoder(tok, 2), vae=vae(1), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())


def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae(1, shift_factor=0.0609, scaling_factor=1.5035),
                                    text_encoder=clip_text_encoder(tok, 2, projection=True), tokenizer=tok,
                                    text_encoder_2=clip_text_encoder(tok2, 3, projection=True), tokenizer_2=tok2,
                                    text_encoder_3=t5_encoder(tok3, 4), tokenizer_3=tok3)


def _cogvideox():
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    tok = t5_tokenizer(max_length=16)
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                              sample_width=8, sample_height=8, sample_frames=TINY_FRAMES,
                                              patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
                                              use_rotary_positional_embeddings=True)
    torch.manual_seed(1)
    video_vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                       up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                       latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                       temporal_compression_ratio=4)  # 8x spatial, 4x temporal
    scheduler = CogVideoXDDIMScheduler(snr_shift_scale=3.0, rescale_betas_zero_snr=True,
                                       prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    return CogVideoXPipeline(tokenizer=tok, text_encoder=t5_encoder(tok, 2), vae=video_vae, transformer=transformer,
                             scheduler=scheduler)


BUILDERS = {"sd15": _sd15, "sdxl": _sdxl, "pixart-alpha": _pixart, "sd3": _sd3, "cogvideox": _cogvideox}


PROMPTS = ["a red cat", "two dogs on a hill", "a bowl of soup"]


def save_tiny(family: str, folder: Path) -> Path:
    """Build the tiny pipeline of `family` and `save_pretrained` it to `folder`."""
    BUILDERS[family]().save_pretrained(folder)
    return folder


def save_all(root: Path) -> dict[str, Path]:
    """Every family's tiny pipeline, saved under `root` (about a second in all)."""
    return {family: save_tiny(family, root / family) for family in BUILDERS}


def load_backbone(family: str, folder: Path, **overrides):
    """The family's backbone on a saved tiny pipeline, through the registry (the path `tdm distill` takes),
    at the tiny size, with `PROMPTS` as its training prompts unless the override `prompts` names a file."""
    from tdm.config import BackboneConfig
    from tdm.registry import build_backbone

    size = TINY_SIZE[family]
    fields = {"name": family, "teacher": str(folder), "height": size, "width": size,
              "frames": TINY_FRAMES if family == "cogvideox" else 0, **overrides}
    backbone = build_backbone(BackboneConfig(**fields))
    if not fields.get("prompts"):
        backbone.conditions.prompts = list(PROMPTS)
    return backbone


ITERATIONS = 2


def tiny_overrides(family: str, tiny_dirs: dict[str, Path], iterations: int = ITERATIONS) -> list[str]:
    """The family's preset on its tiny pipeline: float32 throughout, batch 2, rank 4 with alpha 8 (LoRA scale 2,
    which the export must carry), a student EMA, a checkpoint per iteration, and learning rates that move the
    adapters visibly in two iterations. Gradient checkpointing stays on, as the preset sets it."""
    folder, size = tiny_dirs[family], TINY_SIZE[family]
    return [f"backbone.teacher={folder}", f"backbone.prompts={folder.parent / 'prompts.txt'}",
            f"backbone.height={size}", f"backbone.width={size}", "backbone.dtype=float32",
            *([f"backbone.frames={TINY_FRAMES}"] if family == "cogvideox" else []),
            "train.mixed_precision=no", "train.batch_size=2", f"train.iterations={iterations}", "train.log_every=1",
            "train.checkpoint_every=1", "train.keep_checkpoints=0", "train.ema_decay=0.5", "train.lora_rank=4",
            "train.lora_alpha=8", "optim.generator_lr=1e-3", "optim.fake_lr=1e-3", "optim.warmup_steps=0"]


def cli_sets(overrides: list[str]) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def two_adapter_student(backbone, config):
    """A copy of the teacher carrying random-init LoRA adapters 'fake' and 'student' (peft `config`, seed 1), with
    'student' active, as the one-base-two-adapters role strategy leaves it: a trained student's stand-in."""
    import copy

    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    student = copy.deepcopy(backbone.teacher)
    torch.manual_seed(1)
    for name in ("fake", "student"):
        inject_adapter_in_model(config, student.model, adapter_name=name)
    for module in student.model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter("student")
    return student
