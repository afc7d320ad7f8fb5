"""Per-rank memory of FSDP2 training (tdm.sharding) on two CPU processes (gloo), for `tdm plan`'s validation.

The UNets of benchmarks/roles_memory.py (tiny, mid), roles lora and separate, and two ways of loading:
`every-rank` (every rank builds the whole teacher and its roles) and `rank0` (fsdp_cpu_ram_efficient_loading: rank 0
builds them, rank 1 builds them on the meta device and receives its shards of rank 0's weights); each shards them
as the trainer does (tdm.sharding.shard_roles), then runs `--iterations` TDM iterations (passes.tdm_iteration, the
same draws on both ranks). Before the measured run every rank warms up as benchmarks/roles_memory.py does
(roles_memory.warmed_baseline: a throwaway copy built, sharded and trained for one iteration the same way, freed,
the heap trimmed); `runtime_overhead_mib` is what that left resident. Recorded per rank, from /proc/self/status,
relative to the resident set after the warm-up (before it, until this warm-up existed):
- `load_peak_mib`: the peak while building and sharding (every-rank: the whole model on every rank's host);
- `peak_mib`: the peak of training, the high-water mark reset (/proc/self/clear_refs) once the roles are sharded;
- `gathered_after_no_grad_bytes`: weights left gathered after a no-grad call of the teacher and of the fake score
  (FSDP2 keeps a root module gathered after its forward unless told to reshard; tdm.sharding tells it to).
Each (config, strategy, loading) runs in a fresh `torchrun --nproc_per_node 2`.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/fsdp_memory.py --configs tiny mid --out benchmarks/results

`--tensors` records instead the training peak of live tensor bytes (roles_memory.tensor_peak) in a profiled run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from roles_memory import (
    CONFIGS,
    TextUNet,
    _status_mib,
    optimizers,
    roles_of,
    shell_command,
    tensor_peak,
    tensor_profiler,
    warmed_baseline,
)
from tdm.files import write_text_atomic

STRATEGIES = ("lora", "separate")
MEASURED = ("per rank, relative to the resident set after a warm-up (a throwaway copy built, sharded and trained for "
            "one iteration, freed, the heap trimmed): load_peak_mib, the peak resident set (VmHWM) until the roles "
            "are sharded; peak_mib, the peak resident set of the training iterations; runtime_overhead_mib, the "
            "resident set after the warm-up minus before it")
TENSORS = ("--tensors: per rank, peak_mib is the peak of the tensor bytes allocated through torch's CPU allocator "
           "since the roles were built and not yet freed, reached during the training iterations (the profiler's "
           "allocation events: the CPU's analogue of torch.cuda.max_memory_allocated); peak_at, where")
LOADINGS = ("every-rank", "rank0")


def gathered_bytes(modules) -> int:
    """Bytes of FSDP-managed weights currently gathered (unsharded) in `modules` and their submodules."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

    total = 0
    for module in modules:
        for m in module.modules():
            if isinstance(m, FSDPModule):
                group = m._get_fsdp_state()._fsdp_param_group
                for p in group.fsdp_params if group else ():
                    if p.sharded_state == ShardedState.UNSHARDED:
                        total += p._orig_size.numel() * p.param_dtype.itemsize if p.param_dtype else \
                            p._orig_size.numel() * p.sharded_param.dtype.itemsize
    return total


