"""Samplers against each other on fixed conditions and seeds: one row of metrics and timings per sampler.

Every sampler draws the same noise (a CPU generator seeded with `seed`) for the same balanced conditions, so
rows and grid columns compare like with like. Scores come from `SetScorer`s: the backbone's own metrics,
`FeatureDistances` (FD and KID to reference sets), CLIP and preference scores. Under a multi-process launch the
processes share out the sampling (tdm.processes) and the main process alone scores; the others get no rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from ..backbones.base import Backbone
from ..core.sampling import Cond
from ..metrics import frechet_distance, kernel_distance
from ..processes import ONE_PROCESS, Processes
from ..samplers import Sampler, draw_samples, latency_seconds, warm_up

SetScorer = Callable[[Tensor, Cond], dict[str, float]]  # (samples [N, ...], their conditions) -> metrics


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
            latency_repeats: int = 0, processes: Processes = ONE_PROCESS) -> tuple[list[dict], dict[str, Tensor]]:
    """One row per sampler: name, label, steps, NFE, every scorer's metrics and the timings; plus the samples.

    Timings (wall clock, no grad, after a warm-up model call at the batch size): `ms_per_sample` and
    `samples_per_s` over all `num_samples` in batches of `batch_size`; `latency_ms`, one sample at a time
    (median of `latency_repeats` runs, on the main process), when latency_repeats > 0. With several `processes`,
    the main process gets the rows and samples, the others nothing."""
    rows, samples = [], {}
    for s in samplers:
        warm_up(backbone, s, min(batch_size, num_samples), device)
        x, cond, seconds = draw_samples(backbone, s, num_samples, seed, batch_size, device, processes)
        if x is None:  # another process's share: gathered on the main process
            continue
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
                         latency_repeats: int = 0, processes: Processes = ONE_PROCESS) -> dict | None:
    """`compare` with the backbone's metrics and FD / KID in `features` to samples of the first sampler (the
    reference teacher) drawn with other seeds (seed + 1) and to `extra_references`; the reference's own row is
    the teacher-vs-teacher floor. KID uses 100 subsets of min(1000, N / 2), so its spread is informative.
    Returns {rows, samples, floor (the backbone's metrics of real data), reference} on the main process, None on
    the others."""
    reference = samplers[0]
    scorers: list[SetScorer] = [backbone.metrics]
    if features is not None:
        ref_samples, _, _ = draw_samples(backbone, reference, num_samples, seed + 1, batch_size, device, processes)
        if ref_samples is not None:  # the main process, which scores
            references = {reference.name: features(ref_samples), **(extra_references or {})}
            scorers.append(FeatureDistances(features, references,
                                            kid_subset_size=min(1000, max(2, num_samples // 2))))
    rows, samples = compare(backbone, samplers, num_samples, seed, [*scorers, *extra_scorers], device, batch_size,
                            latency_repeats, processes)
    if not processes.is_main:
        return None
    return {"rows": rows, "samples": samples, "floor": backbone.floor_metrics(num_samples),
            "reference": reference.name}
