"""Prompt conditioning of a diffusers teacher: the text embeddings its pipeline's own `encode_prompt` gives, read
from the on-disk prompt cache (tdm.data.cache) or encoded in memory, and the life of the text encoders around it.

TDM needs the embeddings of every training prompt and of the negative prompt, c and c_null (method.md E,
Algorithm line 1). A family says how its pipeline encodes (`TextEncoding`: which components, which settings, its
encode call, how to load and fetch them); `PromptConditioner` runs that for one loaded pipeline. With a cache, the
text encoders are loaded only to encode the prompts it lacks (each once, under its file lock) and released right
after; `tdm cache-prompts --family NAME` fills the same cache (same `fingerprint`) with `prompt_encoder`.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.sampling import cond_to
from .cache import EmbeddingCache, EncodeFn
from .fingerprint import model_fingerprint
from .long_prompts import LongPromptWarning, quiet_truncation

EncodeTextFn = Callable[[Any, list[str], torch.device, dict], dict[str, Tensor]]  # (pipeline, prompts, device,
                                                                                 # settings) -> each key [B, ...]


@dataclass(frozen=True)
class TextEncoding:
    """How one diffusers family encodes prompts with its stock pipeline, as its backbone class states it."""

    family: str                                          # the backbone name, part of the cache key
    parts: tuple[str, ...]                               # pipeline components that encode: text encoders, tokenizers
    settings_of: Callable[[Mapping], dict[str, Any]]     # network config -> encode settings (max_sequence_length)
    encode: EncodeTextFn                                 # the pipeline's `encode_prompt`, no CFG, fixed shapes
    load_pipeline: Callable[[str | Path, torch.dtype], Any]  # (source, dtype) -> pipeline without network and VAE
    download: Callable[[str], Path]                      # hub id -> pipeline folder without network and VAE weights
    denoiser_name: str                                   # the network's component (its config.json gives settings)

    def settings(self, folder: Path) -> dict[str, Any]:
        """`settings_of` the network's config.json in the pipeline folder `folder` (read, not loaded)."""
        return self.settings_of(json.loads((Path(folder) / self.denoiser_name / "config.json").read_text()))

    def fingerprint(self, folder: Path, dtype: torch.dtype) -> str:
        """The cache key of these embeddings for the pipeline in `folder`: the text parts' files, the family, dtype
        and settings (reads files; loads nothing)."""
        return model_fingerprint(*(Path(folder) / part for part in self.parts), family=self.family, dtype=str(dtype),
                                 **self.settings(folder))

    def fetch(self, model: str) -> Path:
        """The pipeline folder of hub id `model` with its text parts, scheduler and configs, not the weights of its
        network or VAE (downloaded, or found in the hub cache)."""
        from huggingface_hub import hf_hub_download

        folder = self.download(model)
        hf_hub_download(model, "config.json", subfolder=self.denoiser_name)  # `settings` reads it
        return folder

    def load(self, source: str | Path, dtype: torch.dtype):
        """The pipeline with only its text parts (and scheduler) loaded, frozen, on the CPU."""
        pipeline = self.load_pipeline(source, dtype)
        for part in self.parts:
            if isinstance(getattr(pipeline, part), nn.Module):
                getattr(pipeline, part).requires_grad_(False)
        return pipeline


class PromptConditioner:
    """Text embeddings of prompts for one loaded `pipeline` on `device`: read from the prompt cache `cache` (its
    misses encoded into it first) or, without one, encoded in memory. `source` and `dtype` reload the text parts
    after `release`."""

    def __init__(self, pipeline, text: TextEncoding, settings: dict[str, Any], *, source: str | Path,
                 dtype: torch.dtype, device: torch.device | str, cache: EmbeddingCache | None = None):
        self.pipeline, self.text, self.settings, self.cache = pipeline, text, settings, cache
        self.source, self.dtype, self.device = source, dtype, torch.device(device)
        self.long_prompts = LongPromptWarning()

    @property
    def loaded(self) -> bool:
        """Whether the pipeline holds its text parts (not after `release`, nor when every prompt was cached)."""
        return all(getattr(self.pipeline, part, None) is not None for part in self.text.parts)

    def prepare(self, prompts: list[str]) -> None:
        """At loading: the long-prompt warning, checked once for every prompt it will encode (while the encoders are
        loaded), and the cache filled with `prompts`."""
        if self.loaded:
            self.long_prompts.check(self.pipeline, prompts, self.settings)
        self.fill(prompts)

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """The text embeddings of `prompts` on `device`, each key [len(prompts), ...]."""
        if self.cache is None:
            return self.encode_loaded(prompts)
        self.fill(prompts)
        return cond_to(self.cache.embeddings(prompts).batch(range(len(prompts))), self.device)

    def fill(self, prompts: Iterable[str]) -> int:
        """Encode the prompts the cache lacks into it (loading the text parts for that, if released, and releasing
        them after). Returns how many were encoded (0 without a cache)."""
        missing = [] if self.cache is None else self.cache.missing(prompts)
        if not missing:
            return 0
        if not self.loaded:
            self.load()
        try:
            return self.cache.encode_missing(missing, self.encode_loaded)
        finally:
            self.release()

    @torch.no_grad()
    def encode_loaded(self, prompts: list[str]) -> dict[str, Tensor]:
        """The family's encode call on the loaded text parts (truncation logs silenced: `long_prompts` counts)."""
        with quiet_truncation(self.pipeline):
            return self.text.encode(self.pipeline, prompts, self.device, self.settings)

    def load(self) -> None:
        """Load the released text parts onto the pipeline, on `device`."""
        loaded = self.text.load(self.source, self.dtype)
        for part in self.text.parts:
            module = getattr(loaded, part)
            setattr(self.pipeline, part, module.to(self.device) if isinstance(module, nn.Module) else module)

    def release(self) -> None:
        """Drop the text parts from the pipeline and free their memory (training reads the prompt cache)."""
        for part in self.text.parts:
            setattr(self.pipeline, part, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def prompt_encoder(text: TextEncoding, folder: Path, device: torch.device | str, dtype: torch.dtype) -> EncodeFn:
    """The encode function of `tdm cache-prompts --family NAME`: the text parts of the pipeline in `folder`, loaded
    for the family's default arguments, so it fills the cache a backbone with defaults reads."""
    conditioner = PromptConditioner(text.load(folder, dtype).to(device), text, text.settings(folder), source=folder,
                                    dtype=dtype, device=device)

    def encode(prompts: list[str]) -> dict[str, Tensor]:
        conditioner.long_prompts.check(conditioner.pipeline, prompts, conditioner.settings)
        return conditioner.encode_loaded(prompts)

    return encode