def worker(config: str, strategy: str, loading: str, iterations: int, batch: int, out: Path,
           tensors: bool, stack: bool = True) -> None:
    import torch.distributed as dist
    from diffusers import UNet2DConditionModel

    from passes import tdm_iteration
    from tdm.core.algorithm import TDM, TDMConfig
    from tdm.core.prediction import PredictionType
    from tdm.core.schedules import DiscreteVP
    from tdm.sharding import FSDPSettings, shard_roles

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    kwargs = CONFIGS[config]
    g = torch.Generator().manual_seed(0)  # the same draws on both ranks: the same number of calls
    shape = (batch, kwargs["in_channels"], kwargs["sample_size"], kwargs["sample_size"])
    cond = torch.randn(batch, 8, kwargs["cross_attention_dim"], generator=g)
    uncond, noise = torch.zeros_like(cond), torch.randn(shape, generator=g)
    tdm = TDM(DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012), PredictionType.EPSILON,
              TDMConfig(num_steps=4, total_steps=1000, guidance_scale=2.0))

    def build():
        torch.manual_seed(0)
        on_meta = loading == "rank0" and rank > 0
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            teacher = TextUNet(UNet2DConditionModel(**kwargs))
        roles = roles_of(teacher, strategy)
        shard_roles(roles, None, FSDPSettings(from_rank0=loading == "rank0"), None)
        return teacher, roles

    def warm_up():  # its own generator, the same on both ranks
        _, roles = build()
        tdm_iteration(tdm, roles, optimizers(roles), (cond, uncond, noise), torch.Generator().manual_seed(1))

    memory = warmed_baseline(warm_up)
    start_rss = memory["baseline_rss_mib"]
    profiler = tensor_profiler(tensors, stack)
    with profiler:
        teacher, roles = build()
        gc.collect()
        load_peak = _status_mib("VmHWM") - start_rss
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        with torch.profiler.record_function("training"):
            opt_g, opt_f = optimizers(roles)
            for _ in range(iterations):
                tdm_iteration(tdm, roles, (opt_g, opt_f), (cond, uncond, noise), g)
    peak = _status_mib("VmHWM") - start_rss
    measured = ({"peak_mib": peak, "load_peak_mib": load_peak} if not tensors else
                dict(zip(("peak_mib", "peak_at"), tensor_peak(profiler, since="training"))))
    networks = [roles.shared.base] if roles.shared is not None else [roles.teacher, roles.student, roles.fake_score]
    after = {}
    with torch.no_grad():
        for name, role in (("teacher", roles.teacher), ("fake_score", roles.fake_score)):
            role(noise, torch.full((batch,), 500.0), cond)
            after[name] = gathered_bytes(networks)
    row = {"config": config, "strategy": strategy, "loading": loading, "processes": dist.get_world_size(), "rank": rank,
           "batch": batch, "iterations": iterations, "generator_forward": "rollout",
           **memory, **measured, "gathered_after_no_grad_bytes": after}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        write_text_atomic(out, json.dumps(rows))
    del roles, networks, opt_g, opt_f, teacher  # before the process group goes (environment.md 5: exit aborts)
    gc.collect()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=list(CONFIGS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--loadings", nargs="+", default=list(LOADINGS), choices=LOADINGS)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tensors", action="store_true",
                        help="the training peak of live tensor bytes (roles_memory.tensor_peak), not the resident set")
    parser.add_argument("--no-stack", action="store_true",
                        help="with --tensors: profile without Python stacks (the mid UNet's exhaust the host memory; "
                             "peak_at then names no frame)")
    parser.add_argument("--worker", nargs=4, metavar=("CONFIG", "STRATEGY", "LOADING", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker[:3], args.iterations, args.batch, Path(args.worker[3]), args.tensors,
                      not args.no_stack)
    torchrun = Path(sys.executable).parent / "torchrun"
    out = Path(args.out)
    rows = []
    for config, strategy, loading in itertools.product(args.configs, args.strategies, args.loadings):
        part = out / f".fsdp_memory_{config}_{strategy}_{loading}.json"
        subprocess.run([str(torchrun), "--nproc_per_node", "2", __file__, "--iterations", str(args.iterations),
                        "--batch", str(args.batch), *["--tensors"] * args.tensors, *["--no-stack"] * args.no_stack,
                        "--worker", config, strategy, loading, str(part)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        for row in json.loads(part.read_text()):
            rows.append(row)
            print(f"{config:5} {strategy:9} {loading:10} rank {row['rank']}: load peak "
                  f"{row.get('load_peak_mib', float('nan')):8.1f} MiB, training peak {row['peak_mib']:8.1f} MiB, "
                  f"gathered after no-grad calls "
                  f"{row['gathered_after_no_grad_bytes']}", flush=True)
        part.unlink()
    result = {"command": shell_command("benchmarks/fsdp_memory.py"),
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
              "measured": TENSORS if args.tensors else MEASURED, "device": "cpu", "rows": rows}
    write_text_atomic(out / "fsdp_memory.json", json.dumps(result, indent=1))
    print(f"wrote {out / 'fsdp_memory.json'}")


if __name__ == "__main__":
    main()
