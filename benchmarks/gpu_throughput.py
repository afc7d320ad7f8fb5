"""Training throughput of tdm's real iteration (`Trainer.train_step`) on real-size PixArt-alpha 512 and SDXL with
random weights: LoRA roles on a bfloat16 base, bf16 autocast, gradient checkpointing on and off, train.compile
on and off. `--tiny` runs the same code path on the CPU with tiny networks in float32.

Each configuration runs in a fresh process (an out-of-memory error or a crash is recorded and the others still
run): the trainer is built on `random_backbone.RandomBackbone` (no text encoder, no VAE), `--warmup` iterations
run untimed (they include compilation), then up to `--iterations` timed ones, fewer if the configuration's share
of `--budget-s` runs out. Per configuration: iterations/s, samples/s, peak memory (torch.cuda.max_memory_allocated;
on the CPU the process's peak resident set), and utilisation from FLOPs counted by benchmarks/flops.py (tdm's
schedule, expected passes per sample-iteration at the preset's K and CFG):
  mfu: model FLOPs (without checkpointing's recompute) / time / peak;  hfu: the FLOPs executed (with it) / ...
Peak: --peak-tflops, else the GPU's bf16 dense peak by name (PEAK_TFLOPS); none on the CPU.

    python benchmarks/gpu_throughput.py [--architectures pixart-alpha-512 sdxl] [--configs 'sdxl/*/eager']
        [--batch N] [--warmup 2] [--iterations 5] [--budget-s 480] [--peak-tflops 989] [--out benchmarks/results]
    python benchmarks/gpu_throughput.py --tiny   # the same code path with tiny networks on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from flops import pass_flops, schedule_flops
from random_backbone import TINY, RandomBackbone, tiny
from tdm.config import load_config
from tdm.files import write_text_atomic
from tdm.plan.architectures import ARCHITECTURES

# bf16 dense tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name (first match wins)
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0))
SETTINGS = ("no-ckpt/eager", "ckpt/eager", "ckpt/compile", "no-ckpt/compile")  # cheapest first


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


def architecture(name: str, is_tiny: bool):
    arch = ARCHITECTURES[name]
    return tiny(arch) if is_tiny else arch


def config_overrides(batch: int, checkpointing: bool, compile_: bool, bf16: bool) -> list[str]:
    """The preset with LoRA roles on a bf16 base under bf16 autocast (`bf16`; else float32 throughout), nothing but
    training iterations (no eval, EMA or checkpoint); `batch` 0: the preset's."""
    return ["train.roles=lora", f"backbone.dtype={'bfloat16' if bf16 else 'float32'}",
            f"train.mixed_precision={'bf16' if bf16 else 'no'}",
            *([f"train.batch_size={batch}"] if batch else []),
            f"backbone.gradient_checkpointing={str(checkpointing).lower()}", f"train.compile={str(compile_).lower()}",
            "train.iterations=1000000", "train.eval_every=0", "train.validation_every=0", "train.ema_decay=0",
            "eval.num_samples=0"]


def measure(name: str, setting: str, args) -> dict:
    """One configuration in this process (call it in a fresh process only)."""
    from torch._dynamo.utils import counters

    from tdm.trainer import Trainer

    checkpointing, compile_ = setting.startswith("ckpt"), setting.endswith("compile")
    arch = architecture(name, args.tiny)
    bf16 = not args.tiny  # tiny: float32, as the CPU's bfloat16 kernels are slow reference paths
    config = load_config(arch.preset, config_overrides(args.batch, checkpointing, compile_, bf16))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    backbone = RandomBackbone(arch, device, torch.bfloat16 if bf16 else torch.float32, checkpointing)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out, backbone=backbone)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        warmup = []
        for _ in range(args.warmup):
            tic = time.perf_counter()
            trainer.train_step()
            sync()
            warmup.append(time.perf_counter() - tic)
        graphs = counters["stats"]["unique_graphs"]
        stop = time.perf_counter() + args.seconds - sum(warmup)  # this configuration's share of the budget
        times = []
        while len(times) < args.iterations and (not times or time.perf_counter() + times[-1] < stop):
            tic = time.perf_counter()
            trainer.train_step()
            sync()
            times.append(time.perf_counter() - tic)
        trainer.close()
    seconds = sum(times) / len(times)
    peak_mib = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                * 1024) / 2**20
    return {"batch": config.train.batch_size, "lora_rank": config.train.lora_rank, "num_steps": config.tdm.num_steps,
            "guidance_scale": config.tdm.guidance_scale, "warmup_seconds": warmup, "iterations": len(times),
            "seconds": times, "seconds_per_iteration": seconds, "iterations_per_s": 1 / seconds,
            "samples_per_s": config.train.batch_size / seconds, "peak_memory_mib": peak_mib,
            "peak_memory_of": "torch.cuda.max_memory_allocated" if cuda else "process peak resident set",
            "compiled_graphs": counters["stats"]["unique_graphs"],
            "graphs_compiled_while_timed": counters["stats"]["unique_graphs"] - graphs,
            "graph_breaks": sum(counters["graph_break"].values())}


