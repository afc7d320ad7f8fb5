"""How much bf16 rounding corrupts the generator's signal, the x0 difference fake - teacher, per tau band.

The generator loss regresses the student's x0 onto sg(x0) + (teacher - fake) with a per-element pseudo-Huber of
c = 1e-3 (tdm.core.losses.generator_loss), so each element's gradient is psi(d) = d / sqrt(d^2 + c^2) of
d = fake_x0 - teacher_x0: nearly sign(d). This measures d at tau in 10 bands across [0, T-1] on SD1.5's schedule
(scaled_linear betas 0.00085..0.012, epsilon prediction) with the "mid" UNet2DConditionModel of
benchmarks/roles_memory.py (SD1.5's layout at 0.4x width, 142 M parameters), three ways:

  fp32      teacher and fake score with float32 weights, computed in float32 (the reference)
  bf16      both with bfloat16 weights (backbone.dtype=bfloat16 copies, as full fine-tuning did before its copies
            became float32)
  autocast  float32 weights under torch.autocast(bfloat16) (train.mixed_precision=bf16; --autocast, slow on CPUs)

and reports, per band, for the conditional teacher (and with --guided also the CFG teacher), the relative error of d,
||d_low - d_fp32|| / ||d_fp32||, the fraction of elements where sign(d_low) = sign(d_fp32), and the cosine between
psi(d_low) and psi(d_fp32) (the generator gradient's direction w.r.t. x0). Forward times per precision are CPU
numbers, a poor proxy for a GPU (the FLOPs are equal; bf16 tensor cores are about 2x faster than TF32 there).

Weights are random (seeded) and rounded to bfloat16 first, so all three runs share one teacher; the fake score is
that teacher with Gaussian noise of `--fake-noise` times each tensor's std added to every weight (a fake score
that has drifted a little from the teacher, as during distillation).

    python benchmarks/bf16_signal.py [--bands 6] [--batch 2] [--fake-noise 1e-2] [--guided] [--autocast]
                                     [--out runs/bench]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

from roles_memory import CONFIGS, TextUNet  # the mid network, built as the memory benchmark builds it
from tdm.core.prediction import PredictionType, to_x0
from tdm.core.schedules import DiscreteVP
from tdm.files import write_text_atomic

GUIDANCE, HUBER_C = 4.5, 1e-3  # tdm's default CFG scale and pseudo-Huber c


def build(fake_noise: float, seed: int = 0) -> tuple[TextUNet, TextUNet]:
    """The teacher (bf16-representable float32 weights) and a fake score perturbed from it by `fake_noise`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    teacher = TextUNet(UNet2DConditionModel(**CONFIGS["mid"])).eval().requires_grad_(False)
    teacher.to(torch.bfloat16).float()  # one shared network: the teacher as loaded in bf16
    fake = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in fake.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * (fake_noise * float(p.std())))
    return teacher, fake


