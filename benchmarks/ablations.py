"""The paper's ablations (method.md Part 2 G.6) on the two toys, 3 training seeds per cell.

Each variant is the toy's preset plus a few `--set` overrides, trained for a short, fixed budget and sampled
at 1, 2, 4 and 8 steps on fixed conditions and seeds. Cells report mean and spread (sample std over seeds)
of the toy's metrics. Results are written after every run, so an interrupted run resumes where it stopped.

    python benchmarks/ablations.py --out benchmarks/results            # both toys, every variant, 3 seeds
    python benchmarks/ablations.py --toys digits --variants unify,k1   # a subset
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tdm.config import load_config
from tdm.core.sampling import teacher_grid
from tdm.files import write_text_atomic
from tdm.metrics import frechet_distance
from tdm.registry import build_backbone
from tdm.samplers import Sampler, draw_samples, student_samplers
from tdm.trainer import Trainer

# name -> (description, overrides). Overrides equal to a toy's preset make that variant the preset itself.
VARIANTS = {
    "preset": ("TDM, K = 4 (the toy's preset)", []),
    "k1": ("K = 1 (pure distribution matching, DMD-style)", ["tdm.num_steps=1"]),
    "k2": ("K = 2", ["tdm.num_steps=2"]),
    "overlap": ("overlap noise bands, fake score without step conditioning", ["tdm.interval=overlap"]),
    "overlap_step": ("overlap noise bands, step-aware fake score",
                     ["tdm.interval=overlap", "tdm.fake_step_condition=true"]),
    "clean": ("fake-score input diffused from the clean prediction x0", ["tdm.diffuse_from=clean"]),
    "iw_off": ("importance weight off", ["tdm.importance_weight=off"]),
    "iw_clipped": ("importance weight clipped at 20", ["tdm.importance_weight=clipped"]),
    "huber": ("pseudo-Huber per element (c = 1e-3)", ["tdm.generator_loss=pseudo_huber"]),
    "huber_vector": ("pseudo-Huber on the whole vector (paper)", ["tdm.generator_loss=pseudo_huber_vector"]),
    "mse": ("MSE generator loss", ["tdm.generator_loss=mse"]),
    "randmid": ("randmid (t_mid drawn inside the band)", ["tdm.randmid=true"]),
    "ratio1": ("fake:generator updates 1:1", ["optim.fake_updates=1"]),
    "ratio5": ("fake:generator updates 5:1", ["optim.fake_updates=5"]),
    "unify": ("TDM-unify over K in {1, 2, 4}", ["tdm.num_steps_set=[1, 2, 4]"]),
}
TOYS = {  # preset, training budget (sized so the whole table takes under an hour on 2 CPU cores),
          # samples per evaluation, the metric the table leads with
    "digits": {"preset": "digits-demo", "iterations": 200, "batch_size": 32, "samples": 500,
               "headline": "fd_teacher50"},
    "toy-gmm": {"preset": "toy-gmm", "iterations": 300, "batch_size": 512, "samples": 2000,
                "headline": "energy_distance"},
}
STEPS = (1, 2, 4, 8)
SEEDS = (0, 1, 2)
EVAL_SEED = 1234


def _same_as_preset(toy: str, overrides: list[str]) -> bool:
    base, varied = load_config(TOYS[toy]["preset"]), load_config(TOYS[toy]["preset"], overrides)
    return base == varied


def reference(backbone, config, samples: int):
    """Features of the teacher's 50-step CFG samples (other seeds than the students'), and teacher rows."""
    scale = config.tdm.guidance_scale
    rows = {}
    ref, _, _ = draw_samples(backbone, Sampler("teacher50", backbone.teacher, teacher_grid(backbone.schedule, 50),
                                               scale), samples, EVAL_SEED + 1)
    ref_features = backbone.features(ref)
    for n in (50, 4):
        sampler = Sampler(f"teacher{n}", backbone.teacher, teacher_grid(backbone.schedule, n), scale)
        x, cond, _ = draw_samples(backbone, sampler, samples, EVAL_SEED)
        rows[f"teacher{n}"] = {**backbone.metrics(x, cond), "fd_teacher50": frechet_distance(backbone.features(x),
                                                                                             ref_features)}
    rows["floor"] = backbone.floor_metrics(samples)
    return ref_features, rows


def train_and_sample(overrides: list[str], seed: int, backbone, ref_features, spec: dict) -> dict:
    """Train the toy's preset plus `overrides` from `seed` for the spec's budget; sample at every K in STEPS."""
    overrides = [*overrides, f"train.seed={seed}", f"train.iterations={spec['iterations']}",
                 f"train.batch_size={spec['batch_size']}",
                 "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=50"]
    config = load_config(spec["preset"], overrides)
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out, backbone=backbone)
        trainer.train()
        if trainer.stopped_by:  # a stop signal: keep the finished runs, record nothing half-trained
            trainer.close()
            sys.exit(f"ablations: stopped by {trainer.stopped_by}; rerun the same command to continue")
        seconds = time.perf_counter() - tic
        result = {}
        for sampler in student_samplers(trainer.student_for_sampling(), config.tdm, backbone.schedule, STEPS):
            K = sampler.grid.num_steps
            x, cond, _ = draw_samples(backbone, sampler, spec["samples"], EVAL_SEED)
            result[str(K)] = {**backbone.metrics(x, cond),
                              "fd_teacher50": frechet_distance(backbone.features(x), ref_features)}
        trainer.close()
    return {"train_seconds": seconds, "steps": result}


def summarise(runs: list[dict]) -> dict:
    """Mean and sample std over seeds, per step count and metric."""
    out = {}
    for K in map(str, STEPS):
        out[K] = {}
        for metric in runs[0]["steps"][K]:
            values = [r["steps"][K][metric] for r in runs]
            out[K][metric] = {"mean": statistics.fmean(values),
                              "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return out


def unify_check(results: dict) -> dict:
    """TDM-unify sampled at K against the student trained for that K alone, in the toy's headline metric."""
    headline = results["settings"]["headline"]
    out = {}
    for K, specialised in (("1", "k1"), ("2", "k2"), ("4", "preset")):
        u = summarise(results["cells"]["unify"]["runs"])[K][headline]["mean"]
        s = summarise(results["cells"][specialised]["runs"])[K][headline]["mean"]
        out[K] = {"unify": u, "specialised": s, "ratio": u / s}
    return out


