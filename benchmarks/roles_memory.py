"""Peak memory of the two role strategies over a few TDM training iterations on diffusers UNet2DConditionModels.

`separate`: student and fake score are full copies of the teacher (three backbones, two full AdamW states);
`lora`: one frozen base with two LoRA adapters (tdm.roles). Each (config, strategy, generator forward) runs in a
fresh subprocess: randomly initialised UNet from config, the roles, AdamW per role (its multi-tensor step, torch's
default on a GPU), then `--iterations` TDM iterations (`passes.tdm_iteration`: rollout, fake-score update,
generator update with clipping, teacher CFG in one 2B call, as tdm's trainer does), with the generator's student
forward taken from the rollout (`rollout`, its activations held through the fake update) or recomputed after it
(`recompute`): train.generator_forward.
Before the measured run, a warm-up (warmed_baseline) builds a throwaway copy of the same config and strategy, runs
one TDM iteration with it and frees it all: torch's one-time costs of a first use (OpenMP and oneDNN thread pools
and primitive caches, the autograd engine's threads, lazily imported modules, the heap's growth) then stay in the
baseline, as a CUDA context does on a GPU, where a planner leaves it out too. The freed heap is given back to the
system (glibc's malloc_trim), so the measured run cannot silently reuse it, and the high-water mark is reset.
Memory on the CPU is the process's peak resident set (VmHWM) during the measured run minus its resident set after
the warm-up (`peak_mib`); the warm-up's lasting cost, the resident set after it minus before it, is recorded as
`runtime_overhead_mib`. (Results before this warm-up measured from the resident set just before the first model
was built, so their peaks included that overhead: about 30-45 MiB, most of a tiny UNet's peak.) On CUDA the peak is
torch.cuda.max_memory_allocated after the warm-up. `--tensors` measures instead, in a profiled run, the peak of live
tensor bytes (tensor_peak: torch's CPU allocations, the CPU's analogue of max_memory_allocated), which leaves out
what the resident set also holds: the heap's freed chunks and headers, Python's objects.

    [MALLOC_MMAP_THRESHOLD_=65536] python benchmarks/roles_memory.py [--configs tiny mid] [--iterations 3]
        [--batch 2] [--tensors] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tdm.files import write_text_atomic

SD_BLOCKS = {"down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
CONFIGS = {  # UNet2DConditionModel kwargs; `mid` is SD1.5's layout at 0.4x its width (SD1.5: 320..1280, 860 M)
    "tiny": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
             "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
             "attention_head_dim": 8, "norm_num_groups": 8},
    "mid": {"sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": (128, 256, 512, 512), **SD_BLOCKS, "cross_attention_dim": 768,
            "attention_head_dim": 8},
}
LORA = {"rank": 16, "alpha": 16.0, "targets": ("attention",)}
MEASURED = ("cpu: peak_mib is the peak resident set (VmHWM) of the measured run minus the resident set after a "
            "warm-up (a throwaway build and one TDM iteration of the same config and strategy, freed, the heap "
            "trimmed, the high-water mark reset); runtime_overhead_mib is the resident set after the warm-up minus "
            "before it; cuda: torch.cuda.max_memory_allocated after the warm-up")
MEASURED_TENSORS = ("--tensors: peak_mib is the peak of the tensor bytes allocated through torch's CPU allocator "
                    "during the measured run (the build and the iterations, after the warm-up) and not yet freed, "
                    "from the profiler's allocation events: the CPU's analogue of torch.cuda.max_memory_allocated; "
                    "peak_at, the frames of the allocation that reached it")


class TextUNet(torch.nn.Module):
    """The UNet as `module(x_t, t, cond)` with cond = text embeddings [B, L, cross_attention_dim]."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x_t, t, cond):
        return self.unet(x_t, t, encoder_hidden_states=cond).sample


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def shell_command(script: str) -> str:
    """The command line that ran `script`, with the allocator setting it ran under."""
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return " ".join([*([f"MALLOC_MMAP_THRESHOLD_={threshold}"] if threshold else []), "python", script,
                     *sys.argv[1:]])


