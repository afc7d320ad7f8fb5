"""Reward post-training (TDM-R1, `tdm reward`) of the digits demo's 4-step student, on the CPU (docs/reward.md 3.7).

Experiment 1: a non-differentiable 0/1 reward with headroom, `digits-confident` (the classifier's probability of the
requested class above a threshold whose base rate on the start student is measured first and stated).
Experiment 2: `digits-thickness` with a target above the teacher's ink, TDM-R1 against the naive alternative
without the distribution-matching regulariser (reward.regulariser_weight = 0), on the same budget.
Every arm from `--seeds` seeds; before and after: the reward, FD to the teacher's 50-step samples (fd_teacher50)
and to the training digits (fd_train), class accuracy, all at 4 steps on eval.num_samples samples with the
evaluation's seeds. Writes <out>/reward_digits.json and before/after grids <out>/reward_digits_<arm>.png.

    python benchmarks/reward_digits.py [--start runs/demo] [--iterations 150] [--seeds 0 1 2]

--start: the demo run (`make demo`, or `tdm demo --out runs/demo`); trained here with the demo's config if absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from tdm.cli import main as tdm_main
from tdm.config import from_dict, to_dict
from tdm.files import atomic_write, write_text_atomic
from tdm.metrics import frechet_distance
from tdm.report import image_grid
from tdm.reward_stage import RewardTrainer
from tdm.rewards import load_reward, score
from tdm.runs import open_run
from tdm.samplers import draw_samples, student_samplers, teacher_samplers

CONFIDENT = 1 - 1e-9          # Experiment 1's threshold (base rate measured below, printed and recorded)
THRESHOLDS = (0.99, 1 - 1e-6, 1 - 1e-8, CONFIDENT, 1 - 1e-10)
THICK = 0.40                  # Experiment 2's ink target; the teacher's 4-step samples average 0.315 +- 0.021
COMMON = ["train.eval_every=0", "train.report_to=none", "train.log_every=50", "train.checkpoint_every=0"]
ARMS = {  # name: (experiment, reward, options, overrides)
    "confident_tdmr1": (1, "digits-confident", f"threshold={CONFIDENT!r}", []),
    "thick_tdmr1": (2, "digits-thickness", f"target={THICK}", []),
    "thick_no_regulariser": (2, "digits-thickness", f"target={THICK}", ["reward.regulariser_weight=0"]),
}
TUNED = ["reward.weight=0.3", "reward.lr=1e-4", "reward.tau_max=600"]  # this toy's settings (docs/reward.md 3.7)


class Evaluation:
    """The start run's teacher and evaluation set: reward, fd_teacher50, fd_train and class accuracy of a student
    at 4 steps, and its first 20 samples for the grids."""

    def __init__(self, trainer: RewardTrainer):
        self.backbone, cfg = trainer.backbone, trainer.config
        self.tdm_config, self.n, self.seed = cfg.tdm, cfg.eval.num_samples, cfg.eval.seed
        teacher = teacher_samplers(trainer.teacher, self.backbone.schedule, [50], cfg.tdm.guidance_scale)[0]
        reference = draw_samples(self.backbone, teacher, self.n, self.seed + 1)[0]
        self.reference = self.backbone.features(reference)
        self.rewards = {"confident": load_reward("digits-confident", threshold=CONFIDENT),
                        "ink": load_reward("digits-thickness"), "thick": load_reward("digits-thickness", target=THICK)}
        self.thresholds = {t: load_reward("digits-confident", threshold=t) for t in THRESHOLDS}

    @torch.no_grad()
    def __call__(self, student) -> tuple[dict, torch.Tensor]:
        sampler = student_samplers(student, self.tdm_config, self.backbone.schedule, [4])[0]
        samples, cond, _ = draw_samples(self.backbone, sampler, self.n, self.seed)
        images = self.backbone.to_images(samples)
        out = {name: float(score(r, images, cond).mean()) for name, r in self.rewards.items()}
        out["fd_teacher50"] = frechet_distance(self.backbone.features(samples), self.reference)
        metrics = self.backbone.metrics(samples, cond)
        out.update(fd_train=metrics["fd_train"], class_accuracy=metrics["class_accuracy"])
        return out, images[:20]

    def base_rates(self, student) -> dict:
        sampler = student_samplers(student, self.tdm_config, self.backbone.schedule, [4])[0]
        samples, cond, _ = draw_samples(self.backbone, sampler, self.n, self.seed)
        images = self.backbone.to_images(samples)
        return {repr(t): float(score(r, images, cond).mean()) for t, r in self.thresholds.items()}


def reward_trainer(start: Path, arm: str, seed: int, iterations: int, out: Path) -> RewardTrainer:
    """The reward stage of `arm` from the start run, as `tdm reward --from start` builds it."""
    _, reward, options, overrides = ARMS[arm]
    run = open_run(start)
    config = from_dict(to_dict(run.config), [f"reward.name={reward}", f"reward.options={options}", *COMMON, *TUNED,
                                             *overrides, f"train.seed={seed}", f"train.iterations={iterations}"])
    return RewardTrainer(config, out / f"{arm}_seed{seed}", run)


def post_train(trainer: RewardTrainer, evaluate: Evaluation, every: int) -> tuple[list[dict], torch.Tensor, float]:
    """train.iterations reward iterations (the trainer's own iteration, without its loop's logging), evaluated
    every `every` and at the end; returns the curve [{step, metrics}], the last grid row and training seconds."""
    curve, seconds = [], 0.0
    while trainer.state.step < trainer.config.train.iterations:
        tic = time.perf_counter()
        trainer.train_step()
        seconds += time.perf_counter() - tic
        step = trainer.state.step
        if step % every == 0 or step == trainer.config.train.iterations:
            metrics, grid = evaluate(trainer.student_for_sampling())
            curve.append({"step": step, **metrics})
            print(f"  step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    return curve, grid, seconds


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def save_grid(path: Path, before: torch.Tensor, after: list[torch.Tensor]) -> None:
    """Rows: the start student, then each seed's post-trained student (same conditions and noise per column)."""
    grid = Image.fromarray(image_grid(torch.cat([before, *after]), nrow=20))
    grid = grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST)  # 8 x 8 digits: 4 x for the eye
    atomic_write(path, lambda tmp: grid.save(tmp, format="png"))