def table(toy: str, results: dict) -> str:
    headline = TOYS[toy]["headline"]
    lines = [f"{toy}: {headline} (mean ± std over seeds) at K sampling steps",
             f"{'variant':<16}" + "".join(f"{'K=' + str(K):>18}" for K in STEPS)]
    for variant, cell in results["cells"].items():
        stats = summarise(cell["runs"])
        lines.append(f"{variant:<16}" + "".join(
            f"{stats[str(K)][headline]['mean']:>10.4g} ± {stats[str(K)][headline]['std']:<5.2g}" for K in STEPS))
    for name, row in results["reference"].items():
        if headline in row:
            lines.append(f"{name:<16}{row[headline]:>10.4g}")
    return "\n".join(lines)


# The paper's signs (method.md Part 2 G.6) and a few of ours: (claim, better variant, its K, worse variant, its K).
CLAIMS = [
    ("several sampling steps beat one step of pure distribution matching", "preset", 4, "k1", 1),
    ("a step-aware fake score beats a step-blind one (overlap bands)", "overlap_step", 4, "overlap", 4),
    ("diffusing the trajectory sample beats diffusing the clean prediction", "preset", 4, "clean", 4),
    ("pseudo-Huber per element beats MSE", "huber", 4, "mse", 4),
    ("pseudo-Huber on the whole vector beats MSE", "huber_vector", 4, "mse", 4),
    ("the tempered importance weight beats none", "preset", 4, "iw_off", 4),
    ("randmid beats a fixed t_mid", "randmid", 4, "preset", 4),
    ("5 fake-score updates per generator update beat 1", "ratio5", 4, "ratio1", 4),
    ("TDM-unify at 1 step matches or beats K = 1 alone", "unify", 1, "k1", 1),
    ("TDM-unify at 4 steps matches or beats K = 4 alone", "unify", 4, "preset", 4),
]
SECONDARY = {"digits": ("fd_train", "class_accuracy"), "toy-gmm": ("nll", "in_mode_fraction")}


def _cell(toy: str, results: dict, variant: str) -> dict | None:
    """A variant's cell; a variant equal to the toy's preset is the preset's cell."""
    if variant in results["cells"]:
        return results["cells"][variant]
    if _same_as_preset(toy, VARIANTS[variant][1]):
        return results["cells"].get("preset")
    return None


