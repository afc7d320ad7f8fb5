"""Validation grids during training (train.validation_every): the student's samples at its trained K on fixed
prompts and fixed noise, so grids of successive iterations differ only by what the student learned."""

from __future__ import annotations

import numpy as np
import torch

from .backbones.base import Backbone
from .core.sampling import Cond, cond_to, rollout
from .errors import ConfigError
from .report import image_grid
from .samplers import Sampler

GRID_COLUMNS = 4


def check_validation(backbone: Backbone, every: int, prompts: tuple[str, ...]) -> None:
    """A ConfigError where the run asks for a validation grid the backbone cannot give (none: nothing to check)."""
    if not every:
        return
    if not backbone.is_image:
        raise ConfigError(f"train.validation_every: the {backbone.name} teacher makes no images (set it to 0)")
    if prompts and not hasattr(backbone, "encode_prompts"):
        raise ConfigError(f"train.validation_prompts: the {backbone.name} teacher takes no text prompts "
                          f"(leave it empty: the grid uses its evaluation conditions)")


def validation_conditions(backbone: Backbone, prompts: tuple[str, ...], count: int) -> tuple[Cond, list[str] | None]:
    """The grid's conditions and their text: `prompts` encoded, or else the first `count` evaluation conditions."""
    if prompts:
        return backbone.encode_prompts(list(prompts)), list(prompts)
    return backbone.evaluation_conditions(count), backbone.evaluation_prompts(count)


@torch.no_grad()
def validation_grid(backbone: Backbone, sampler: Sampler, cond: Cond, count: int, seed: int, device) -> np.ndarray:
    """One HWC uint8 grid of `sampler`'s samples for `count` conditions, from noise seeded with `seed`."""
    noise = torch.randn((count, *backbone.sample_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    samples = rollout(sampler.model, noise, cond_to(cond, device), sampler.grid, backbone.schedule,
                      backbone.prediction)
    return image_grid(backbone.to_images(samples.cpu()), nrow=min(count, GRID_COLUMNS))
