"""End-of-run report of a distillation: teacher vs student table, grids, curves, metrics.json, report.md."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import to_dict
from ..core.sampling import teacher_grid
from ..files import write_text_atomic
from ..report import comparison_figure, curves_figure, markdown_table
from .compare import Sampler, compare

CURVES = ("fake/loss", "generator/loss", "generator/teacher_fake_gap", "generator/grad_norm",
          ("student/x0_std", "teacher/x0_std"), ("student/x0_mean", "teacher/x0_mean"), "student/saturation")
GRID_SAMPLES = 50  # per panel of the comparison figure: the first 50 evaluation conditions and seeds


def evaluate_distillation(trainer) -> dict:
    """Teacher at eval.teacher_steps and 4 steps (with the run's CFG) and the student at each eval.student_steps,
    on the same conditions and seeds. Returns the metrics.json payload plus the samples per sampler."""
    cfg, backbone = trainer.config, trainer.backbone
    schedule = backbone.schedule

    scale = cfg.tdm.guidance_scale
    n_ref = cfg.eval.teacher_steps
    reference = Sampler(f"teacher{n_ref}", trainer.teacher, teacher_grid(schedule, n_ref), scale)
    samplers = [reference, Sampler("teacher4", trainer.teacher, teacher_grid(schedule, 4), scale)]
    samplers += [trainer.student_sampler(k) for k in cfg.eval.student_steps]
    rows, samples = compare(backbone, samplers, reference, cfg.eval.num_samples, cfg.eval.seed,
                            device=trainer.accelerator.device)
    return {"rows": rows, "floor": backbone.floor_metrics(cfg.eval.num_samples), "reference": reference.name,
            "iterations": trainer.step, "config": to_dict(cfg), "samples": samples,
            "warnings": trainer.diagnostics.warnings}


def _trained_steps(tdm_config: dict) -> str:
    steps = tdm_config["num_steps_set"]
    return f"any of {sorted(steps)} (TDM-unify)" if steps else str(tdm_config["num_steps"])


def write_report(out_dir: Path, result: dict, history: list[dict], backbone, command: str) -> None:
    """report.md, metrics.json, samples.png (side-by-side grids) and curves.png under out_dir."""
    out_dir = Path(out_dir)
    samples = result.pop("samples")
    write_text_atomic(out_dir / "metrics.json", json.dumps(result, indent=1))
    if backbone.is_image:
        panels = [(f"{r['sampler']} (NFE {r['nfe']})", backbone.to_images(samples[r["sampler"]][:GRID_SAMPLES]))
                  for r in result["rows"]]
        comparison_figure(panels, out_dir / "samples.png", nrow=10)
    per_step = sorted({k for h in history for k in h if k.startswith("generator/loss_k")})
    curves_figure(history, [*CURVES, per_step], out_dir / "curves.png")
    metric_keys = [k for k in result["rows"][0] if k not in ("sampler", "steps", "nfe", "seconds_per_100")]
    columns = [("sampler", "sampler", ""), ("nfe", "NFE", "d")] + [(k, k, ".4g") for k in metric_keys]
    columns.append(("seconds_per_100", "seconds / 100 samples", ".3f"))
    floor = {"sampler": "real data (floor)", "nfe": "", **result["floor"]}
    n = result["config"]["eval"]["num_samples"]
    text = [
        f"# tdm distillation report: {result['config']['backbone']['name']}",
        "",
        f"Command: `{command}`  ",
        f"Iterations: {result['iterations']}; student K = {_trained_steps(result['config']['tdm'])}; "
        f"teacher CFG = {result['config']['tdm']['guidance_scale']}; {n} samples per row, balanced classes, "
        f"the same seeds (eval.seed = {result['config']['eval']['seed']}) in every row.",
        "",
        markdown_table(result["rows"] + [floor], columns),
        "",
        f"`fd_{result['reference']}`: Frechet distance to {n} samples of the reference teacher sampler drawn "
        f"with other seeds (its own row is the teacher-vs-teacher floor), measured in "
        f"{backbone.features_description}. The floor row scores real data in place of samples. "
        "Times are wall-clock on this machine.",
        "",
    ]
    if backbone.is_image:
        text += ["## Samples (same seeds and classes in every panel)", "", "![samples](samples.png)", ""]
    text += ["## Training curves", "", "![curves](curves.png)", "", "## Diagnostics", ""]
    warnings = result.get("warnings", [])
    text += [f"- iteration {w['step']}: **{w['condition']}**: {w['message']}" for w in warnings] or [
        "No drift or collapse warnings (student x0 statistics stayed within the thresholds of tdm.diagnostics)."]
    text.append("")
    write_text_atomic(out_dir / "report.md", "\n".join(text))
