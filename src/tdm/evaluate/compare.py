"""Samplers against each other on fixed conditions and seeds: one row of metrics and timings per sampler.

Every sampler draws the same noise (a CPU generator seeded with `seed`) for the same balanced conditions, so
rows and grid columns compare like with like. Scores come from `SetScorer`s: the backbone's own metrics,
`FeatureDistances` (FD and KID to reference sets), CLIP and preference scores.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backbones.base import Backbone
from ..core.algorithm import TDMConfig, bind_steps, make_grid
from ..core.sampling import Cond, Model, StudentGrid, cond_to, guided, map_cond, rollout, teacher_grid
from ..core.schedules import Schedule
from .metrics import frechet_distance, kernel_distance

SetScorer = Callable[[Tensor, Cond], dict[str, float]]  # (samples [N, ...], their conditions) -> metrics


@dataclass
class Sampler:
    name: str          # key in metrics.json, e.g. "teacher50", "student4"
    model: Model
    grid: StudentGrid
    guidance_scale: float = 1.0  # teacher samplers use the run's CFG; students sample without guidance
    label: str = ""    # for tables and grids, e.g. "teacher, 50 DDIM steps, CFG 2"
    kind: str = "student"  # teacher | baseline | student (plot markers)

    @property
    def nfe(self) -> int:
        return self.grid.num_steps * (1 if self.guidance_scale == 1.0 else 2)


def teacher_samplers(teacher: Model, schedule: Schedule, steps: Sequence[int], guidance_scale: float) -> list[Sampler]:
    return [Sampler(f"teacher{n}", teacher, teacher_grid(schedule, n), guidance_scale,
                    f"teacher, {n} DDIM steps, CFG {guidance_scale:g}", "teacher") for n in steps]


def student_samplers(student: Model, config: TDMConfig, schedule: Schedule, steps: Sequence[int],
                     prefix: str = "student", label: str = "student", kind: str = "student") -> list[Sampler]:
    """The student at each step count, on its own grid at its trained K and the uniform grid otherwise;
    a TDM-unify student is given the step count as input."""
    return [Sampler(f"{prefix}{k}", bind_steps(student, config, k),
                    make_grid(config, schedule, k), label=f"{label}, {k} step{'s' * (k > 1)}", kind=kind)
            for k in steps]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def warm_up(backbone: Backbone, sampler: Sampler, batch_size: int, device="cpu") -> None:
    """One model evaluation (the first step, with guidance) at the timed batch size, before any timing."""
    x = torch.randn((batch_size, *backbone.sample_shape), device=device)
    cond = cond_to(backbone.evaluation_conditions(batch_size), device)
    model = guided(sampler.model, cond_to(backbone.null_condition(batch_size), device), sampler.guidance_scale)
    rollout(model, x, cond, sampler.grid, backbone.schedule, backbone.prediction, stop_level=sampler.grid.num_steps)
    _sync(device)


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
    _sync(device)
    return torch.cat(out), cond, time.perf_counter() - tic


def latency_seconds(backbone: Backbone, sampler: Sampler, seed: int, repeats: int, device="cpu") -> float:
    """Median wall time of one single-sample generation over `repeats` runs, after a warm-up call."""
    warm_up(backbone, sampler, 1, device)
    return statistics.median(draw_samples(backbone, sampler, 1, seed, device=device)[2] for _ in range(repeats))


class FeatureDistances:
    """Frechet distance and KID of a sample set to fixed reference sets, in one feature space.

    `features` maps samples to [N, D]; `references` maps a name (the column suffix) to reference features.
    Returns `fd_<name>`, `kid_<name>` and `kid_<name>_std` (spread over KID's subsets)."""

    def __init__(self, features: Callable[[Tensor], Tensor], references: dict[str, Tensor],
                 kid_subsets: int = 100, kid_subset_size: int = 1000):
        self.features, self.references = features, references
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size

    def __call__(self, samples: Tensor, cond: Cond) -> dict[str, float]:
        feats, out = self.features(samples), {}
        for name, ref in self.references.items():
            kid = kernel_distance(feats, ref, self.kid_subsets, self.kid_subset_size)
            out.update({f"fd_{name}": frechet_distance(feats, ref), f"kid_{name}": kid.mean,
                        f"kid_{name}_std": kid.std})
        return out


def compare(backbone: Backbone, samplers: Sequence[Sampler], num_samples: int, seed: int,
            scorers: Sequence[SetScorer], device="cpu", batch_size: int = 1000,
            latency_repeats: int = 0) -> tuple[list[dict], dict[str, Tensor]]:
    """One row per sampler: name, label, steps, NFE, every scorer's metrics and the timings; plus the samples.

    Timings (wall clock, no grad, after a warm-up model call at the batch size): `ms_per_sample` and
    `samples_per_s` over all `num_samples` in batches of `batch_size`; `latency_ms`, one sample at a time
    (median of `latency_repeats` runs), when latency_repeats > 0."""
    rows, samples = [], {}
    for s in samplers:
        warm_up(backbone, s, min(batch_size, num_samples), device)
        x, cond, seconds = draw_samples(backbone, s, num_samples, seed, batch_size, device)
        row = {"sampler": s.name, "label": s.label or s.name, "kind": s.kind, "steps": s.grid.num_steps,
               "nfe": s.nfe}
        for score in scorers:
            row.update(score(x, cond))
        row.update({"ms_per_sample": 1000 * seconds / num_samples, "samples_per_s": num_samples / seconds})
        if latency_repeats > 0:
            row["latency_ms"] = 1000 * latency_seconds(backbone, s, seed, latency_repeats, device)
        rows.append(row)
        samples[s.name] = x
    return rows, samples


def compare_to_reference(backbone: Backbone, samplers: Sequence[Sampler], num_samples: int, seed: int,
                         features: Callable[[Tensor], Tensor] | None, extra_references: dict[str, Tensor] | None = None,
                         extra_scorers: Sequence[SetScorer] = (), device="cpu", batch_size: int = 1000,
                         latency_repeats: int = 0) -> dict:
    """`compare` with the backbone's metrics and FD / KID in `features` to samples of the first sampler (the
    reference teacher) drawn with other seeds (seed + 1) and to `extra_references`; the reference's own row is
    the teacher-vs-teacher floor. KID uses 100 subsets of min(1000, N / 2), so its spread is informative.
    Returns {rows, samples, floor (the backbone's metrics of real data), reference}."""
    reference = samplers[0]
    scorers: list[SetScorer] = [backbone.metrics]
    if features is not None:
        ref_samples, _, _ = draw_samples(backbone, reference, num_samples, seed + 1, batch_size, device)
        references = {reference.name: features(ref_samples), **(extra_references or {})}
        scorers.append(FeatureDistances(features, references, kid_subset_size=min(1000, max(2, num_samples // 2))))
    rows, samples = compare(backbone, samplers, num_samples, seed, [*scorers, *extra_scorers], device, batch_size,
                            latency_repeats)
    return {"rows": rows, "samples": samples, "floor": backbone.floor_metrics(num_samples),
            "reference": reference.name}
