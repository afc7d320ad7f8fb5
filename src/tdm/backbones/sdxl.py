"""Stable Diffusion XL: two CLIP text encoders, pooled `text_embeds` and size `time_ids` as added conditions."""

from __future__ import annotations

import torch
from torch import Tensor

from .sd_unet import SDBackbone


class SDXLBackbone(SDBackbone):
    """SDXL teacher. Cond: prompt_embeds [B, 77, 2048], text_embeds [B, 1280], time_ids [B, 6].

    time_ids are (original size, crop top-left, target size) = (H, W, 0, 0, H, W), the pipeline's defaults;
    computed from the sample size, not cached. With no negative prompt, the unconditional embedding is zeros (the
    pipeline's force_zeros_for_empty_prompt).
    """

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    pipeline_load_kwargs = {}

    @classmethod
    def text_parts(cls, own):
        return ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

    @classmethod
    def encode_text(cls, pipeline, prompts, device, settings):
        embeds, _, pooled, _ = pipeline.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "text_embeds": pooled}

    def add_conditions(self, text):
        time_ids = self._time_ids(text["prompt_embeds"], text["text_embeds"])
        return {**text, "time_ids": time_ids.repeat(len(text["prompt_embeds"]), 1)}

    def null_text(self, text):
        if self.conditions.negative_prompt is None and self.pipeline.config.force_zeros_for_empty_prompt:
            return {key: torch.zeros_like(value) for key, value in text.items()}
        return text

    def _time_ids(self, prompt_embeds: Tensor, pooled: Tensor) -> Tensor:
        encoder_2 = self.pipeline.text_encoder_2
        projection_dim = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
        size = (self.height, self.width)
        return self.pipeline._get_add_time_ids(size, (0, 0), size, dtype=prompt_embeds.dtype,
                                               text_encoder_projection_dim=projection_dim).to(self.device)