def counted_flops(names: list[str], is_tiny: bool) -> dict:
    """TFLOP per sample-iteration of tdm's schedule under LoRA roles, without and with checkpointing."""
    flops = {}
    for name in names:
        arch = architecture(name, is_tiny)
        tdm = load_config(arch.preset).tdm
        flops[name] = {ckpt: schedule_flops(pass_flops(arch, "lora", ckpt == "ckpt"), tdm.num_steps,
                                            tdm.guidance_scale)["tdm"]["total"] for ckpt in ("no-ckpt", "ckpt")}
    return flops


def utilisation(row: dict, flops: dict, peak: float | None) -> dict:
    """MFU (model FLOPs) and HFU (with checkpointing's recompute) of a measured row."""
    ckpt = row["setting"].split("/")[0]
    per_iteration = {"model": flops["no-ckpt"] * row["batch"], "executed": flops[ckpt] * row["batch"]}
    out = {"tflop_per_iteration": per_iteration["model"], "tflop_per_iteration_executed": per_iteration["executed"],
           "achieved_tflops": per_iteration["model"] / row["seconds_per_iteration"]}
    if peak:
        out["mfu"] = out["achieved_tflops"] / peak
        out["hfu"] = per_iteration["executed"] / row["seconds_per_iteration"] / peak
    return out


def run_child(name: str, setting: str, args, end: float, left: int) -> dict:
    """`measure` in a fresh process with a fair share of the time to `end` (`left` configurations to go), killed
    past it plus a grace period; failures become the row's error."""
    seconds = max(1.0, (end - time.perf_counter()) / left)
    print(f"{name}/{setting}: up to {seconds:.0f} s", flush=True)
    cmd = [sys.executable, __file__, "--child", name, setting, "--warmup", str(args.warmup), "--iterations",
           str(args.iterations), "--seconds", str(seconds), *(["--batch", str(args.batch)] if args.batch else []),
           *(["--tiny"] if args.tiny else [])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"still running after {seconds + 60:.0f} s (its budget share)"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
        oom = "out of memory" in done.stderr.lower()
        return {"status": "out_of_memory" if oom else "error", "returncode": done.returncode, "error": " | ".join(tail)}
    return {"status": "ok", **json.loads(lines[-1])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", nargs="+", default=list(TINY), choices=list(TINY))
    parser.add_argument("--configs", nargs="+", default=["*"],
                        help="patterns over ARCH/{ckpt,no-ckpt}/{eager,compile}, e.g. 'sdxl/*/eager'")
    parser.add_argument("--batch", type=int, default=0, help="per process; 0 = the preset's")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (compilation happens here)")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations at most")
    parser.add_argument("--budget-s", type=float, default=480.0, help="total seconds for all configurations")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: by GPU name)")
    parser.add_argument("--tiny", action="store_true", help="tiny networks on the CPU: the code path in seconds")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", nargs=2, metavar=("ARCH", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args)))
        return

    names = [(a, s) for s in SETTINGS for a in args.architectures]  # every eager row first
    runs = [(a, s) for a, s in names if any(fnmatch.fnmatch(f"{a}/{s}", p) for p in args.configs)]
    if not runs:
        parser.error(f"--configs {args.configs} match none of {['/'.join(n) for n in names]}")
    end = time.perf_counter() + args.budget_s
    out = Path(args.out) / ("gpu_throughput_tiny.json" if args.tiny else "gpu_throughput.json")
    result = {"command": " ".join(["python benchmarks/gpu_throughput.py", *sys.argv[1:]]), "tiny": args.tiny,
              "torch": torch.__version__, "warmup": args.warmup, "budget_s": args.budget_s, "rows": []}
    # Counting FLOPs on the meta device takes a minute of CPU: in a forked process (before this one touches CUDA)
    # while the GPU runs the configurations.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        counting = pool.submit(counted_flops, sorted({a for a, _ in runs}), args.tiny)
        result["device"] = device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        for i, (name, setting) in enumerate(runs):
            result["rows"].append({"architecture": name, "setting": setting,
                                   **run_child(name, setting, args, end, len(runs) - i)})
            write_text_atomic(out, json.dumps(result, indent=1))  # what is measured so far, should the rest fail
        flops = counting.result()
    rows, peak = result["rows"], peak_tflops(device, args.peak_tflops)
    for row in rows:
        name, setting = row["architecture"], row["setting"]
        if row["status"] == "ok":
            row.update(utilisation(row, flops[name], peak))
            mfu = f"  MFU {row['mfu']:.1%}  HFU {row['hfu']:.1%}" if peak else ""
            print(f"{name:17} {setting:16} batch {row['batch']:3d}  {row['iterations_per_s']:7.3f} it/s  "
                  f"{row['samples_per_s']:8.2f} samples/s  peak {row['peak_memory_mib'] / 1024:6.1f} GiB{mfu}  "
                  f"(first warm-up iteration {row['warmup_seconds'][0] if row['warmup_seconds'] else 0:.1f} s)",
                  flush=True)
        else:
            print(f"{name:17} {setting:16} {row['status']}: {row['error']}", flush=True)
    result.update(peak_tflops=peak, tflop_per_sample_iteration=flops)
    write_text_atomic(out, json.dumps(result, indent=1))
    print(f"wrote {out}")
    if not any(r["status"] == "ok" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
