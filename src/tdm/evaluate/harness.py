"""`tdm evaluate`: the teacher, a baseline and a student checkpoint compared on fixed conditions and seeds.

Rows: the teacher's DDIM sampler at each `teacher_steps` (with the run's CFG; the first is the reference),
the baseline checkpoint at its own K (a TDM run with K = 1 is the DMD-style one-step baseline), and the
student at each `student_steps`. Columns: NFE, FD and KID to reference-teacher samples drawn with other seeds
(and to a folder of reference images), the backbone's own metrics, CLIP and preference scores, timings.
Under `accelerate launch` or `torchrun` the processes share out the sampling; the main process scores and writes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..checkpoint import CheckpointError
from ..config import to_dict
from ..errors import MissingModel, TDMError
from ..files import sha256_file, write_text_atomic
from ..processes import launched_processes
from ..registry import build_backbone
from ..runs import Run, open_run
from ..samplers import student_samplers, teacher_samplers
from .compare import SetScorer, compare_to_reference
from .comparison_report import write_comparison
from .features import (
    CLIPFeatures,
    DigitsClassifierFeatures,
    FeatureExtractor,
    InceptionFeatures,
    load_preference_scorer,
)
from .image_folder import load_image_folder
from .options import EvaluateOptions


@dataclass
class LoadedStudent:
    run: Run
    model: nn.Module  # the weights run.sampled_weights names: its EMA when kept, as the trainer samples

    def info(self) -> dict:
        run = self.run
        return {"checkpoint": str(run.checkpoint), "iterations": run.step, "weights": run.sampled_weights,
                "num_steps": run.config.tdm.num_steps, "config": to_dict(run.config)}


def load_student(path: str | Path, backbone: Backbone | None = None) -> tuple[LoadedStudent, Backbone]:
    """The student of a run or checkpoint (its EMA when one was kept, as the trainer samples) and the backbone
    its saved config builds (or `backbone`, reused)."""
    run = open_run(path)
    backbone = backbone or build_backbone(run.config.backbone)
    return LoadedStudent(run, run.load_student(backbone)), backbone


def feature_space(choice: str, backbone: Backbone, inception: str | None, device, clip_model: str | None = None
                  ) -> tuple[Callable[[Tensor], Tensor] | None, FeatureExtractor | None, dict]:
    """(features of samples for FD / KID, the image extractor for reference images, a description for the
    report). `auto`: the digits classifier for digits, raw samples for non-image toys, else Inception when
    its file is found, else CLIP's image embeddings with `clip_model` when given (FD / KID are skipped with a
    note when neither is there)."""
    if choice == "none":
        return None, None, {"name": "none"}
    if not backbone.is_image:
        if choice != "auto":
            raise TDMError(f"--features {choice}: {backbone.name} samples are not images (use auto or none)")
        if backbone.needs_feature_network:  # latents without a decoder: FD in them would mean nothing
            return None, None, {"name": "none", "description": f"none, skipped: {backbone.name} samples are "
                                                              f"latents without a decoder to images"}
        return backbone.features, None, {"name": "samples", "description": backbone.features_description}
    if choice == "auto" and backbone.name == "digits":
        choice = "digits-classifier"
    meta = {}
    if choice == "digits-classifier":
        if backbone.name != "digits":
            raise TDMError(f"--features digits-classifier works only for the digits toy, not {backbone.name}")
        extractor: FeatureExtractor = DigitsClassifierFeatures(backbone)
    elif choice == "clip":
        if not clip_model:
            raise TDMError("--features clip needs --clip-model ID_OR_DIR (a transformers CLIP model)")
        extractor = CLIPFeatures(clip_model, device)
    else:  # inception, asked for or chosen by auto, then CLIP for auto
        try:
            extractor = InceptionFeatures(inception, device)
            meta = {"file": str(extractor.path), "sha256": sha256_file(extractor.path)}
        except MissingModel as err:
            if choice != "auto":
                raise
            if not clip_model:
                print(f"tdm: note: FD and KID skipped: {err}", file=sys.stderr)
                return None, None, {"name": "none", "description": f"none, skipped: {err}"}
            extractor = CLIPFeatures(clip_model, device)
    meta = {"name": extractor.name, "description": extractor.description, **meta}
    return (lambda samples: extractor(backbone.to_images(samples))), extractor, meta


def text_scorers(backbone: Backbone, options: EvaluateOptions) -> list[SetScorer]:
    """CLIP score and preference scores of each sample against the text of its condition (mean over samples)."""
    specs = ([("clip_score", None)] if options.clip_model else []) + [(None, p) for p in options.preference]
    if not specs:
        return []
    prompts = backbone.evaluation_prompts(options.num_samples)
    if prompts is None or not backbone.is_image:
        raise TDMError(f"--clip-model / --preference: the {backbone.name} backbone has no text prompts to score")
    scorers = []
    for name, spec in specs:
        if spec is None:
            from .clip_score import CLIPScorer

            fn = CLIPScorer(options.clip_model, options.device).clip_score
        else:
            name, fn = load_preference_scorer(spec, options.device)

        def score(samples: Tensor, cond, name=name, fn=fn) -> dict[str, float]:
            return {name: float(fn(backbone.to_images(samples), prompts[:len(samples)]).mean())}

        scorers.append(score)
    return scorers


def evaluate(run: str | Path, baseline: str | Path | None, options: EvaluateOptions
             ) -> tuple[dict | None, Backbone]:
    """Compare teacher, baseline and student. Returns the metrics.json payload plus the samples per sampler
    (None on processes other than the main one of a multi-process launch), and the backbone (for
    `write_evaluation`)."""
    processes = launched_processes()
    options = replace(options, device=processes.device(options.device))  # each process on its own GPU
    student, backbone = load_student(run)
    base = load_student(baseline, backbone)[0] if baseline else None
    cfg = student.run.config
    if base is not None and base.run.config.backbone != cfg.backbone:
        raise CheckpointError(f"--baseline {base.run.checkpoint} was made for another teacher "
                              f"({base.run.config.backbone}) than {student.run.checkpoint} ({cfg.backbone})")
    device = options.device
    teacher = backbone.teacher.eval().requires_grad_(False).to(device)
    samplers = teacher_samplers(teacher, backbone.schedule, options.teacher_steps, cfg.tdm.guidance_scale)
    if base is not None:
        k = base.run.config.tdm.num_steps  # TDM with K = 1 is the DMD-style one-step baseline
        prefix, label = ("dmd", "DMD-style baseline (TDM K=1)") if k == 1 else ("baseline", f"baseline (TDM K={k})")
        samplers += student_samplers(base.model.to(device), base.run.config.tdm, backbone.schedule, [k], prefix=prefix,
                                     label=label, kind="baseline")
    samplers += student_samplers(student.model.to(device), cfg.tdm, backbone.schedule, options.student_steps)
    features, extractor, features_info = feature_space(options.features, backbone, options.inception, device,
                                                       options.clip_model)
    references = {}
    if options.reference_dir:
        if extractor is None:
            raise TDMError("--reference-dir needs image features: --features inception, clip or digits-classifier")
        shape = backbone.sample_shape
        references["reference"] = extractor(load_image_folder(options.reference_dir, shape[0], shape[1:]))
    result = compare_to_reference(backbone, samplers, options.num_samples, options.seed, features, references,
                                  text_scorers(backbone, options), device, options.batch_size,
                                  options.latency_repeats, processes)
    if result is None:
        return None, backbone
    return {**result, "student": student.info(), "baseline": base.info() if base else None,
            "features": features_info, "options": asdict(options), "threads": torch.get_num_threads()}, backbone


def _metric_notes(result: dict) -> list[str]:
    """One line per kind of column present in the table, saying what it measures."""
    o, ref, row = result["options"], result["reference"], result["rows"][0]
    notes = []
    if f"fd_{ref}" in row:
        notes.append(f"`fd_{ref}` / `kid_{ref}`: Frechet distance and KID (unbiased polynomial-kernel MMD^2, "
                     f"mean ± spread over 100 subsets) in {result['features']['description']}, to "
                     f"{o['num_samples']} samples of `{ref}` drawn with seed {o['seed'] + 1}; the `{ref}` row is "
                     "the teacher-vs-teacher floor.")
        if result["features"]["name"] != "inception":
            notes.append("KID is in the units of its kernel on these features (not comparable to published "
                         "Inception KIDs); compare it within the column only.")
    if "fd_reference" in row:
        notes.append(f"`fd_reference` / `kid_reference`: the same against the images in `{o['reference_dir']}`.")
    if "clip_score" in row:
        notes.append(f"`clip_score`: 100 max(cos(image, prompt), 0) with `{o['clip_model']}`, averaged.")
    return notes


def write_evaluation(out_dir: str | Path, result: dict, backbone: Backbone, command: str) -> Path:
    """report.md, metrics.json, samples.png and quality.png under out_dir; returns the report's path."""
    out_dir = Path(out_dir)
    o, s, b = result["options"], result["student"], result["baseline"]
    table, figures = write_comparison(out_dir, {**result, "command": command}, backbone, o["grid_columns"])
    baseline = "none (add one with --baseline)"
    if b:
        kind = "the DMD-style one-step baseline" if b["num_steps"] == 1 else "a baseline"
        baseline = (f"`{b['checkpoint']}` (iteration {b['iterations']}, {b['weights']} weights; TDM trained with "
                    f"K = {b['num_steps']}, {kind})")
    text = [
        f"# tdm evaluation: {backbone.name}", "",
        f"Command: `{command}`", "",
        f"- student: `{s['checkpoint']}` (iteration {s['iterations']}, {s['weights']} weights, trained for "
        f"K = {s['num_steps']})",
        f"- baseline: {baseline}",
        f"- teacher: DDIM with CFG {s['config']['tdm']['guidance_scale']:g}; students sample without guidance",
        f"- {o['num_samples']} samples per sampler on the same balanced conditions and noise (seed {o['seed']})", "",
        *table,
        *(f"{note}  " for note in [*_metric_notes(result), backbone.metrics_description] if note),
        f"Timing: wall clock on {o['device']} with {result['threads']} CPU thread(s), under torch.no_grad, after a "
        f"warm-up model call. `ms / sample` and `samples / s`: all {o['num_samples']} samples in batches of "
        f"{o['batch_size']}; `latency`: one sample at a time, median of {o['latency_repeats']} runs.", "",
        *figures,
    ]
    write_text_atomic(out_dir / "report.md", "\n".join(text))
    return out_dir / "report.md"
