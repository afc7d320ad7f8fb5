"""Z-Image: ZImageTransformer2DModel (single-stream DiT), flow matching, a Qwen3 text encoder.

What the family needs that the others do not: the network takes lists (one latent [C, 1, h, w] and one caption of
its own length per sample) and predicts x0 - noise (the pipeline negates it) at timestep 1 - sigma; the captions are
the Qwen3 chat-templated prompt's second-to-last hidden states with the padding dropped, kept here padded to the
encoder's max length with a mask so that they batch and cache; the pipeline's CFG is pos + g (pos - neg), tdm's
w = g + 1; its guidance_scale 0 (not 1) runs one unguided branch; a dynamic-shift scheduler config is resolved at
the backbone's resolution as the pipeline computes mu.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError
from .diffusers_base import DiffusersBackbone, DiffusersDenoiser
from .diffusers_schedule import resolved_scheduler

MAX_SEQUENCE_LENGTH = 512  # Qwen3 tokens, the pipeline's default
DEFAULT_SIZE = 1024        # pixels, the pipeline's default height and width
TURBO = "z-image-turbo"    # the distilled release, refused as a teacher (README: Z-Image)


class ZImageDenoiser(DiffusersDenoiser):
    """transformer([x_t[i] as [C, 1, h, w]], 1 - sigma, [caption i without padding]) as ZImagePipeline calls it;
    its output is x0 - noise, negated here into tdm's flow prediction noise - x0."""

    def call(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        T = self.schedule.num_train_timesteps
        timestep = (T - self.schedule.sigma(t) * T) / T  # the pipeline's (1000 - sigma * 1000) / 1000
        captions = [embeds[mask] for embeds, mask in zip(cond["prompt_embeds"], cond["prompt_mask"])]
        out = self.model(list(x.unsqueeze(2).unbind(0)), timestep, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


class ZImageBackbone(DiffusersBackbone):
    """Z-Image teacher. Samples [C, h, w]; cond: prompt_embeds [B, 512, D] (Qwen3 hidden states, zeros after each
    caption), prompt_mask [B, 512] (bool, the caption's tokens)."""

    name = "z-image"
    pipeline_class = "ZImagePipeline"
    denoiser_class = ZImageDenoiser
    time_embedding_module = "model.t_embedder"
    denoiser_name = "transformer"
    lora_layers_kwarg = "transformer_lora_layers"
    unguided_scale = 0.0  # ZImagePipeline guides whenever guidance_scale > 0

    def __init__(self, pipeline, vae_config, conditioner, *, height: int = 0, width: int = 0, **kwargs):
        # the pipeline's image_seq_len: latent patches of (VAE factor x patch size) pixels each
        step = 2 ** (len(vae_config["block_out_channels"]) - 1) * self._patch(pipeline)
        h, w = ((size or DEFAULT_SIZE) // step for size in (height, width))
        pipeline.scheduler = resolved_scheduler(pipeline.scheduler, h * w)
        super().__init__(pipeline, vae_config, conditioner, height=height, width=width, **kwargs)

    @staticmethod
    def _patch(pipeline) -> int:
        return pipeline.transformer.config.all_patch_size[0]

    @classmethod
    def from_pretrained(cls, source: str, **kwargs) -> ZImageBackbone:
        if TURBO in Path(str(source)).name.lower():
            raise ConfigError(f"backbone.teacher: {source} is Z-Image-Turbo, already an 8-step distilled student "
                              f"without classifier-free guidance; TDM distils an undistilled teacher: set "
                              f"backbone.teacher=Tongyi-MAI/Z-Image")
        missing = [part for part in cls.text_parts({}) if not (Path(source) / part).is_dir()]
        if Path(source).is_dir() and missing and not kwargs.get("prompt_cache"):
            raise ConfigError(f"backbone.teacher: {source} has no {missing[0]}/ (ZImagePipeline encodes prompts with "
                              f"its Qwen3 text encoder and tokenizer); add it, or set backbone.prompt_cache to a "
                              f"cache that tdm cache-prompts filled")
        return super().from_pretrained(source, **kwargs)

    def default_latent_size(self):
        return (DEFAULT_SIZE // self.vae_scale_factor,) * 2

    def patch_size(self):
        return self._patch(self.pipeline)

    def pipeline_kwargs(self):
        return {**super().pipeline_kwargs(), "max_sequence_length": MAX_SEQUENCE_LENGTH}

    @classmethod
    def text_settings(cls, denoiser_config, own):
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH}

    @classmethod
    def encode_text(cls, pipeline, prompts, device, settings):
        length = settings["max_sequence_length"]
        # a copy: _encode_prompt writes the chat-templated text into the list it is given
        captions, _ = pipeline.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False,
                                             max_sequence_length=length)
        embeds = captions[0].new_zeros(len(captions), length, captions[0].shape[-1])
        mask = torch.zeros(len(captions), length, dtype=torch.bool, device=embeds.device)
        for row, caption in enumerate(captions):
            embeds[row, :len(caption)], mask[row, :len(caption)] = caption, True
        return {"prompt_embeds": embeds, "prompt_mask": mask}
