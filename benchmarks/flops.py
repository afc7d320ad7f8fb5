"""FLOPs per training iteration and sample on the real-size networks of tdm's presets: tdm's schedule vs the
official TDM script's (method.md H.2), counted, not estimated.

Each pass type is run once under torch's FlopCounterMode on the meta device (shapes only, no arithmetic) at batch 1,
on the network built from its diffusers config with the preset's role strategy (tdm.plan.architectures; the
counting is tdm.plan.counting's, which `tdm plan` uses): a no-grad forward of the frozen teacher, and for a
trainable role (LoRA adapters on the frozen base, or all weights for roles: separate) a no-grad forward, a forward
with grad and its backward (loss = output.sum()), once without and once with gradient checkpointing (its recompute
lands in the backward's count). The counter counts matmuls,
convolutions and attention (2 FLOPs per multiply-add), not norms or elementwise ops: the usual MFU convention.
On meta, attention runs as plain matmuls, so its backward counts 2 forwards (a fused GPU kernel's count adds the
recomputed scores: 2.5). Text encoders and the VAE are not counted (tdm caches text embeddings; the training loss
never decodes).

Passes per sample-iteration at K steps (method.md H.2; one fake update, as every diffusers preset):
  official: student K+1 no-grad forwards (the K-level rollout, then a recomputed output) + 1 with grad + 1 backward;
            teacher 1 unused forward + 2 (CFG, conditional and unconditional calls; 1 without guidance);
            fake score 1 forward with grad + 1 backward (its update) + 1 no-grad forward (the generator loss).
  tdm:      student E[levels] forwards, one with grad, + 1 backward, where a sample's rollout runs levels K down to
            min(k_fake, k_generator) (E = 3.125 at K = 4); teacher 2 forwards (one 2B CFG call); fake score as above.

    python benchmarks/flops.py [--architectures sd15 sdxl ...] [--num-steps 4] [--out benchmarks/results]

About 3.5 minutes on two shared CPU cores: meta-device kernels run in Python.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tdm.config import PRESET_DIR, load_config
from tdm.core.algorithm import TDM, TDMConfig
from tdm.core.prediction import PredictionType
from tdm.core.schedules import DiscreteVP
from tdm.files import write_text_atomic
from tdm.plan.architectures import ARCHITECTURES, Architecture, check_latent
from tdm.plan.counting import (
    count_flops,
    expected_student_forwards,
    make_trainable,
    passes,
    role_settings,
    schedule_flops,
)

TERA = 1e12
MFU = 0.40
PEAK_TFLOPS = {"H100": 989.0, "A800": 312.0}  # bf16 dense tensor-core peaks
# The paper's PixArt-alpha run (method.md F and G.3): 500 iterations at total batch 32 in 2 A800-hours.
# Its GPU count is not stated: `processes` is the preset pixart-alpha-1024's split of the batch (8 x 4).
PAPER_PIXART = {"iterations": 500, "total_batch": 32, "a800_hours": 2.0, "processes": 8}


def preset_settings(arch: Architecture) -> dict:
    """The preset's role strategy, LoRA settings, batch, checkpointing and CFG; checks the architecture's latent
    against the preset's sample size (tdm.plan.architectures.check_latent)."""
    config = load_config(str(PRESET_DIR / arch.preset))  # an absolute path stays as it is
    check_latent(arch, config)
    return role_settings(config, arch.family)


def pass_flops(arch: Architecture, roles: str, checkpointing: bool) -> dict[str, float]:
    """TFLOP per sample: `teacher_forward` (frozen, no adapter), and for a trainable role under `roles` (lora: the
    preset's rank and targets) `forward` (no grad), `forward_grad`, `backward` and `forward_backward`."""
    settings = preset_settings(arch)
    model = arch.build("meta")
    x, t, kwargs = arch.inputs(1, "meta")

    def run(m):
        return arch.call(m, x, t, kwargs)

    with torch.no_grad():
        teacher, _ = count_flops(lambda: run(model))
    make_trainable(model, roles, settings["lora_rank"], settings["lora_targets"])
    if checkpointing:
        model.enable_gradient_checkpointing()
    counted = passes(model, run)
    result = {"teacher_forward": teacher, **counted, "forward_backward": counted["forward_grad"] + counted["backward"]}
    return {key: value / TERA for key, value in result.items()}


def monte_carlo_student_forwards(num_steps: int, samples: int = 100_000, seed: int = 0) -> float:
    """The same expectation from tdm's own draws (`TDM.draw_iteration`, one fake update)."""
    tdm = TDM(DiscreteVP.from_betas(), PredictionType.EPSILON, TDMConfig(num_steps=num_steps, total_steps=1000))
    fake, gen = tdm.draw_iteration((samples, 1), torch.Generator().manual_seed(seed), "cpu", fake_updates=1)
    return float((num_steps - torch.minimum(fake[0].k, gen.k) + 1).double().mean())


def iteration_flops(arch: Architecture, checkpointing: bool | None = None, num_steps: int | None = None,
                    guidance_scale: float | None = None) -> dict:
    """TFLOP per sample-iteration for tdm and official (and their ratio) at the preset's settings, each of which
    can be overridden; the counted passes under `passes`."""
    s = preset_settings(arch)
    checkpointing = s["gradient_checkpointing"] if checkpointing is None else checkpointing
    p = pass_flops(arch, s["roles"], checkpointing)
    return {"passes": p, **schedule_flops(p, num_steps or s["num_steps"],
                                          s["guidance_scale"] if guidance_scale is None else guidance_scale)}


def seconds_at_mfu(tflop_per_sample: float, batch: int) -> dict[str, float]:
    """Estimated seconds per iteration and process at MFU on each GPU."""
    return {gpu: batch * tflop_per_sample / (MFU * peak) for gpu, peak in PEAK_TFLOPS.items()}