def _malloc_trim() -> None:
    """Give the heap's free pages back to the system (glibc), so freed chunks leave the resident set."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def warmed_baseline(warm_up: Callable[[], None], device: str = "cpu") -> dict:
    """Run `warm_up` (one throwaway iteration of what is measured next), free what it left, give the freed heap
    back and reset the peak (VmHWM, or CUDA's peak statistics). The resident sets (MiB) before the warm-up and
    after it, the baseline the measured peak is taken from, and their difference: the runtime's lasting cost."""
    start = _status_mib("VmRSS")
    warm_up()
    gc.collect()
    _malloc_trim()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = _status_mib("VmRSS")
    return {"start_rss_mib": start, "baseline_rss_mib": baseline, "runtime_overhead_mib": baseline - start}


def build_roles(config: str, strategy: str, checkpointing: bool, device: str):
    """(teacher, roles, (generator's AdamW, fake score's AdamW)) on a randomly initialised UNet of `config`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[config])
    if checkpointing:
        unet.enable_gradient_checkpointing()
    teacher = TextUNet(unet)
    roles = roles_of(teacher, strategy).to(device)
    return teacher, roles, optimizers(roles)


def roles_of(teacher: torch.nn.Module, strategy: str):
    """`strategy`'s roles on `teacher`: three full copies, or one base with LoRA["rank"] adapters."""
    from tdm.roles import Roles

    return (Roles.separate_copies(teacher, teacher) if strategy == "separate" else
            Roles.lora(teacher, teacher, LORA["rank"], LORA["alpha"], LORA["targets"]))


def optimizers(roles) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The generator's and the fake score's AdamW, with the multi-tensor (foreach) step torch takes by default on a
    GPU (on the CPU it defaults to a loop over the parameters, whose temporaries are one parameter's size)."""
    return (torch.optim.AdamW(roles.student.parameters(), lr=1e-6, betas=(0.0, 0.95), foreach=True),
            torch.optim.AdamW(roles.fake_score.parameters(), lr=5e-6, betas=(0.0, 0.95), foreach=True))


def tensor_profiler(enabled: bool, stack: bool = True):
    """A profiler recording torch's allocations for `tensor_peak` (with Python stacks unless `stack` is False), or
    nothing when not `enabled`."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                  with_stack=stack)


def tensor_peak(profiler, since: str | None = None) -> tuple[float, str]:
    """(MiB, where): the peak of the bytes allocated through torch's CPU allocator while `profiler` ran and not yet
    freed, the CPU's analogue of torch.cuda.max_memory_allocated, and this script's and tdm's frames (innermost
    first) of the allocation that reached it; `since`: the peak from the start of the record_function so named."""
    from torch._C._profiler import _EventType

    def nodes(tree):
        for node in tree:
            yield node
            yield from nodes(node.children)

    events = list(nodes(profiler.profiler.kineto_results.experimental_event_tree()))
    start = min((n.start_time_ns for n in events if n.name == since), default=0) if since else 0
    allocations = [n for n in events if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"]
    live = peak = 0
    at = None
    for node in sorted(allocations, key=lambda n: n.start_time_ns):
        live += node.extra_fields.alloc_size  # negative when freed
        if live > peak and node.start_time_ns >= start:
            peak, at = live, node
    frames = []
    while at is not None:
        if at.name.startswith(("tdm/", "passes.py")):
            frames.append(at.name)
        at = at.parent
    return peak / 2**20, " < ".join(frames)


def measure(config: str, strategy: str, generator_forward: str, iterations: int, batch: int, device: str,
            checkpointing: bool, tensors: bool = False) -> dict:
    """One (config, strategy) run in this process; call it in a fresh process only. `tensors`: the peak of live
    tensor bytes (tensor_peak) instead of the resident set's."""
    from diffusers import UNet2DConditionModel  # noqa: F401  (imported before the start: not the runtime's cost)

    from passes import tdm_iteration  # the trainer's iteration: shared rollout, fake then generator update
    from tdm.core.algorithm import TDM, TDMConfig
    from tdm.core.prediction import PredictionType
    from tdm.core.schedules import DiscreteVP

    kwargs = CONFIGS[config]
    g = torch.Generator().manual_seed(0)
    shape = (batch, kwargs["in_channels"], kwargs["sample_size"], kwargs["sample_size"])
    cond = torch.randn(batch, 8, kwargs["cross_attention_dim"], generator=g).to(device)
    uncond, noise = torch.zeros_like(cond), torch.randn(shape, generator=g).to(device)
    tdm = TDM(DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012), PredictionType.EPSILON,
              TDMConfig(num_steps=4, total_steps=1000, guidance_scale=2.0))
    rollout = generator_forward == "rollout"

    def warm_up():  # its own generator: the measured run draws what it drew before the warm-up existed
        _, roles, opts = build_roles(config, strategy, checkpointing, device)
        tdm_iteration(tdm, roles, opts, (cond, uncond, noise), torch.Generator().manual_seed(1), rollout)

    memory = warmed_baseline(warm_up, device)
    profiler = tensor_profiler(tensors)
    with profiler:
        teacher, roles, opts = build_roles(config, strategy, checkpointing, device)
        tic = time.perf_counter()
        for _ in range(iterations):
            tdm_iteration(tdm, roles, opts, (cond, uncond, noise), g, rollout)
        seconds = (time.perf_counter() - tic) / iterations
    base_params = sum(p.numel() for p in teacher.parameters())
    held = [roles.shared.base] if roles.shared is not None else [roles.teacher, roles.student, roles.fake_score]
    result = {
        "config": config, "strategy": strategy, "generator_forward": generator_forward, "device": device,
        "iterations": iterations, "batch": batch,
        "base_params": base_params,
        "trainable_params": {"student": sum(p.numel() for p in roles.student.parameters()),
                             "fake_score": sum(p.numel() for p in roles.fake_score.parameters())},
        "resident_params": sum(p.numel() for m in held for p in m.parameters()),  # every weight held, once
        "seconds_per_iteration": seconds,
    }
    if tensors:
        result["peak_mib"], result["peak_at"] = tensor_peak(profiler)
    elif device == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result.update(memory, peak_rss_mib=_status_mib("VmHWM"))
        result["peak_mib"] = result["peak_rss_mib"] - memory["baseline_rss_mib"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--generator-forward", nargs="+", default=["rollout", "recompute"],
                        choices=["rollout", "recompute"])
    parser.add_argument("--strategies", nargs="+", default=["separate", "lora"], choices=["separate", "lora"])
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute the UNet's blocks in backward")
    parser.add_argument("--tensors", action="store_true",
                        help="measure the peak of live tensor bytes (the profiler's allocations), not the resident set")
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "STRATEGY", "FORWARD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(*args.child, args.iterations, args.batch, args.device,
                                 args.gradient_checkpointing, args.tensors)))
        return

    rows = []
    for config in args.configs:
        for strategy in args.strategies:
            for forward in args.generator_forward:
                cmd = [sys.executable, __file__, "--child", config, strategy, forward, "--iterations",
                       str(args.iterations), "--batch", str(args.batch), "--threads", str(args.threads),
                       "--device", args.device, *["--gradient-checkpointing"] * args.gradient_checkpointing,
                       *["--tensors"] * args.tensors]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{config:5} {strategy:9} {forward:9} base {r['base_params'] / 1e6:7.2f} M  trainable/role "
                      f"{r['trainable_params']['student'] / 1e6:7.3f} M  peak {r['peak_mib']:8.1f} MiB  "
                      f"{r['seconds_per_iteration']:.2f} s/it", flush=True)

    def peak(config, strategy, forward=args.generator_forward[0]):
        return next(r["peak_mib"] for r in rows if (r["config"], r["strategy"], r["generator_forward"]) ==
                    (config, strategy, forward))

    ratios = {}
    if len(args.strategies) == 2:
        ratios = {c: peak(c, "separate") / peak(c, "lora") for c in args.configs}
        print("peak memory separate / lora: " + ", ".join(f"{c} {v:.2f}x" for c, v in ratios.items()))
    held = {}
    if len(args.generator_forward) == 2:
        held = {f"{c}/{s}": peak(c, s, "rollout") / peak(c, s, "recompute") for c in args.configs
                for s in args.strategies}
        print("peak memory rollout / recompute: " + ", ".join(f"{k} {v:.3f}x" for k, v in held.items()))
    out = Path(args.out)
    result = {"command": shell_command("benchmarks/roles_memory.py"), "device": args.device,
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
              "measured": MEASURED_TENSORS if args.tensors else MEASURED, "threads": args.threads, "lora": LORA,
              "gradient_checkpointing": args.gradient_checkpointing,
              "configs": {c: CONFIGS[c] for c in args.configs}, "rows": rows, "ratio_separate_over_lora": ratios,
              "ratio_rollout_over_recompute": held}
    write_text_atomic(out / "roles_memory.json", json.dumps(result, indent=1))
    print(f"wrote {out / 'roles_memory.json'}")


if __name__ == "__main__":
    main()
