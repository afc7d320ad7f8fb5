"""Qwen-Image: QwenImageTransformer2DModel (MMDiT), a Qwen2.5-VL text encoder, packed 2x2 latents, flow matching with
a resolution-dependent (dynamic) shift, and true CFG with a negative prompt and norm rescaling."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError
from .diffusers_base import DiffusersBackbone, DiffusersDenoiser
from .diffusers_schedule import resolved_scheduler

MAX_SEQUENCE_LENGTH = 512  # text tokens after the template's prefix: QwenImagePipeline.__call__'s default


def true_cfg(out_cond: Tensor, out_uncond: Tensor, scale: float) -> Tensor:
    """QwenImagePipeline's true CFG: uncond + scale (cond - uncond), rescaled per token (packed latents [B, N, C])
    to the norm of the conditional output."""
    combined = out_uncond + scale * (out_cond - out_uncond)
    return combined * (torch.norm(out_cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


class QwenImageDenoiser(DiffusersDenoiser):
    """transformer(packed x_t [B, N, 4C], sigma(t), text embeds and mask, image shapes). The network's timestep is
    sigma (the pipeline passes its timestep sigma * 1000, divided by 1000); `grid` is the (rows, columns) of 2x2
    patches, set by the backbone."""

    grid: tuple[int, int] = (0, 0)

    def call(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        embeds, mask = cond["prompt_embeds"], cond["prompt_embeds_mask"]
        length = int(mask.sum(1).max())  # the batch's longest prompt: the pipeline pads a batch to it
        embeds, mask = embeds[:, :length], mask[:, :length]
        T = self.schedule.num_train_timesteps
        timestep = (self.schedule.sigma(t) * T).to(x.dtype) / T  # the pipeline's timestep / 1000, in its dtype
        return self.model(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds,
                          encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                          img_shapes=[[(1, *self.grid)]] * x.shape[0], return_dict=False)[0]


class QwenImageBackbone(DiffusersBackbone):
    """Qwen-Image teacher. Samples are the pipeline's packed latents [N, C * 4] (N = H/16 * W/16 patches of 2x2
    latents); cond: prompt_embeds [B, 512, D] (the Qwen2.5-VL last hidden states after the template's prefix,
    zero-padded) and prompt_embeds_mask [B, 512] (1 on the prompt's tokens).

    The scheduler config's dynamic shift is fixed at the backbone's resolution (`resolved_scheduler`): the
    pipeline's mu from the image sequence length N."""

    name = "qwen-image"
    pipeline_class = "QwenImagePipeline"
    denoiser_class = QwenImageDenoiser
    time_embedding_module = "model.time_text_embed.timestep_embedder"
    denoiser_name = "transformer"
    lora_layers_kwarg = "transformer_lora_layers"
    # lora_targets: the base's ("attention",) = to_q/k/v, to_out.0, as diffusers' train_dreambooth_lora_qwen_image.py
    guidance_rule = staticmethod(true_cfg)

    def __init__(self, pipeline, vae_config, conditioner, *, height: int = 0, width: int = 0, **kwargs):
        factor = self.vae_factor(vae_config) * 2  # a 2x2 patch of latents per token
        default = pipeline.default_sample_size * self.vae_factor(vae_config)
        tokens = ((height or default) // factor) * ((width or default) // factor)
        pipeline.scheduler = resolved_scheduler(pipeline.scheduler, tokens)
        super().__init__(pipeline, vae_config, conditioner, height=height, width=width, **kwargs)
        self.teacher.grid = (self.height // factor, self.width // factor)

    @classmethod
    def from_pretrained(cls, source, **kwargs):
        """DiffusersBackbone.from_pretrained, after checking that a local folder has its text encoder (diffusers
        would look for its weights in the folder itself and name no component); a prompt cache holding every
        prompt does without it."""
        folder = Path(source)
        if folder.is_dir() and not kwargs.get("prompt_cache") and not (folder / "text_encoder").is_dir():
            raise ConfigError(f"backbone.teacher: {folder} has no text_encoder/ folder (the Qwen2.5-VL text encoder "
                              f"QwenImagePipeline encodes prompts with); use the full pipeline folder, or a "
                              f"backbone.prompt_cache that holds every prompt")
        return super().from_pretrained(source, **kwargs)

    @classmethod
    def vae_factor(cls, vae_config):
        return 2 ** len(vae_config["temperal_downsample"])  # as QwenImagePipeline computes it

    def default_latent_size(self):
        size = self.pipeline.default_sample_size  # 128: 1024 pixels
        return size, size

    @property
    def sample_shape(self):
        rows, columns = self.teacher.grid
        return (rows * columns, self.denoiser.config.in_channels)  # [N, 4C], the pipeline's packed latents

    def pipeline_kwargs(self):
        # true_cfg_scale 1: one branch, as the student samples (the pipeline's default 4 only warns without a
        # negative prompt)
        return {**super().pipeline_kwargs(), "max_sequence_length": MAX_SEQUENCE_LENGTH, "true_cfg_scale": 1.0}

    @classmethod
    def text_settings(cls, denoiser_config, own):
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH}

    @classmethod
    def encode_text(cls, pipeline, prompts, device, settings):
        """encode_prompt on each prompt alone (the tokenizer pads a batch to its longest prompt, which moves the
        encoder's rounding: alone, a prompt's embeddings do not depend on its batch, so cached = in memory),
        zero-padded to max_sequence_length with its mask, so that every prompt has one shape (the network call
        cuts a batch back to its longest prompt)."""
        length, embeds = settings["max_sequence_length"], []
        mask = torch.zeros(len(prompts), length, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            embed, _ = pipeline.encode_prompt([prompt], device=device, max_sequence_length=length)
            mask[row, :embed.shape[1]] = 1
            embeds.append(torch.nn.functional.pad(embed, (0, 0, 0, length - embed.shape[1])))
        return {"prompt_embeds": torch.cat(embeds), "prompt_embeds_mask": mask}

    def decode(self, latents: Tensor) -> Tensor:
        """Packed latents [B, N, 4C] -> pixels [B, 3, H, W] in [-1, 1], as the pipeline unpacks and decodes them."""
        config, (rows, columns) = self.vae.config, self.teacher.grid
        b, _, channels = latents.shape
        latents = latents.view(b, rows, columns, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        latents = latents.reshape(b, channels // 4, 1, rows * 2, columns * 2)  # [B, C, 1 frame, h, w]
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents)
        std = torch.tensor(config.latents_std).view(shape).to(latents)
        return self.vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0][:, :, 0]  # the pipeline's arithmetic