def run(model: TextUNet, precision: str, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Raw output in float32 of `model` (bf16 weights for precision bf16, else float32) at `precision`."""
    dtype = next(model.parameters()).dtype
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()
    with context:
        return model(x.to(dtype), t, cond.to(dtype)).float()


def psi(d: torch.Tensor) -> torch.Tensor:
    """Per-element gradient direction of the pseudo-Huber generator loss w.r.t. the student's x0."""
    return d / (d.square() + HUBER_C**2).sqrt()


def compare(d: torch.Tensor, ref: torch.Tensor) -> dict:
    d, ref = d.double(), ref.double()
    return {"rel_err": float((d - ref).norm() / ref.norm()),
            "sign_agreement": float((d.sign() == ref.sign()).double().mean()),
            "psi_cosine": float(torch.nn.functional.cosine_similarity(psi(d).flatten(), psi(ref).flatten(), dim=0))}


def measure(args) -> dict:
    schedule = DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012)
    T, prediction = schedule.num_train_timesteps, PredictionType.EPSILON
    precisions = ("fp32", "bf16", *(["autocast"] if args.autocast else []))
    teacher, fake = build(args.fake_noise)
    models = {p: (teacher, fake) for p in precisions}
    models["bf16"] = tuple(copy.deepcopy(m).to(torch.bfloat16) for m in (teacher, fake))
    kw = CONFIGS["mid"]
    g = torch.Generator().manual_seed(2)
    shape = (args.batch, kw["in_channels"], kw["sample_size"], kw["sample_size"])
    cond = torch.randn(args.batch, 8, kw["cross_attention_dim"], generator=g)
    if args.guided:  # conditional and unconditional halves, one 2B call
        cond = torch.cat([cond, torch.zeros_like(cond)])
    repeat = 2 if args.guided else 1
    edges = torch.linspace(0, T, args.bands + 1).round().long()
    rows, seconds = [], {p: [] for p in precisions}
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        tau = torch.randint(lo, hi, (args.batch,), generator=g)
        x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        x_tau = schedule.add_noise(x0, noise, tau)
        d = {}
        for precision in precisions:
            tic = time.perf_counter()
            low_teacher, low_fake = models[precision]
            out_t = run(low_teacher, precision, x_tau.repeat(repeat, 1, 1, 1), tau.repeat(repeat), cond)
            out_f = run(low_fake, precision, x_tau, tau, cond[:args.batch])
            seconds[precision].append(time.perf_counter() - tic)
            cond_out = out_t[:args.batch]
            fake_x0 = to_x0(out_f, x_tau, tau, schedule, prediction)
            d[precision] = {"unguided": fake_x0 - to_x0(cond_out, x_tau, tau, schedule, prediction)}
            if args.guided:
                guided = out_t[args.batch:] + GUIDANCE * (cond_out - out_t[args.batch:])
                d[precision]["guided"] = fake_x0 - to_x0(guided, x_tau, tau, schedule, prediction)
        ref = d["fp32"]
        row = {"band": [lo, hi - 1], "tau": tau.tolist(),
               "d_rms_fp32": {k: float(v.square().mean().sqrt()) for k, v in ref.items()},
               "sigma_over_alpha": float((schedule.sigma(tau) / schedule.alpha(tau)).mean())}
        for precision in precisions[1:]:
            row[precision] = {k: compare(d[precision][k], ref[k]) for k in ref}
        rows.append(row)
        print(f"tau {lo:3d}-{hi - 1:3d}  rms(d) {row['d_rms_fp32']['unguided']:.2e}  " + "  ".join(
            f"{p} {k}: rel.err {m['rel_err']:6.3f} sign {m['sign_agreement']:.3f} cos(psi) {m['psi_cosine']:.3f}"
            for p in precisions[1:] for k, m in row[p].items()), flush=True)
    return {"rows": rows, "seconds_per_band": {p: sum(s) / len(s) for p, s in seconds.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bands", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--fake-noise", type=float, default=1e-2, help="fake = teacher + this x std(w) x N(0, 1)")
    parser.add_argument("--guided", action="store_true", help=f"also the CFG teacher (scale {GUIDANCE})")
    parser.add_argument("--autocast", action="store_true", help="also float32 weights under bf16 autocast")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args)
    print("seconds per band (teacher and fake score calls): "
          + ", ".join(f"{p} {s:.2f}" for p, s in result["seconds_per_band"].items()))
    command = "python benchmarks/bf16_signal.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    write_text_atomic(out / "bf16_signal.json", json.dumps({
        "command": command.strip(), "network": {"config": "mid", **CONFIGS["mid"]}, "threads": args.threads,
        "schedule": "scaled_linear 0.00085..0.012, epsilon, T = 1000", "guidance_scale": GUIDANCE,
        "huber_c": HUBER_C, "fake_noise": args.fake_noise, "batch": args.batch, **result}, indent=1))
    print(f"wrote {out / 'bf16_signal.json'}")


if __name__ == "__main__":
    main()
