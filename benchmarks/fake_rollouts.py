"""Further fake-score updates on the generator's rollout, or on fresh student rollouts (optim.fresh_fake_rollouts).

With optim.fake_updates > 1, tdm's further fake-score updates either reuse the rollout the generator update
differentiates from, or each roll out new conditions and noise through the same student (DMD2's fresh samples),
which costs one more K-step student rollout (no gradient) per further update. Each cell is toy-gmm's preset plus
its overrides, trained and sampled as in benchmarks/ablations.py (same budget, conditions and noise), from 3 seeds.
A `reuse<n>_time` cell gives the reusing run the iterations that the fresh run's measured training time buys.

    python benchmarks/fake_rollouts.py --out benchmarks/results [--fake-updates 2,4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from ablations import SEEDS, TOYS, reference, summarise, train_and_sample
from tdm.config import load_config
from tdm.files import write_text_atomic
from tdm.registry import build_backbone

TOY = "toy-gmm"
METRICS = ("energy_distance", "nll", "in_mode_fraction")


def _fmt(stat: dict) -> str:
    return f"{stat['mean']:.4g} ± {stat['std']:.2g}"


def table(cells: dict) -> str:
    lines = [f"{TOY}, K = 4 sampling steps (mean ± std over seeds); lower is better but for in_mode_fraction",
             f"{'cell':<12}{'iterations':>11}" + "".join(f"{m:>22}" for m in METRICS) + f"{'train s':>10}"]
    for name, cell in cells.items():
        stats = summarise(cell["runs"])["4"]
        seconds = statistics.fmean(r["train_seconds"] for r in cell["runs"])
        lines.append(f"{name:<12}{cell['iterations']:>11}" + "".join(f"{_fmt(stats[m]):>22}" for m in METRICS)
                     + f"{seconds:>10.1f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--fake-updates", default="2", help="comma-separated optim.fake_updates values (2,4)")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec, seeds = TOYS[TOY], [int(s) for s in args.seeds.split(",")]
    config = load_config(spec["preset"])
    backbone = build_backbone(config.backbone)
    ref_features, rows = reference(backbone, config, spec["samples"])
    path = Path(args.out) / "fake_rollouts.json"
    result = json.loads(path.read_text()) if path.is_file() else {"toy": TOY, "cells": {}}
    result.update(command="python benchmarks/fake_rollouts.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  settings={**spec, "threads": args.threads}, reference=rows)
    cells = result["cells"]

    def run_cell(name: str, fake_updates: int, fresh: bool, iterations: int) -> None:
        """Train the cell's missing seeds (an interrupted invocation resumes); write the JSON after each."""
        overrides = [f"optim.fake_updates={fake_updates}", f"optim.fresh_fake_rollouts={str(fresh).lower()}"]
        cell = cells.setdefault(name, {"fake_updates": fake_updates, "fresh_fake_rollouts": fresh,
                                       "iterations": iterations, "overrides": overrides, "runs": []})
        for seed in seeds:
            if any(r["seed"] == seed for r in cell["runs"]):
                continue
            run = train_and_sample(overrides, seed, backbone, ref_features, {**spec, "iterations": iterations})
            cell["runs"].append({"seed": seed, **run})
            print(f"{name} seed {seed}: {run['train_seconds']:.1f} s, energy distance at K=4 "
                  f"{run['steps']['4']['energy_distance']:.4g}", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(result, indent=1))

    for updates in map(int, args.fake_updates.split(",")):
        run_cell(f"reuse{updates}", updates, False, spec["iterations"])
        run_cell(f"fresh{updates}", updates, True, spec["iterations"])
        # reusing, given the training time that fresh rollouts took
        ratio = (statistics.median(r["train_seconds"] for r in cells[f"fresh{updates}"]["runs"])
                 / statistics.median(r["train_seconds"] for r in cells[f"reuse{updates}"]["runs"]))
        run_cell(f"reuse{updates}_time", updates, False, round(spec["iterations"] * ratio))
    result["summary_k4"] = {name: summarise(c["runs"])["4"] for name, c in cells.items()}
    write_text_atomic(path, json.dumps(result, indent=1))
    print(table(cells))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