def paper_pixart_budget(entries: dict) -> dict:
    """The paper's PixArt-alpha budget, and the utilisation of an A800 it implies given the counted FLOPs of each
    PixArt architecture in `entries` (without and with checkpointing, under both schedules)."""
    b = PAPER_PIXART
    a800_seconds = b["a800_hours"] * 3600 / b["iterations"]  # GPU-seconds per iteration of the whole batch
    implied = {name: {key: {s: b["total_batch"] * it[s]["total"] / (a800_seconds * PEAK_TFLOPS["A800"])
                            for s in ("tdm", "official")} for key, it in entry["iteration"].items()}
               for name, entry in entries.items() if entry["family"] == "pixart-alpha"}
    return {**b, "a800_seconds_per_iteration": a800_seconds,
            "seconds_per_iteration_per_process": a800_seconds / b["processes"],
            "a800_seconds_per_sample": a800_seconds / b["total_batch"], "implied_utilisation": implied}


def measure(arch: Architecture, num_steps: int) -> dict:
    s = preset_settings(arch)
    entry = {"preset": arch.preset, "family": arch.family, **s, "num_steps": num_steps, "passes": {}, "iteration": {}}
    for key, ckpt in (("no_checkpointing", False), ("checkpointing", True)):
        counted = iteration_flops(arch, checkpointing=ckpt, num_steps=num_steps)
        entry["passes"][key] = counted.pop("passes")
        entry["iteration"][key] = counted
    at_preset = entry["iteration"]["checkpointing" if s["gradient_checkpointing"] else "no_checkpointing"]
    entry["estimates"] = {sched: seconds_at_mfu(at_preset[sched]["total"], s["batch_size"])
                          for sched in ("tdm", "official")}
    return entry


def print_table(results: dict) -> None:
    print(f"TFLOP per sample-iteration (K = {results['num_steps']}; counted on the meta device, batch 1)")
    print(f"{'architecture':18} {'roles':8} {'ckpt':5} {'schedule':9} {'student':>9} {'teacher':>9} {'fake':>9} "
          f"{'total':>9} {'ratio':>6}")
    for name, entry in results["architectures"].items():
        for key, label in (("no_checkpointing", "off"), ("checkpointing", "on")):
            it = entry["iteration"][key]
            label += "*" if (key == "checkpointing") == entry["gradient_checkpointing"] else ""
            for sched in ("tdm", "official"):
                r = it[sched]
                ratio = f"{it['ratio']:6.3f}" if sched == "tdm" else ""
                print(f"{name:18} {entry['roles']:8} {label:5} {sched:9} {r['student']:9.2f} {r['teacher']:9.2f} "
                      f"{r['fake']:9.2f} {r['total']:9.2f} {ratio:>6}")
    print("* the preset's setting")
    print(f"\nEstimated seconds per iteration and process at {MFU:.0%} MFU, at the preset's batch per process and "
          f"checkpointing (estimates from counted FLOPs, not measurements; the counts include checkpointing's "
          f"recompute, so this is {MFU:.0%} of peak on the FLOPs the GPU executes)")
    print(f"{'architecture':18} {'batch':>5} {'tdm H100':>9} {'tdm A800':>9} {'off. H100':>9} {'off. A800':>9}")
    for name, entry in results["architectures"].items():
        e = entry["estimates"]
        print(f"{name:18} {entry['batch_size']:5d} {e['tdm']['H100']:9.2f} {e['tdm']['A800']:9.2f} "
              f"{e['official']['H100']:9.2f} {e['official']['A800']:9.2f}")
    b = results["paper_pixart_budget"]
    print(f"\nPaper, PixArt-alpha (its TDM-1024): {b['iterations']} iterations at total batch {b['total_batch']} in "
          f"{b['a800_hours']:g} A800-hours = {b['a800_seconds_per_iteration']:.1f} A800-seconds per iteration "
          f"({b['seconds_per_iteration_per_process']:.2f} s on each of {b['processes']} A800s at batch "
          f"{b['total_batch'] // b['processes']}). The A800 utilisation that implies with the counted FLOPs:")
    for name, by_ckpt in b["implied_utilisation"].items():
        print(f"  {name:18} " + "; ".join(f"checkpointing {'on' if key == 'checkpointing' else 'off'}: tdm "
                                          f"{u['tdm']:.0%}, official {u['official']:.0%}"
                                          for key, u in by_ckpt.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    expected, mc = expected_student_forwards(args.num_steps), monte_carlo_student_forwards(args.num_steps)
    print(f"student forwards per sample under tdm at K = {args.num_steps}: {expected:.4f} (formula), "
          f"{mc:.4f} (Monte Carlo over 100000 of tdm's draws)")
    results = {"command": " ".join(["python benchmarks/flops.py", *sys.argv[1:]]), "num_steps": args.num_steps,
               "counted_on": "meta device, batch 1 (per sample); torch.utils.flop_counter.FlopCounterMode",
               "not_counted": "text encoders and VAE (embeddings are cached); norms and elementwise ops",
               "unit": "TFLOP per sample", "mfu": MFU, "peak_tflops": PEAK_TFLOPS,
               "expected_student_forwards": {"formula": expected, "monte_carlo": mc, "draws": 100_000},
               "architectures": {}}
    for name in args.architectures:
        results["architectures"][name] = measure(ARCHITECTURES[name], args.num_steps)
        print(f"counted {name}", flush=True)
    results["paper_pixart_budget"] = paper_pixart_budget(results["architectures"])
    print_table(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "flops.json", json.dumps(results, indent=1))
    print(f"wrote {out / 'flops.json'}")


if __name__ == "__main__":
    main()
