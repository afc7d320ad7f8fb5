"""What a diffusers family says about its prompts, and the Backbone's conditions built from them.

A family file overrides the hooks: which pipeline components encode prompts (`text_parts`), with which settings
(`text_settings`), the pipeline's own `encode_prompt` call (`encode_text`: bit for bit what the stock pipeline feeds
its network), the conditions it computes from the sample size (`add_conditions`) and its rule for the unconditional
embeddings (`null_text`). The text embeddings are encoded and cached by tdm.data.conditioning;
tdm.data.prompt_conditions draws the training, null and evaluation conditions (method.md E) that
`sample_conditions`, `null_condition` and `evaluation_conditions` return.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.conditioning import TextEncoding
from ..data.prompt_conditions import PromptConditions
from .diffusers_pipeline import import_diffusers, pipeline_folder


class DiffusersConditioning:
    """Mixed into DiffusersBackbone, which gives `name`, `pipeline_class`, `denoiser_name`, `pipeline_load_kwargs`,
    `extra_load_kwargs` and, once built, `conditions`."""

    conditions: PromptConditions
    other_networks: tuple[str, ...] = ()  # pipeline networks besides `denoiser_name` (Wan 2.2's transformer_2)

    # ---- the family's prompt encoding (text embeddings: cacheable; run by tdm.data.conditioning) ----
    @classmethod
    def text_encoding(cls, own: dict) -> TextEncoding:
        """How this family's pipeline encodes prompts, given family arguments `own`."""
        skip = {"vae": None, cls.denoiser_name: None, **dict.fromkeys(cls.other_networks),  # loads text parts
                **cls.pipeline_load_kwargs}                                                     # and scheduler

        def load_pipeline(source: str | Path, dtype: torch.dtype):
            pipeline_cls = getattr(import_diffusers(), cls.pipeline_class)
            return pipeline_cls.from_pretrained(source, dtype=dtype, **skip, **cls.extra_load_kwargs(own))

        return TextEncoding(family=cls.name, parts=cls.text_parts(own), denoiser_name=cls.denoiser_name,
                            settings_of=lambda config: cls.text_settings(config, own), encode=cls.encode_text,
                            load_pipeline=load_pipeline,
                            download=lambda model: pipeline_folder(cls.pipeline_class, model, **skip))

    @classmethod
    def text_parts(cls, own: dict) -> tuple[str, ...]:
        """The pipeline components that encode prompts (text encoders, tokenizers), given family arguments `own`."""
        return ("text_encoder", "tokenizer")

    @classmethod
    def text_settings(cls, denoiser_config: Mapping, own: dict) -> dict[str, Any]:
        """Settings of `encode_text` besides the text parts' files (e.g. max sequence length); part of the cache key."""
        return {}

    @classmethod
    def encode_text(cls, pipeline, prompts: list[str], device: torch.device, settings: dict) -> dict[str, Tensor]:
        """The pipeline's `encode_prompt` on `prompts`, without CFG: each key [B, ...], one fixed shape per prompt."""
        raise NotImplementedError

    # ---- what the family computes rather than encodes (never cached) ----
    def add_conditions(self, text: dict[str, Tensor]) -> dict[str, Tensor]:
        """Conditioning from text embeddings: the family's size conditions added, computed from height and width."""
        return text

    def null_text(self, text: dict[str, Tensor]) -> dict[str, Tensor]:
        """The unconditional text embeddings, from the null prompt's (the pipeline's rule; SDXL may zero them)."""
        return text

    # ---- the Backbone's conditions, drawn by `conditions` ----
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Conditioning for `prompts`, exactly as the stock pipeline encodes them."""
        return self.conditions.encode(prompts)

    def sample_conditions(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        return self.conditions.sample(batch, generator)

    def sample_prompted_conditions(self, batch: int, generator: torch.Generator) -> tuple[dict[str, Tensor], list[str]]:
        return self.conditions.sample_with_prompts(batch, generator)

    def null_condition(self, batch: int) -> dict[str, Tensor]:
        return self.conditions.null(batch)

    def evaluation_prompts(self, num_samples: int) -> list[str]:
        return self.conditions.evaluation_prompts(num_samples)

    def evaluation_conditions(self, num_samples: int, chunk: int = 64) -> dict[str, Tensor]:
        return self.conditions.evaluation(num_samples, chunk)
