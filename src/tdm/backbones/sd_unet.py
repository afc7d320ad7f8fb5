"""Stable Diffusion 1.x / 2.x: UNet2DConditionModel with one CLIP text encoder, epsilon or v prediction."""

from __future__ import annotations

from torch import Tensor

from ..errors import ConfigError
from .diffusers_base import DiffusersBackbone, DiffusersDenoiser


class UNetDenoiser(DiffusersDenoiser):
    """unet(x_t, t, prompt_embeds); SDXL's added conditions (text_embeds, time_ids) when the cond has them."""

    def call(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond} or None
        return self.model(x, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added,
                          return_dict=False)[0]


class SDBackbone(DiffusersBackbone):
    """SD 1.5 / SD 2.x teacher. Cond: prompt_embeds [B, 77, D]."""

    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_class = UNetDenoiser
    denoiser_name = "unet"
    time_embedding_module = "model.time_embedding"  # where TDM-unify adds its step embedding
    lora_layers_kwarg = "unet_lora_layers"
    # training never decodes through the safety checker; do not load it
    pipeline_load_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
            raise ConfigError(f"backbone.teacher: {self.source} has a guidance-embedding UNet (time_cond_proj_dim); "
                              f"tdm distils plain CFG teachers")

    @classmethod
    def encode_text(cls, pipeline, prompts, device, settings):
        embeds, _ = pipeline.encode_prompt(prompts, device, 1, False)
        return {"prompt_embeds": embeds}
