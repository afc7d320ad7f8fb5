"""Learning rates for LoRA roles, measured: LoRA at several multiples of the full fine-tune's rates, on digits.

The full fine-tune (train.roles=separate) runs at the digits preset's rates; each LoRA cell (train.roles=lora,
the backbone's default targets, rank 16, alpha 16) multiplies both rates by m, keeping their ratio. Budget,
sampling and reference are those of benchmarks/ablations.py (200 iterations at batch 32, 500 samples at
K = 1, 2, 4, 8, FD to the teacher's 50-step samples), 3 seeds per cell; results are written after every run.

    python benchmarks/lora_lr.py --out benchmarks/results [--multipliers 1,4,16,64] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ablations import TOYS, reference, summarise, train_and_sample  # benchmarks/ is on sys.path as a script
from tdm.config import load_config
from tdm.files import write_text_atomic
from tdm.registry import build_backbone


def cells(multipliers: list[float], preset) -> dict[str, list[str]]:
    """Cell name -> overrides: the full fine-tune, then LoRA at m x both preset rates."""
    o = preset.optim
    out = {"full x1": ["train.roles=separate"]}
    for m in multipliers:
        out[f"lora x{m:g}"] = ["train.roles=lora", f"optim.generator_lr={o.generator_lr * m:g}",
                               f"optim.fake_lr={o.fake_lr * m:g}"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--multipliers", default="1,4,16,64")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    spec = TOYS["digits"]
    preset = load_config(spec["preset"])
    backbone = build_backbone(preset.backbone)
    ref_features, ref_rows = reference(backbone, preset, spec["samples"])
    path = Path(args.out) / "lora_lr.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(command="python benchmarks/lora_lr.py " + " ".join(sys.argv[1:]), reference=ref_rows,
                settings={k: spec[k] for k in ("iterations", "batch_size", "samples")},
                preset_rates={"generator_lr": preset.optim.generator_lr, "fake_lr": preset.optim.fake_lr})
    data.setdefault("cells", {})
    seeds = [int(s) for s in args.seeds.split(",")]
    for name, overrides in cells([float(m) for m in args.multipliers.split(",")], preset).items():
        runs = data["cells"].setdefault(name, {"overrides": overrides, "runs": []})["runs"]
        for seed in seeds[len(runs):]:
            # LoRA roles inject their adapters into the teacher: each run gets a fresh one
            runs.append(train_and_sample(overrides, seed, build_backbone(preset.backbone), ref_features, spec))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(data, indent=1))
            print(f"{name} seed {seed}: fd_teacher50 at K=4 {runs[-1]['steps']['4']['fd_teacher50']:.4g}",
                  flush=True)
    print(f"digits, {spec['iterations']} iterations at batch {spec['batch_size']}: fd_teacher50 (mean ± std over "
          f"{len(seeds)} seeds)")
    print(f"{'cell':<12}" + "".join(f"{'K=' + K:>18}" for K in ("1", "2", "4", "8")) + f"{'acc K=4':>10}")
    for name, cell in data["cells"].items():
        stats = summarise(cell["runs"])
        print(f"{name:<12}" + "".join(f"{stats[K]['fd_teacher50']['mean']:>10.4g} ± "
                                      f"{stats[K]['fd_teacher50']['std']:<5.2g}" for K in ("1", "2", "4", "8"))
              + f"{statistics.fmean(r['steps']['4']['class_accuracy'] for r in cell['runs']):>10.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