def table(result: dict) -> str:
    keys = ("confident", "thick", "ink", "fd_teacher50", "fd_train", "class_accuracy")
    lines = ["| arm | reward | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    lines.append("| start (demo student) | | " + " | ".join(f"{result['before'][k]:.4g}" for k in keys) + " |")
    for arm, cell in result["arms"].items():
        lines.append(f"| {arm} | {ARMS[arm][1]} | " + " | ".join(
            f"{cell['after'][k]['mean']:.4g} ± {cell['after'][k]['std']:.2g}" for k in keys) + " |")
    return "\n".join(lines)


def curve_table(result: dict) -> str:
    """Per arm and evaluation: its own reward and fd_teacher50 (mean ± std over seeds): the trade-off."""
    lines = ["| arm | step | reward | fd_teacher50 |", "|---|---|---|---|"]
    key = {"digits-confident": "confident", "digits-thickness": "thick"}
    for arm, cell in result["arms"].items():
        k = key[cell["reward"]]
        lines.append(f"| {arm} | 0 | {result['before'][k]:.4g} | {result['before']['fd_teacher50']:.4g} |")
        lines += [f"| {arm} | {p['step']} | {p[k]['mean']:.4g} ± {p[k]['std']:.2g} | "
                  f"{p['fd_teacher50']['mean']:.4g} ± {p['fd_teacher50']['std']:.2g} |" for p in cell["curve"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", default="runs/demo", help="the demo run (trained with `tdm demo` if absent)")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=50, help="evaluate each run every N iterations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--runs", default="runs/reward_digits", help="folder for the reward runs")
    args = parser.parse_args()
    start, out, runs = Path(args.start), Path(args.out), Path(args.runs)
    if not (start / "checkpoints").is_dir():
        print(f"no demo run at {start}: training it (tdm demo)")
        assert tdm_main(["demo", "--out", str(start)]) == 0
    torch.set_num_threads(min(2, torch.get_num_threads()))

    first = reward_trainer(start, args.arms[0], args.seeds[0], 1, runs / "start")  # untrained: the start student
    evaluate = Evaluation(first)
    before, before_images = evaluate(first.student_for_sampling())
    rates = evaluate.base_rates(first.student_for_sampling())
    first.close()
    print(f"start student: {before}\ndigits-confident base rates by threshold: {rates}")
    result = {"start": str(start), "iterations": args.iterations, "seeds": args.seeds, "tuned": TUNED,
              "confident_threshold": CONFIDENT, "thick_target": THICK, "base_rates": rates, "before": before,
              "arms": {}}
    for arm in args.arms:
        curves, images, seconds = [], [], []
        for seed in args.seeds:
            print(f"{arm} seed {seed}", flush=True)
            trainer = reward_trainer(start, arm, seed, args.iterations, runs)
            curve, grid, elapsed = post_train(trainer, evaluate, args.eval_every)
            trainer.close()
            curves.append(curve)
            images.append(grid)
            seconds.append(elapsed)
        after = [c[-1] for c in curves]
        result["arms"][arm] = {
            "experiment": ARMS[arm][0], "reward": ARMS[arm][1], "options": ARMS[arm][2], "overrides": ARMS[arm][3],
            "train_seconds": seconds, "after": {k: _stats([r[k] for r in after]) for k in after[0] if k != "step"},
            "curve": [{"step": points[0]["step"], **{k: _stats([p[k] for p in points]) for k in points[0]
                                                      if k != "step"}} for points in zip(*curves)]}
        save_grid(out / f"reward_digits_{arm}.png", before_images, images)
        write_text_atomic(out / "reward_digits.json", json.dumps(result, indent=1, default=float))
    result["table"], result["curve_table"] = table(result), curve_table(result)
    write_text_atomic(out / "reward_digits.json", json.dumps(result, indent=1, default=float))
    print(result["table"] + "\n\n" + result["curve_table"])


if __name__ == "__main__":
    main()
