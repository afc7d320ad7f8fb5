"""The conditions a text-conditioned teacher gives TDM: training prompts drawn for a batch (c in method.md E,
Algorithm line 1), the null condition of classifier-free guidance (c_null: the negative prompt, or the empty one) and
fixed evaluation prompts. Their text embeddings come from a `PromptConditioner` (tdm.data.conditioning: the prompt
cache or the text encoders); the family completes them with what it computes rather than encodes (SDXL's time_ids,
PixArt-1024's resolution and aspect ratio) and may replace the null prompt's (SDXL zeros the empty prompt's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..core.sampling import map_cond
from ..errors import ConfigError
from .conditioning import PromptConditioner

TextFn = Callable[[dict[str, Tensor]], dict[str, Tensor]]  # text embeddings -> conditions, each key [B, ...]


def _unchanged(text: dict[str, Tensor]) -> dict[str, Tensor]:
    return text


class PromptConditions:
    """Conditions of the `family` teacher from its training `prompts` and `negative_prompt` (None: the pipeline's
    own default), on the conditioner's device. `add_conditions` completes text embeddings into conditions;
    `null_text` gives the unconditional text embeddings from the null prompt's."""

    def __init__(self, conditioner: PromptConditioner, *, family: str, prompts: Sequence[str] = (),
                 negative_prompt: str | None = None, add_conditions: TextFn = _unchanged,
                 null_text: TextFn = _unchanged):
        self.conditioner, self.family = conditioner, family
        self.add_conditions, self.null_text = add_conditions, null_text
        self.prompts = list(prompts)
        self.negative_prompt = negative_prompt or None
        self._null: dict[str, Tensor] | None = None

    @property
    def null_prompt(self) -> str:
        """The prompt encoded for the unconditional branch of CFG: the negative prompt, or the empty one."""
        return self.negative_prompt or ""

    def prepare(self) -> None:
        """At loading: every training prompt and the null prompt checked and cached (`PromptConditioner.prepare`)."""
        self.conditioner.prepare([*self.prompts, self.null_prompt])

    def to(self, device: torch.device) -> None:
        """Encode onto `device` from now on (the null condition is encoded again there)."""
        self.conditioner.device = device
        self._null = None

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Conditions for `prompts`, exactly as the stock pipeline encodes them."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode_prompts takes a list of strings")
        return self.add_conditions(self.conditioner.encode(list(prompts)))

    def null(self, batch: int) -> dict[str, Tensor]:
        """The negative-prompt conditions the pipeline uses for CFG, repeated `batch` times (encoded once)."""
        if self._null is None:
            self._null = self.add_conditions(self.null_text(self.conditioner.encode([self.null_prompt])))
        return map_cond(lambda v: v.expand(batch, *v.shape[1:]).contiguous(), self._null)

    def sample(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        """`batch` training prompts drawn uniformly with `generator`, encoded."""
        return self.sample_with_prompts(batch, generator)[0]

    def sample_with_prompts(self, batch: int, generator: torch.Generator) -> tuple[dict[str, Tensor], list[str]]:
        """`sample`'s conditions (the same draw) and the prompts they encode."""
        if not self.prompts:
            raise ConfigError(f"backbone.prompts: the {self.family} teacher has no training prompts")
        index = torch.randint(len(self.prompts), (batch,), generator=generator, device=generator.device)
        prompts = [self.prompts[i] for i in index.tolist()]
        return self.encode(prompts), prompts

    def evaluation_prompts(self, num_samples: int) -> list[str]:
        """The training prompts in order, cycled to `num_samples` (fixed for every sampler)."""
        if not self.prompts:
            raise ConfigError(f"backbone.prompts: the {self.family} teacher has no prompts to evaluate on")
        return [self.prompts[i % len(self.prompts)] for i in range(num_samples)]

    def evaluation(self, num_samples: int, chunk: int = 64) -> dict[str, Tensor]:
        """The conditions of `evaluation_prompts(num_samples)`, encoded `chunk` prompts at a time."""
        prompts = self.evaluation_prompts(num_samples)
        self.conditioner.fill(prompts)  # all cache misses in one go, not one encoder load per chunk
        parts = [self.encode(prompts[i:i + chunk]) for i in range(0, num_samples, chunk)]
        return map_cond(lambda *vs: torch.cat(vs), *parts)
