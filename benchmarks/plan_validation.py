"""`tdm plan`'s predicted peak memory against measured peaks: the tiny and mid UNets of benchmarks/roles_memory.py,
one process (no DDP wrapper, no sharding), roles lora and separate, generator forward rollout and recompute, with
and without gradient checkpointing, as measured there: on the CPU, float32 weights and activations, LoRA rank 16 on
the attention, 8 text tokens, AdamW's multi-tensor step (torch's default on a GPU). A measured peak is the peak
resident set (VmHWM) of the measured run minus the resident set after a warm-up: a throwaway copy of the same
network and roles built and trained for one iteration, freed, the heap trimmed. The warm-up's lasting cost (torch's
thread pools and caches, the CPU's analogue of the CUDA context, which the plan leaves out) is recorded per row as
`runtime_overhead_mib`; before the warm-up existed it was inside the measured peaks (most of the tiny UNet's). The
main measurements ran with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_=65536), so a freed tensor
of 64 KiB or more leaves the resident set as it would leave torch.cuda.memory_allocated; others with glibc's default
(freed memory kept in the heap, so the resident set overstates live tensors) are compared too, and so is the peak
of live tensor bytes (roles_memory.py --tensors: the profiler's allocation events, the CPU's analogue of
torch.cuda.max_memory_allocated), which leaves out the heap's fragmentation and Python's objects.

The prediction is tdm.plan's, unchanged: parameters and saved activations counted on the meta device for the same
network and batch (tdm.plan.planner.count_strategy), then tdm.plan.memory.layout_memory. No constant of the model
was fitted to these measurements. FSDP rows: the per-rank training peaks of benchmarks/fsdp_memory.py (two CPU
processes, tdm.sharding's FSDP2, the same UNets, batch 2 per rank, generator forward rollout, the same warm-up)
against the plan's `fsdp` layout at 2 GPUs. The commands that measured are in each row (`measured_command`):

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/roles_memory.py --configs tiny mid --iterations 2 --batch 2 \
        --out benchmarks/results/plan_validation/batch2   # and --configs mid --batch 8 (--strategies lora
        --gradient-checkpointing) --out benchmarks/results/plan_validation/batch8(_checkpointing); --tensors
        --out benchmarks/results/plan_validation/tensors_batch2
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/fsdp_memory.py --configs tiny --tensors \
        --out benchmarks/results/plan_validation/tensors_fsdp
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/fsdp_memory.py --configs mid --loadings every-rank --tensors \
        --no-stack --out benchmarks/results/plan_validation/tensors_fsdp_mid
    python benchmarks/roles_memory.py --out benchmarks/results   # and the batch8 runs (glibc's default)
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/fsdp_memory.py --configs tiny mid --out benchmarks/results
    python benchmarks/plan_validation.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from roles_memory import CONFIGS, LORA
from tdm.files import write_text_atomic
from tdm.plan.architectures import Architecture
from tdm.plan.memory import layout_memory
from tdm.plan.planner import count_strategy

MIB = 2**20
TOKENS = 8  # roles_memory's text embeddings per sample
FIXED, DEFAULT, TENSORS = "mmap64k", "default", "tensors"
ALLOCATORS = {FIXED: "resident set, glibc with MALLOC_MMAP_THRESHOLD_=65536 (freed tensors of 64 KiB or more leave "
                     "the resident set)",
              DEFAULT: "resident set, glibc's default (freed memory may stay resident in the heap)",
              TENSORS: "live tensor bytes through torch's CPU allocator (roles_memory.py --tensors), not the "
                       "resident set"}
MEASURED = {"benchmarks/results/plan_validation/batch2/roles_memory.json": FIXED,
            "benchmarks/results/plan_validation/batch8/roles_memory.json": FIXED,
            "benchmarks/results/plan_validation/batch8_checkpointing/roles_memory.json": FIXED,
            "benchmarks/results/plan_validation/tensors_batch2/roles_memory.json": TENSORS,
            "benchmarks/results/roles_memory.json": DEFAULT,
            "benchmarks/results/batch8/roles_memory.json": DEFAULT,
            "benchmarks/results/batch8_checkpointing/roles_memory.json": DEFAULT}
FSDP_MEASURED = {"benchmarks/results/fsdp_memory.json": FIXED,
                 "benchmarks/results/plan_validation/tensors_fsdp/fsdp_memory.json": TENSORS,
                 "benchmarks/results/plan_validation/tensors_fsdp_mid/fsdp_memory.json": TENSORS}


def architecture(name: str) -> Architecture:
    kwargs = CONFIGS[name]
    return Architecture(name, "", "sd15", "UNet2DConditionModel", kwargs,
                        latent=(kwargs["in_channels"], kwargs["sample_size"], kwargs["sample_size"]),
                        context={"encoder_hidden_states": (TOKENS, kwargs["cross_attention_dim"])})


def predicted_peak(row: dict, checkpointing: bool, sharding: str = "ddp", gpus: int = 1) -> dict:
    settings = {"lora_rank": LORA["rank"], "lora_targets": list(LORA["targets"]), "batch_size": row["batch"],
                "gradient_checkpointing": checkpointing, "num_steps": 4, "guidance_scale": 2.0}
    counts, _ = count_strategy(architecture(row["config"]), settings, row["strategy"], torch.float32)
    memory = layout_memory(counts, sharding, gpus, 4, 4, checkpointing, row["generator_forward"])
    return {"counts": counts.__dict__, "memory_mib": {k: v / MIB for k, v in memory.items()}}


def compared(row: dict, measured: dict, path: str, allocator: str, checkpointing: bool, fsdp: bool = False) -> dict:
    """A measured row of `path` beside the plan's prediction for it (one process, or the `fsdp` layout at the row's
    process count), printed as a table line."""
    pred = predicted_peak(row, checkpointing, "fsdp" if fsdp else "ddp", row["processes"] if fsdp else 1)
    ratio = pred["memory_mib"]["peak"] / row["peak_mib"]
    ranks = {k: row[k] for k in ("processes", "rank", "loading")} if fsdp else {}
    where = f"  (fsdp x {row['processes']}, rank {row['rank']}, {row['loading']})" if fsdp else ""
    print(f"{allocator:8} {row['config']:6} {row['strategy']:9} {row['generator_forward']:9} {row['batch']:5d} "
          f"{'on' if checkpointing else 'off':>4} {pred['memory_mib']['peak']:10.1f} {row['peak_mib']:10.1f} "
          f"{ratio:6.3f}{where}", flush=True)
    return {"measured_in": path, "allocator": allocator, "measured_command": measured["command"],
            "device": measured["device"], **({"sharding": "fsdp"} if fsdp else {}), **ranks,
            "config": row["config"], "strategy": row["strategy"], "generator_forward": row["generator_forward"],
            "batch": row["batch"], "gradient_checkpointing": checkpointing, "measured_peak_mib": row["peak_mib"],
            **{k: row[k] for k in ("runtime_overhead_mib", "peak_at") if k in row},
            "predicted_peak_mib": pred["memory_mib"]["peak"], "ratio": ratio, **pred}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rows = []
    print(f"{'malloc':8} {'config':6} {'roles':9} {'forward':9} {'batch':>5} {'ckpt':>4} {'predicted':>10} "
          f"{'measured':>10} {'ratio':>6}")
    for path, allocator in MEASURED.items():
        measured = json.loads(Path(path).read_text())
        for row in measured["rows"]:
            rows.append(compared(row, measured, path, allocator, bool(measured.get("gradient_checkpointing"))))
    for path, allocator in FSDP_MEASURED.items():
        measured = json.loads(Path(path).read_text())
        for row in measured["rows"]:
            rows.append(compared(row, measured, path, allocator, False, fsdp=True))
    groups = {FIXED: lambda r: r["allocator"] == FIXED and "sharding" not in r,
              DEFAULT: lambda r: r["allocator"] == DEFAULT,
              "fsdp": lambda r: r["allocator"] == FIXED and r.get("sharding") == "fsdp",
              TENSORS: lambda r: r["allocator"] == TENSORS and "sharding" not in r,
              f"fsdp {TENSORS}": lambda r: r["allocator"] == TENSORS and r.get("sharding") == "fsdp"}
    within = {name: f"{sum(abs(r['ratio'] - 1) <= 0.15 for r in rows if member(r))} of "
                    f"{sum(map(member, rows))}" for name, member in groups.items()}
    print(f"within 15%: {within}")
    result = {"command": " ".join(["python benchmarks/plan_validation.py", *sys.argv[1:]]),
              "predicted": "tdm.plan (counted on the meta device; tdm.plan.memory's model, no fitted constants)",
              "measured": "benchmarks/roles_memory.py (one process) and fsdp_memory.py (two), on the CPU: the peak "
                          "resident set (VmHWM) of the measured run minus the resident set after a warm-up (a "
                          "throwaway copy of the same network and roles built and trained for one iteration, freed, "
                          "the heap trimmed, the high-water mark reset); runtime_overhead_mib: the resident set after "
                          "the warm-up minus before it, left out of the measured peak as the CUDA context is on a "
                          "GPU; allocator `tensors`: the peak of live tensor bytes instead (roles_memory.py and "
                          "fsdp_memory.py --tensors)",
              "not_validated": "DDP with more than one process (buckets); FSDP with gradient checkpointing or "
                               "the recompute forward",
              "allocators": ALLOCATORS, "within_15_percent": within, "rows": rows}
    out = Path(args.out)
    write_text_atomic(out / "plan_validation.json", json.dumps(result, indent=1))
    print(f"wrote {out / 'plan_validation.json'}")


if __name__ == "__main__":
    main()
