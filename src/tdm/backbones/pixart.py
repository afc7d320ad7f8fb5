"""PixArt-alpha: PixArtTransformer2DModel with a T5 encoder (attention mask), learned sigma, 1024 micro-conditions."""

from __future__ import annotations

import torch
from torch import Tensor

from .diffusers_base import DiffusersBackbone, DiffusersDenoiser

MAX_SEQUENCE_LENGTH = 120  # T5 tokens, the pipeline's default (and the official TDM script's)


class PixArtDenoiser(DiffusersDenoiser):
    """transformer(x_t, t, T5 embeds + mask, resolution / aspect ratio); the learned-variance half is dropped."""

    def call(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        added = {"resolution": cond.get("resolution"), "aspect_ratio": cond.get("aspect_ratio")}
        out = self.model(x, encoder_hidden_states=cond["prompt_embeds"],
                         encoder_attention_mask=cond["prompt_attention_mask"], timestep=t, added_cond_kwargs=added,
                         return_dict=False)[0]
        if self.model.config.out_channels // 2 == x.shape[1]:  # learned sigma: [eps, variance] along channels
            out = out.chunk(2, dim=1)[0]
        return out


class PixArtAlphaBackbone(DiffusersBackbone):
    """PixArt-alpha teacher. Cond: prompt_embeds [B, 120, 4096], prompt_attention_mask [B, 120]; at sample_size
    128 (the 1024 model) also resolution [B, 2] and aspect_ratio [B, 1], as the pipeline passes them.

    PixArt has no diffusers LoRA loader: exports are peft state dicts (see tdm.export)."""

    name = "pixart-alpha"
    pipeline_class = "PixArtAlphaPipeline"
    denoiser_class = PixArtDenoiser
    time_embedding_module = "model.adaln_single.emb.timestep_embedder"
    denoiser_name = "transformer"
    lora_layers_kwarg = None

    def pipeline_kwargs(self):
        return {**super().pipeline_kwargs(), "max_sequence_length": MAX_SEQUENCE_LENGTH, "clean_caption": False,
                "use_resolution_binning": False}

    @classmethod
    def text_settings(cls, denoiser_config, own):
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH, "clean_caption": False}

    @classmethod
    def encode_text(cls, pipeline, prompts, device, settings):
        embeds, mask, _, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                    clean_caption=settings["clean_caption"],
                                                    max_sequence_length=settings["max_sequence_length"])
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}  # the mask: int64 [B, 120]

    def add_conditions(self, text):
        return {**text, **self._micro_conditions(len(text["prompt_embeds"]), text["prompt_embeds"].dtype)}

    def _micro_conditions(self, batch: int, dtype: torch.dtype) -> dict[str, Tensor]:
        if self.denoiser.config.sample_size != 128:  # the pipeline's rule: only the 1024 model takes them
            return {}
        resolution = torch.tensor([self.height, self.width]).repeat(batch, 1)
        aspect_ratio = torch.tensor([float(self.height / self.width)]).repeat(batch, 1)
        return {"resolution": resolution.to(dtype=dtype, device=self.device),
                "aspect_ratio": aspect_ratio.to(dtype=dtype, device=self.device)}
