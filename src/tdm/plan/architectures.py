"""The real-size denoisers of tdm's presets (src/tdm/configs), built from their diffusers config with random weights
(nothing is downloaded), with example inputs at the preset's sample size.

`arch.build()` makes the network (on the meta device by default: shapes without memory); `arch.inputs(batch, ...)`
gives (x_t, timesteps, kwargs) and `arch.call(model, x_t, t, kwargs)` runs the network as tdm's family denoiser
does (src/tdm/backbones/*.py `call`), returning the prediction (PixArt's learned-variance half dropped).
Used by `tdm plan` (tdm.plan) and the benchmarks. Each config is the released model's `config.json` of its
`unet` or `transformer` folder on the Hugging Face Hub (the repo its preset names in backbone.teacher), as keyword
arguments of the diffusers class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

# diffusers classes whose forward takes `added_cond_kwargs` (SDXL's text_embeds / time_ids, PixArt's micro-conditions)
ADDED_COND_CLASSES = ("UNet2DConditionModel", "PixArtTransformer2DModel")


@dataclass(frozen=True)
class Architecture:
    name: str                  # e.g. "sdxl"
    preset: str                # its config file in src/tdm/configs, e.g. "sdxl-lora.yaml"
    family: str                # tdm's backbone.name: sd15 | sdxl | pixart-alpha | sd3 | cogvideox
    model_class: str           # the diffusers class
    config: dict[str, Any] = field(hash=False)  # its constructor kwargs (the released model's config)
    latent: tuple[int, ...] = ()  # one sample: [C, h, w], or [F, C, h, w] for video (tdm's layout)
    context: dict[str, tuple[int, ...]] = field(default_factory=dict, hash=False)  # forward kwargs: per-sample shape
    added: dict[str, tuple[int, ...]] = field(default_factory=dict, hash=False)    # added_cond_kwargs: random ones
    micro: dict[str, tuple[float, ...]] = field(default_factory=dict, hash=False)  # added_cond_kwargs: fixed values
    mask: dict[str, int] = field(default_factory=dict, hash=False)  # attention masks of ones: kwarg -> length
    unbatched: dict[str, tuple[int, ...]] = field(default_factory=dict, hash=False)  # kwargs without a batch axis
    per_sample: dict[str, Any] = field(default_factory=dict, hash=False)  # kwargs: a list of this value per sample
    vae_latent: tuple[int, ...] = ()  # the VAE latent's ([frames,] h, w) where the sample's layout hides it
    experts: int = 1           # networks of this config the model holds, one called per step (Wan 2.2 A14B: 2)
    teacher: str = ""          # the released model's hub id, where a family has two models at one sample size

    @property
    def learned_sigma(self) -> bool:
        """PixArt outputs [eps, variance] along channels; tdm keeps the eps half."""
        return self.config.get("out_channels") == 2 * self.config["in_channels"]

    def build(self, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32) -> nn.Module:
        """The network with random weights (on meta: no memory, no initialisation cost)."""
        import diffusers

        with torch.device(device):
            model = getattr(diffusers, self.model_class)(**self.config)
        return model if dtype == torch.float32 else model.to(dtype)

    def inputs(self, batch: int, device: torch.device | str = "meta",
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """(x_t [B, *latent], timesteps [B], kwargs of the diffusers forward besides the sample and timestep)."""
        def rand(shape):
            return torch.randn((batch, *shape), device=device, dtype=dtype)

        kwargs: dict[str, Any] = {name: rand(shape) for name, shape in self.context.items()}
        kwargs.update({name: torch.ones(batch, n, device=device, dtype=torch.long) for name, n in self.mask.items()})
        kwargs.update({name: torch.zeros(shape, device=device, dtype=dtype) for name, shape in self.unbatched.items()})
        kwargs.update({name: [value] * batch for name, value in self.per_sample.items()})
        if self.model_class in ADDED_COND_CLASSES:
            added = {name: rand(shape) for name, shape in self.added.items()}
            added.update({name: torch.tensor(values, device=device, dtype=dtype).repeat(batch, 1)
                          for name, values in self.micro.items()})
            kwargs["added_cond_kwargs"] = added
        t = torch.full((batch,), 500.0, device=device)  # mid-range level; FLOPs do not depend on it
        return rand(self.latent), t, kwargs

    def call(self, model: nn.Module, x: Tensor, t: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The network's prediction for (x_t, t), called as tdm's family denoiser calls it."""
        sample = "sample" if self.model_class == "UNet2DConditionModel" else "hidden_states"
        out = model(**{sample: x}, timestep=t, **kwargs, return_dict=False)[0]
        return out.chunk(2, dim=1)[0] if self.learned_sigma else out


def _pixart(size: int) -> dict[str, Any]:
    """PixArt-alpha XL/2 (PixArt-XL-2-512x512 / -1024-MS): 28 layers, 16 heads x 72, T5-XXL captions."""
    return dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                cross_attention_dim=1152, attention_bias=True, sample_size=size // 8, patch_size=2,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096)


# black-forest-labs/FLUX.1-dev transformer/config.json (12B: 19 double-stream and 38 single-stream blocks)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def _wan(heads: int, ffn: int, layers: int) -> dict[str, Any]:
    """Wan text-to-video transformers, transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (12 heads, 30
    layers) and of Wan2.1-T2V-14B-Diffusers, as each expert of Wan2.2-T2V-A14B-Diffusers (40 heads, 40 layers)."""
    return dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


