"""Stable Diffusion XL: two CLIP text encoders, pooled `text_embeds` and size `time_ids` as added conditions."""

from __future__ import annotations

from torch import Tensor

from .sd_unet import SDBackbone


class SDXLBackbone(SDBackbone):
    """SDXL teacher. Cond: prompt_embeds [B, 77, 2048], text_embeds [B, 1280], time_ids [B, 6].

    time_ids are (original size, crop top-left, target size) = (H, W, 0, 0, H, W), the pipeline's defaults.
    With no negative prompt, the unconditional embedding is zeros (the pipeline's force_zeros_for_empty_prompt).
    """

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    pipeline_load_kwargs = {}

    def encode(self, prompts, with_negative):
        pos, neg, pooled, neg_pooled = self.pipeline.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=with_negative,
            negative_prompt=self.negative_prompt)
        time_ids = self._time_ids(pos, pooled).repeat(len(prompts), 1)
        cond = {"prompt_embeds": pos, "text_embeds": pooled, "time_ids": time_ids}
        return cond, (None if neg is None else {"prompt_embeds": neg, "text_embeds": neg_pooled, "time_ids": time_ids})

    def _time_ids(self, prompt_embeds: Tensor, pooled: Tensor) -> Tensor:
        encoder_2 = self.pipeline.text_encoder_2
        projection_dim = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
        size = (self.height, self.width)
        return self.pipeline._get_add_time_ids(size, (0, 0), size, dtype=prompt_embeds.dtype,
                                               text_encoder_projection_dim=projection_dim).to(self.device)
