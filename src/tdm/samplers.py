"""Sampling that training (its periodic samples and metrics), evaluation and the benchmarks share: a named sampler
(a model, its step grid, its guidance), the teacher's DDIM samplers and the student's rollouts at each step count,
seeded sample sets and timings.

`draw_samples` draws the noise from a CPU generator seeded with `seed`, so every sampler sees the same noise for
the same balanced conditions and samples compare like with like. Under a multi-process launch each process rolls
out its share of whole batches (tdm.processes) and the main process gathers them: the samples are the ones a
single process draws with the same batch size, bit for bit.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .backbones.base import Backbone
from .core.algorithm import TDMConfig, bind_steps, make_grid
from .core.sampling import Model, StudentGrid, cond_to, guided, map_cond, rollout, teacher_grid
from .core.schedules import Schedule
from .processes import ONE_PROCESS, Processes


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
    model = guided(sampler.model, cond_to(backbone.null_condition(batch_size), device), sampler.guidance_scale,
                   backbone.guidance_rule)
    rollout(model, x, cond, sampler.grid, backbone.schedule, backbone.prediction, stop_level=sampler.grid.num_steps)
    _sync(device)


@torch.no_grad()
def draw_samples(backbone: Backbone, sampler: Sampler, num_samples: int, seed: int, batch_size: int = 1000,
                 device="cpu", processes: Processes = ONE_PROCESS) -> tuple[Tensor | None, Tensor, float]:
    """Samples (on the CPU) for the backbone's balanced evaluation conditions; returns (samples, cond, seconds).

    The noise comes from a CPU generator seeded with `seed`, so every sampler sees the same noise. With several
    `processes`, each rolls out its batches; the main process gets all samples (seconds: the whole group's wall
    time, gather included), the others None."""
    cond = backbone.evaluation_conditions(num_samples)
    noise = torch.randn((num_samples, *backbone.sample_shape), generator=torch.Generator().manual_seed(seed))
    processes.barrier()
    out, tic = [], time.perf_counter()
    for start in processes.batch_starts(num_samples, batch_size):
        x = noise[start:start + batch_size].to(device)
        rows = slice(start, start + batch_size)
        c = cond_to(map_cond(lambda v, rows=rows: v[rows], cond), device)
        model = guided(sampler.model, cond_to(backbone.null_condition(x.shape[0]), device), sampler.guidance_scale,
                       backbone.guidance_rule)
        out.append((start, rollout(model, x, c, sampler.grid, backbone.schedule, backbone.prediction).cpu()))
    _sync(device)
    samples = processes.gather(out)
    return (None if samples is None else torch.cat(samples)), cond, time.perf_counter() - tic


def latency_seconds(backbone: Backbone, sampler: Sampler, seed: int, repeats: int, device="cpu") -> float:
    """Median wall time of one single-sample generation over `repeats` runs, after a warm-up call."""
    warm_up(backbone, sampler, 1, device)
    return statistics.median(draw_samples(backbone, sampler, 1, seed, device=device)[2] for _ in range(repeats))
