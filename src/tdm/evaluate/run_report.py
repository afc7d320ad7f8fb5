"""End-of-run report of a distillation: teacher vs student table, grids, curves, metrics.json, report.md."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from ..config import to_dict
from ..errors import MissingModel
from ..files import write_text_atomic
from ..report import curves_figure
from ..samplers import student_samplers, teacher_samplers
from .compare import compare_to_reference
from .comparison_report import write_comparison
from .features import DEFAULT_CLIP_FEATURES
from .harness import feature_space

CURVES = ("fake/loss", "generator/loss", "generator/teacher_fake_gap", "generator/grad_norm",
          ("student/x0_mean", "student/x0_std"), ("eval/student_std", "eval/teacher_std"),
          ("eval/student_mean", "eval/teacher_mean"), "eval/saturation",
          # the reward stage's (tdm reward; absent from a distillation run's history, so not drawn there)
          ("reward/mean", "eval/reward_mean"), "eval/fd_teacher", "reward_model/loss", "reward_model/drift")


def evaluate_distillation(trainer) -> dict:
    """Teacher at each eval.teacher_steps (with the run's CFG) and the student at each eval.student_steps,
    on the same conditions and seeds, with FD / KID in the backbone's features to the first teacher sampler.
    Returns the metrics.json payload plus the samples per sampler."""
    cfg, backbone = trainer.config, trainer.backbone
    samplers = teacher_samplers(trainer.teacher, backbone.schedule, cfg.eval.teacher_steps, cfg.tdm.guidance_scale)
    samplers += student_samplers(trainer.student_for_sampling(), cfg.tdm, backbone.schedule, cfg.eval.student_steps)
    features, info = report_features(backbone, trainer.accelerator.device)
    result = compare_to_reference(backbone, samplers, cfg.eval.num_samples, cfg.eval.seed, features,
                                  device=trainer.accelerator.device)
    return {**result, "features": info, "iterations": trainer.state.step, "config": to_dict(cfg),
            "warnings": trainer.diagnostics.warnings}


def report_features(backbone, device) -> tuple[Callable[[Tensor], Tensor] | None, dict]:
    """The features of the report's FD / KID and their description: the backbone's own, or where those mean
    nothing (a diffusers teacher's latents) an image network's on the decoded images: Inception's when its file
    is found, else CLIP's (DEFAULT_CLIP_FEATURES) when the local hub cache holds it; else none, with the reason."""
    if not backbone.needs_feature_network:
        return backbone.features, {"name": backbone.name, "description": backbone.features_description}
    if not backbone.is_image:  # latents without a decoder: feature_space says why there are none
        features, _, info = feature_space("auto", backbone, None, device)
        return features, info
    missing = []
    for choice in ("inception", "clip"):
        try:
            features, _, info = feature_space(choice, backbone, None, device, DEFAULT_CLIP_FEATURES)
            return features, info
        except MissingModel as err:
            missing.append(str(err))
    print(f"tdm: note: FD and KID skipped: {missing[0]}", file=sys.stderr)
    return None, {"name": "none", "description": "none, skipped: " + "; and ".join(missing)}


def _trained_steps(tdm_config: dict) -> str:
    steps = tdm_config["num_steps_set"]
    return f"any of {sorted(steps)} (TDM-unify)" if steps else str(tdm_config["num_steps"])


def _distance_note(result: dict, n: int) -> str:
    """What the FD / KID columns measure, or why there are none."""
    ref, features = result["reference"], result["features"]
    if not any(f"fd_{ref}" in row for row in result["rows"]):
        return f"FD and KID skipped: {features['description'].removeprefix('none, skipped: ')}."
    return (f"`fd_{ref}` / `kid_{ref}`: Frechet distance and KID to {n} samples of the reference teacher sampler "
            f"drawn with other seeds (its own row is the teacher-vs-teacher floor), measured in "
            f"{features['description']}.")


def write_report(out_dir: Path, result: dict, history: list[dict], backbone, command: str) -> None:
    """report.md, metrics.json, samples.png, quality.png and curves.png under out_dir."""
    out_dir = Path(out_dir)
    cfg, n = result["config"], result["config"]["eval"]["num_samples"]
    table, figures = write_comparison(out_dir, result, backbone)
    text = [
        f"# tdm distillation report: {cfg['backbone']['name']}",
        "",
        f"Command: `{command}`  ",
        f"Iterations: {result['iterations']}; student K = {_trained_steps(cfg['tdm'])}; "
        f"teacher CFG = {cfg['tdm']['guidance_scale']}; {n} samples per row, balanced classes, "
        f"the same seeds (eval.seed = {cfg['eval']['seed']}) in every row.",
        "",
        *table,
        " ".join(filter(None, [_distance_note(result, n),
                               backbone.metrics_description or ("The floor row scores real data." if result["floor"]
                                                                else ""),
                               "Times are wall-clock on this machine, over the whole set in batches of 1000."])),
        "",
        *figures,
    ]
    per_step = sorted({k for h in history for k in h if k.startswith("generator/loss_k")})
    curves_figure(history, [*CURVES, per_step], out_dir / "curves.png")
    text += ["## Training curves", "", "![curves](curves.png)", "", "## Diagnostics", ""]
    warnings = result.get("warnings", [])
    text += [f"- iteration {w['step']}: **{w['condition']}**: {w['message']}" for w in warnings] or [
        "No drift or collapse warnings (the student's evaluation samples stayed within the thresholds of "
        "tdm.diagnostics against the teacher's samples)."]
    text.append("")
    write_text_atomic(out_dir / "report.md", "\n".join(text))