WAN_TEXT = {"encoder_hidden_states": (512, 4096)}  # umT5 tokens
PIXART_TEXT = {"encoder_hidden_states": (120, 4096)}  # tdm.backbones.pixart.MAX_SEQUENCE_LENGTH T5 tokens

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in [
    Architecture(
        "sd15", "sd15-lora.yaml", "sd15", "UNet2DConditionModel",
        dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
             block_out_channels=(320, 640, 1280, 1280),
             down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
             cross_attention_dim=768, attention_head_dim=8),
        latent=(4, 64, 64), context={"encoder_hidden_states": (77, 768)}),
    Architecture(
        "sdxl", "sdxl-lora.yaml", "sdxl", "UNet2DConditionModel",
        dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816),
        latent=(4, 128, 128), context={"encoder_hidden_states": (77, 2048)}, added={"text_embeds": (1280,)},
        micro={"time_ids": (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)}),  # (original size, crop, target size)
    Architecture(
        "pixart-alpha-512", "pixart-alpha-512.yaml", "pixart-alpha", "PixArtTransformer2DModel", _pixart(512),
        latent=(4, 64, 64), context=PIXART_TEXT, mask={"encoder_attention_mask": 120}),
    Architecture(  # the paper's PixArt run (TDM-1024): resolution / aspect-ratio micro-conditions at sample_size 128
        "pixart-alpha-1024", "pixart-alpha-1024.yaml", "pixart-alpha", "PixArtTransformer2DModel", _pixart(1024),
        latent=(4, 128, 128), context=PIXART_TEXT, mask={"encoder_attention_mask": 120},
        micro={"resolution": (1024.0, 1024.0), "aspect_ratio": (1.0,)}),
    Architecture(
        "sd3-medium", "sd3-medium-lora.yaml", "sd3", "SD3Transformer2DModel",
        dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=192),
        latent=(16, 128, 128),
        context={"encoder_hidden_states": (77 + 256, 4096), "pooled_projections": (2048,)}),  # CLIP-L/G + T5
    Architecture(  # 49 frames at 480 x 720 -> 13 latent frames of 60 x 90; CogVideoX-2B has no rotary embeddings
        "cogvideox-2b", "cogvideox-2b-lora.yaml", "cogvideox", "CogVideoXTransformer3DModel",
        dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
             text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
             max_text_seq_length=226, use_rotary_positional_embeddings=False),
        latent=(13, 16, 60, 90), context={"encoder_hidden_states": (226, 4096)}),
    Architecture(  # 1024 x 1024: 128 x 128 latents packed as 64 x 64 tokens of 2 x 2 x 16 channels (tdm's layout)
        "flux-dev", "flux-dev-lora.yaml", "flux", "FluxTransformer2DModel", FLUX_DEV, latent=(4096, 64),
        context={"encoder_hidden_states": (512, 4096), "pooled_projections": (768,), "guidance": ()},
        unbatched={"img_ids": (4096, 3), "txt_ids": (512, 3)}, vae_latent=(128, 128)),
    Architecture(  # Qwen/Qwen-Image transformer/config.json (20B, 60 layers: diffusers' defaults); 1328 x 1328: 166 x
        # 166 latents packed as 83 x 83 tokens; prompts at Qwen-Image's longest, 512 tokens (tdm pads to the batch's)
        "qwen-image", "qwen-image-lora.yaml", "qwen-image", "QwenImageTransformer2DModel",
        dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
        latent=(83 * 83, 64), context={"encoder_hidden_states": (512, 3584)},
        per_sample={"img_shapes": [(1, 83, 83)]}, vae_latent=(166, 166)),
    Architecture(  # 81 frames at 480 x 832: 21 latent frames of 60 x 104, channels first
        "wan2.1-t2v-1.3b", "wan2.1-t2v-1.3b-lora.yaml", "wan", "WanTransformer3DModel", _wan(12, 8960, 30),
        latent=(16, 21, 60, 104), context=WAN_TEXT, vae_latent=(21, 60, 104)),
    Architecture(  # two 14B experts (high and low noise), one called per step; 81 frames at 720 x 1280
        "wan2.2-t2v-a14b", "wan2.2-t2v-a14b-lora.yaml", "wan", "WanTransformer3DModel", _wan(40, 13824, 40),
        latent=(16, 21, 90, 160), context=WAN_TEXT, vae_latent=(21, 90, 160), experts=2,
        teacher="Wan-AI/Wan2.2-T2V-A14B-Diffusers"),
    Architecture(  # one 14B transformer; 81 frames at 720 x 1280
        "wan2.1-t2v-14b", "wan2.1-t2v-14b-lora.yaml", "wan", "WanTransformer3DModel", _wan(40, 13824, 40),
        latent=(16, 21, 90, 160), context=WAN_TEXT, vae_latent=(21, 90, 160),
        teacher="Wan-AI/Wan2.1-T2V-14B-Diffusers"),
]}


def check_latent(arch: Architecture, config) -> None:
    """The architecture's latent must match the config's sample size (VAE factor 8; video: (frames - 1) / 4 + 1
    latent frames)."""
    b = config.backbone
    frames = ((b.frames - 1) // 4 + 1,) if b.frames else ()
    if (*frames, b.height // 8, b.width // 8) != (arch.vae_latent or (*arch.latent[:len(frames)], *arch.latent[-2:])):
        raise ConfigError(f"backbone.height/width/frames: {b.height}x{b.width}, frames {b.frames} does not match "
                          f"the {arch.name} architecture's latent {arch.latent} ({arch.preset})")
