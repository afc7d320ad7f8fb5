"""Teacher against student on fixed conditions and seeds: one row of metrics per sampler."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..core.sampling import Model, StudentGrid, cond_to, guided, map_cond, rollout
from .metrics import frechet_distance


@dataclass
class Sampler:
    name: str
    model: Model
    grid: StudentGrid
    guidance_scale: float = 1.0  # teacher samplers use the run's CFG; students sample without guidance

    @property
    def nfe(self) -> int:
        return self.grid.num_steps * (1 if self.guidance_scale == 1.0 else 2)


@torch.no_grad()
def draw_samples(backbone: Backbone, sampler: Sampler, num_samples: int, seed: int, batch_size: int = 1000,
                 device="cpu") -> tuple[Tensor, Tensor, float]:
    """Samples (on the CPU) for the backbone's balanced evaluation conditions; returns (samples, cond, seconds).

    The noise comes from a CPU generator seeded with `seed`, so every sampler sees the same noise."""
    cond = backbone.evaluation_conditions(num_samples)
    noise = torch.randn((num_samples, *backbone.sample_shape), generator=torch.Generator().manual_seed(seed))
    out, tic = [], time.perf_counter()
    for start in range(0, num_samples, batch_size):
        x = noise[start:start + batch_size].to(device)
        rows = slice(start, start + batch_size)
        c = cond_to(map_cond(lambda v, rows=rows: v[rows], cond), device)
        model = guided(sampler.model, cond_to(backbone.null_condition(x.shape[0]), device), sampler.guidance_scale)
        out.append(rollout(model, x, c, sampler.grid, backbone.schedule, backbone.prediction).cpu())
    return torch.cat(out), cond, time.perf_counter() - tic


def compare(backbone: Backbone, samplers: list[Sampler], reference: Sampler, num_samples: int,
            seed: int, device="cpu") -> tuple[list[dict], dict[str, Tensor]]:
    """Metrics per sampler, plus `fd_<reference>`: Frechet distance in the backbone's features to the
    reference sampler's samples drawn with other seeds (seed + 1). Returns rows and the samples per sampler."""
    ref_samples, _, _ = draw_samples(backbone, reference, num_samples, seed + 1, device=device)
    ref_features = backbone.features(ref_samples)
    rows, samples = [], {}
    for s in samplers:
        x, cond, seconds = draw_samples(backbone, s, num_samples, seed, device=device)
        row = {"sampler": s.name, "steps": s.grid.num_steps, "nfe": s.nfe, **backbone.metrics(x, cond),
               f"fd_{reference.name}": frechet_distance(backbone.features(x), ref_features),
               "seconds_per_100": 100 * seconds / num_samples}
        rows.append(row)
        samples[s.name] = x
    return rows, samples