def verdict(toy: str, results: dict, better: str, k_better: int, worse: str, k_worse: int) -> dict | None:
    """Does `better` beat `worse` in the headline metric (lower is better) by more than 2 standard errors?"""
    a, b = _cell(toy, results, better), _cell(toy, results, worse)
    if a is None or b is None or a is b:
        return None
    headline = results["settings"]["headline"]
    sa, sb = summarise(a["runs"])[str(k_better)][headline], summarise(b["runs"])[str(k_worse)][headline]
    se = (sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"]) ** 0.5
    diff = sb["mean"] - sa["mean"]
    word = "holds" if diff > 2 * se else "reversed" if diff < -2 * se else "within noise"
    return {"better": sa, "worse": sb, "difference": diff, "standard_error": se, "verdict": word}


def _fmt(stat: dict) -> str:
    return f"{stat['mean']:.4g} ± {stat['std']:.2g}"


def page(data: dict) -> str:
    """docs/ablations.md: settings, one table per toy, and the paper's signs, claim by claim."""
    lines = ["# Ablations on the toys: which of the paper's signs hold here", "",
             "Generated by `benchmarks/ablations.py` from `benchmarks/results/ablations.json`; do not edit by hand.",
             f"Command: `{data.get('command', '')}`.", "",
             "Each cell is the toy's preset plus the variant's overrides, trained from 3 seeds (`train.seed` 0, 1, 2) "
             "for a short fixed budget, then sampled at K = 1, 2, 4, 8 steps on the same conditions and noise "
             "(seed 1234). Cells show mean ± sample std over the seeds. Lower is better for every distance. "
             "A claim *holds* when the better variant's mean is lower by more than two standard errors of the "
             "difference, is *reversed* when it is higher by as much, and is *within noise* otherwise. Every "
             "cell is evaluated on the same noise, so the spread is the training seeds' alone; the estimate's own "
             "sampling noise, common to all cells, shows in the teacher-vs-teacher and real-data floor rows. A "
             "variant whose overrides equal the toy's preset is not run again: it *is* the preset row (digits: "
             "`mse`, `ratio1`; toy-gmm: `huber`).", ""]
    for toy, results in data.items():
        if not isinstance(results, dict) or "cells" not in results:
            continue
        st, headline = results["settings"], results["settings"]["headline"]
        lines += [f"## {toy}", "",
                  f"{st['iterations']} iterations at batch {st['batch_size']}, {st['samples']} samples per "
                  f"evaluation; headline metric `{headline}`.", "",
                  "| variant | overrides | " + " | ".join(f"K={K}" for K in STEPS) + " | "
                  + " | ".join(f"{m} (K=4)" for m in SECONDARY[toy]) + " | train s |",
                  "|---|---|" + "---|" * (len(STEPS) + len(SECONDARY[toy]) + 1)]
        for variant, cell in results["cells"].items():
            stats = summarise(cell["runs"])
            seconds = statistics.fmean(r["train_seconds"] for r in cell["runs"])
            lines.append(f"| {variant}: {cell['description']} | `{' '.join(cell['overrides']) or '-'}` | "
                         + " | ".join(_fmt(stats[str(K)][headline]) for K in STEPS) + " | "
                         + " | ".join(_fmt(stats["4"][m]) for m in SECONDARY[toy]) + f" | {seconds:.0f} |")
        for name, row in results["reference"].items():
            label = {"floor": "real data (floor)"}.get(name, f"{name} (teacher, DDIM, the preset's CFG)")
            cells = [f"{row[headline]:.4g}" if headline in row else "" for _ in STEPS[:1]]
            lines.append(f"| {label} | | {cells[0]} | | | | "
                         + " | ".join(f"{row[m]:.4g}" if m in row else "" for m in SECONDARY[toy]) + " | |")
        lines += ["", "The teacher and floor rows are single evaluations at their own step counts "
                  "(shown in the K=1 column).", "", "| claim | better (K) | worse (K) | difference | verdict |",
                  "|---|---|---|---|---|"]
        for claim, better, kb, worse, kw in CLAIMS:
            v = verdict(toy, results, better, kb, worse, kw)
            if v is None:
                continue
            lines.append(f"| {claim} | {better} ({kb}): {_fmt(v['better'])} | {worse} ({kw}): {_fmt(v['worse'])} "
                         f"| {v['difference']:.3g} ± {v['standard_error']:.2g} | **{v['verdict']}** |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toys", default="toy-gmm,digits")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--iterations", type=int, default=None, help="training budget (default: per toy)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default: per toy)")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a shared machine)")
    parser.add_argument("--page", default=None, help="also write the markdown page here (docs/ablations.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    path = out / "ablations.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    command = "python benchmarks/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    for toy in args.toys.split(","):
        spec = {**TOYS[toy], **({"iterations": args.iterations} if args.iterations else {}),
                **({"batch_size": args.batch_size} if args.batch_size else {})}
        results = data.setdefault(toy, {"settings": {**spec, "steps": STEPS, "eval_seed": EVAL_SEED}, "cells": {}})
        backbone = build_backbone(load_config(spec["preset"]).backbone)
        ref_features, results["reference"] = reference(backbone, load_config(spec["preset"]), spec["samples"])
        for variant in args.variants.split(","):
            description, overrides = VARIANTS[variant]
            if variant != "preset" and _same_as_preset(toy, overrides):
                continue  # this toy's preset already is this variant
            cell = results["cells"].setdefault(variant, {"description": description, "overrides": overrides,
                                                         "runs": []})
            for seed in seeds:
                if any(r["seed"] == seed for r in cell["runs"]):
                    continue  # done in an earlier, interrupted invocation
                run = {"seed": seed, **train_and_sample(overrides, seed, backbone, ref_features, spec)}
                cell["runs"].append(run)
                data["command"] = command
                write_text_atomic(path, json.dumps(data, indent=1))
                print(f"{toy} {variant} seed {seed}: {run['train_seconds']:.0f} s, "
                      f"{spec['headline']} at K=4 {run['steps']['4'][spec['headline']]:.4g}", flush=True)
        print(table(toy, results), flush=True)
        if {"unify", "k1", "k2", "preset"} <= set(results["cells"]):
            results["unify_check"] = unify_check(results)
            print("\n".join(f"unify at K={K}: {c['unify']:.4g} vs specialised {c['specialised']:.4g} "
                            f"({100 * (c['ratio'] - 1):+.1f}%)" for K, c in results["unify_check"].items()))
    write_text_atomic(path, json.dumps(data, indent=1))
    if args.page:
        write_text_atomic(Path(args.page), page(data))


if __name__ == "__main__":
    main()
