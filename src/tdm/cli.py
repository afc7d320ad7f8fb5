"""The `tdm` command: distill | reward | evaluate | demo | export | generate | cache-prompts | plan | train-teacher |
train-classifier."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from .config import DTYPES, load_config
from .errors import ConfigError, TDMError, TrainingAborted
from .evaluate.options import EvaluateOptions
from .flags import add_flags, from_flags
from .output_dirs import check_output_dir, check_run_dir, claim_run_dir
from .registry import PROMPT_ENCODERS  # diffusers/transformers are imported only when a model is loaded
from .resume import check_loaded, check_resume
from .run_lock import RunLock


def _command_line() -> str:
    """The command as typed, for reports."""
    return "tdm " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _distill(preset: str, overrides: list[str], out: str, resume: str | None, report: bool,
             allow_config_change: bool = False, start_fresh: bool = False) -> Path:
    from .trainer import Trainer

    config = load_config(preset, overrides)  # validate before any heavy work
    return _train(lambda: Trainer(config, out), config, out, resume, report, allow_config_change, start_fresh)


def _reward(start: str, reward: str, overrides: list[str], out: str, resume: str | None, report: bool,
            allow_config_change: bool = False, start_fresh: bool = False) -> Path:
    """Reward post-training of the student of the run or checkpoint `start` (tdm.reward_stage): its config, the
    reward group set by `reward` and `overrides`, into a run folder of its own."""
    from .config import from_dict, to_dict
    from .reward_stage import RewardTrainer, check_reward_config
    from .runs import open_run

    run = open_run(start)
    config = from_dict(to_dict(run.config), [f"reward.name={reward}", *overrides])
    check_reward_config(config)
    return _train(lambda: RewardTrainer(config, out, run), config, out, resume, report, allow_config_change,
                  start_fresh, evaluate_first=True)


def _train(make_trainer, config, out: str, resume: str | None, report: bool, allow_config_change: bool,
           start_fresh: bool, evaluate_first: bool = False) -> Path:
    """Train with the trainer `make_trainer()` builds in the run folder `out` (locked), resuming as asked, then
    write the report. `evaluate_first`: evaluate the starting weights before the first iteration (the reward
    stage's reference for its safeguard)."""
    from .evaluate.run_report import evaluate_distillation, write_report

    check_run_dir(out)  # before the lock, which creates --out
    with RunLock(out):  # one run per folder
        expected = check_resume(Path(out), resume, config, allow_config_change, start_fresh)  # no model needed
        trainer = make_trainer()
        if resume:
            path = trainer.resume(resume, start_fresh)
            check_loaded(path, expected, config, allow_config_change)
            print(f"resuming from {path} at iteration {trainer.state.step}" if path else
                  f"--resume {resume}: no complete checkpoint in {out}, starting from scratch")
        if trainer.accelerator.is_main_process:
            claim_run_dir(out, _command_line())
        if evaluate_first and trainer.state.step == 0 and config.train.eval_every:
            trainer.evaluate_now()
        path = trainer.train()
        if trainer.accelerator.is_main_process:
            if trainer.stopped_by:
                print(f"tdm: stopped by {trainer.stopped_by} after iteration {trainer.state.step}; checkpoint: {path}; "
                      f"continue with --resume auto")
            elif report and config.eval.num_samples > 0 and trainer.sharded:  # sampling would take every rank
                print(f"tdm: note: no report after FSDP training; evaluate the checkpoint with `accelerate launch "
                      f"-m tdm.cli evaluate {out} --out {out}/evaluation`", file=sys.stderr)
            elif report and config.eval.num_samples > 0:
                write_report(Path(out), evaluate_distillation(trainer), trainer.history, trainer.backbone,
                             _command_line())
                print(f"report: {Path(out) / 'report.md'}")
        trainer.close()
    return Path(out)


def _export(checkpoint: str, out: str, overrides: list[str], merged: bool, ema: bool, lora_scale: float,
            overwrite: bool, lora_format: str = "all", scheduler: str = "stock", license: str | None = None) -> Path:
    """Rebuild the run's teacher and student from the checkpoint's own config, as the trainer builds them, load
    the student's (or its EMA's) weights and export it."""
    from .backbones.diffusers_base import DiffusersBackbone
    from .checkpoint import CheckpointError
    from .export import export_student, refuse_non_empty
    from .registry import build_backbone
    from .runs import open_checkpoint

    check_output_dir(out)
    refuse_non_empty(Path(out), overwrite)
    run = open_checkpoint(checkpoint, overrides)
    config = run.config
    if config.tdm.num_steps_set:
        raise ConfigError("tdm.num_steps_set: a TDM-unify student takes its step count through an embedding that "
                          "stock pipelines cannot feed; only fixed-K students export")
    if ema and not run.has_ema:
        raise CheckpointError(f"--ema: {run.checkpoint} holds no student EMA (the run had train.ema_decay = 0)")
    # export runs no backward pass: no gradient checkpointing
    backbone = build_backbone(dataclasses.replace(config.backbone, gradient_checkpointing=False))
    if not isinstance(backbone, DiffusersBackbone):  # no stock pipeline: the network, its grid and recipe
        from .network_export import export_network

        return export_network(backbone, dataclasses.asdict(config.backbone), run.load_student(backbone, ema), out,
                              tdm_config=config.tdm, lora_scale=lora_scale, overwrite=overwrite)
    return export_student(backbone, run.load_student(backbone, ema), out, tdm_config=config.tdm, merged=merged,
                          lora_scale=lora_scale, overwrite=overwrite, lora_format=lora_format,
                          scheduler=scheduler, license=license)


def _cache_prompts(args: argparse.Namespace) -> None:
    import torch

    from .data import cache_prompts, drop_duplicates, read_prompts
    from .data.text_encoders import resolve_model

    check_output_dir(args.out)
    prompts = read_prompts(args.prompts, column=args.column)
    prompts, dropped = (prompts, 0) if args.keep_duplicates else drop_duplicates(prompts)
    family, dtype = PROMPT_ENCODERS[args.family], getattr(torch, args.dtype)
    folder = resolve_model(args.model, family)
    fingerprint = family.fingerprint(folder, dtype)
    encoded = cache_prompts(prompts, lambda: family.load(folder, args.device, dtype), fingerprint, args.out,
                            negative_prompt=args.negative_prompt, batch_size=args.batch_size)
    print(f"{len(prompts)} prompts from {args.prompts} ({dropped} duplicates dropped) and the negative prompt "
          f"{args.negative_prompt!r}: {encoded} encoded, {len(set(prompts + [args.negative_prompt])) - encoded} "
          f"already cached, in {Path(args.out) / fingerprint}")


def _evaluate(args: argparse.Namespace) -> Path | None:
    from .evaluate.comparison_report import comparison_table
    from .evaluate.harness import evaluate, write_evaluation
    from .processes import launched_processes

    options = from_flags(EvaluateOptions, args)
    check_run_dir(args.out)
    result, backbone = evaluate(args.run, args.baseline, options)
    report = None
    if result is not None:  # the only process, or the main one of a multi-process launch: it alone writes
        claim_run_dir(args.out, _command_line())
        report = write_evaluation(args.out, result, backbone, _command_line())
        print(comparison_table(result["rows"], result["floor"]))
        print(f"report: {report}")
    del result, backbone  # the networks, before the process group goes (Processes.finish)
    launched_processes().finish()
    return report


def _add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.KEY=VALUE", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdm", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    distill = sub.add_parser("distill", help="distil a teacher into a few-step student")
    distill.add_argument("--config", required=True, help="preset name in configs/ or a YAML file")
    _add_overrides(distill, "change the preset, e.g. train.iterations=200 (repeat for more)")
    distill.add_argument("--out", required=True, help="run folder (checkpoints, tensorboard, report)")
    distill.add_argument("--resume", help="checkpoint folder, or 'auto' for the newest complete one in --out")
    distill.add_argument("--allow-config-change", action="store_true",
                         help="with --resume: continue with this config even where it changes keys other than the "
                              "run's length, cadences and evaluation settings (a warning names them)")
    distill.add_argument("--start-fresh", action="store_true",
                         help="with --resume auto: if every checkpoint in --out is damaged, move them to "
                              "checkpoints/damaged/ and train from scratch (default: stop with an error)")
    distill.add_argument("--no-report", action="store_true", help="skip the end-of-run evaluation report")

    ev = sub.add_parser("evaluate", help="compare teacher, baseline and student: FD, KID, CLIP, timings, grids",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Sample the teacher (DDIM, the run's CFG) at each --teacher-steps, the baseline "
                        "at its K and the student at each --student-steps on the same conditions and seeds; write "
                        "report.md, metrics.json, samples.png and quality.png to --out and print the table.")
    ev.add_argument("run", help="a run folder (its newest checkpoint) or a checkpoint folder")
    ev.add_argument("--out", required=True, help="folder for report.md, metrics.json and the figures")
    ev.add_argument("--baseline", help="run or checkpoint of the DMD-style baseline, e.g. one made with "
                    "`tdm distill --config digits-demo --set tdm.num_steps=1 --out runs/k1`")
    add_flags(ev, EvaluateOptions)

    reward = sub.add_parser("reward", help="reward post-training (TDM-R1) of a distilled student against a reward "
                                           "that needs no gradient; writes a run folder like distill")
    reward.add_argument("--from", dest="start", required=True, help="the distillation run folder (its newest "
                        "checkpoint) or a checkpoint folder whose student (its EMA when kept) is post-trained")
    reward.add_argument("--reward", required=True, help="a built-in reward (digits-class, digits-confident, "
                        "digits-thickness, jpeg-compressibility, clip-score, pickscore, imagereward, hpsv2) or "
                        "module:function; its options: --set reward.options=key=value,...")
    reward.add_argument("--out", required=True, help="the reward run's folder")
    reward.add_argument("--resume", help="'auto' (newest checkpoint in --out) or a checkpoint folder")
    reward.add_argument("--no-report", action="store_true", help="skip the end-of-run report")
    reward.add_argument("--allow-config-change", action="store_true", help="resume with a changed config")
    reward.add_argument("--start-fresh", action="store_true", help="with --resume auto: start over if no "
                        "checkpoint loads")
    _add_overrides(reward, "change the run's config or the reward group, e.g. train.iterations=200, "
                           "reward.weight=2 (repeat for more)")

    demo = sub.add_parser("demo", help="distil the shipped digits teacher into a 4-step student on CPU")
    demo.add_argument("--out", default="runs/demo")
    _add_overrides(demo, "change the digits-demo preset (repeat for more)")

    export = sub.add_parser("export", help="export a distilled student as a diffusers LoRA (or weights), the "
                                           "scheduler that replays it, a sampling recipe and a model card")
    export.add_argument("--checkpoint", required=True, help="a checkpoint folder (runs/NAME/checkpoints/step_*)")
    export.add_argument("--out", required=True, help="export folder (LoRA, scheduler/, recipe.json, README.md)")
    export.add_argument("--merged", action="store_true", help="also write the student merged into full weights")
    export.add_argument("--ema", action="store_true", help="export the student's EMA weights")
    export.add_argument("--lora-scale", type=float, default=1.0, help="LoRA scale recorded in the recipe")
    export.add_argument("--lora-format", choices=["diffusers", "peft", "kohya", "all"], default="all",
                        help="LoRA file format(s); all (default): every format a tool reads for the family")
    export.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    export.add_argument("--scheduler", choices=["stock", "tdm"], default="stock",
                        help="scheduler/: the stock diffusers scheduler that replays the student, so sampling needs "
                             "diffusers alone (default; TDMScheduler where none is exact), or tdm's TDMScheduler")
    export.add_argument("--license", help="the model card's license id (default: 'other', to set by hand)")
    export.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this Hugging Face Hub "
                                                             "model repo (created if missing)")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    _add_overrides(export, "change the checkpoint's config, e.g. backbone.teacher=/new/path")

    generate = sub.add_parser("generate", help="sample from an exported student with its stock diffusers pipeline")
    generate.add_argument("--model", required=True, help="a `tdm export` folder")
    generate.add_argument("--prompt", dest="prompts", action="append", required=True, help="repeat for more")
    generate.add_argument("--out", required=True, help="folder for the PNGs (GIFs for video) and samples.json")
    generate.add_argument("--steps", type=int, help="sampling steps (default: the student's trained K)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the first prompt (+1 per prompt)")
    generate.add_argument("--merged", action="store_true", help="use the export's merged weights, not the LoRA")
    generate.add_argument("--dtype", choices=DTYPES, default="float32")
    generate.add_argument("--device", help="default: cuda if available, else cpu")

    cache = sub.add_parser("cache-prompts", help="encode a prompt file once into an on-disk text-embedding cache")
    cache.add_argument("--prompts", required=True, help="a .txt/.jsonl/.csv/.parquet file or a dataset folder")
    cache.add_argument("--column", help="prompt column of a table (default: the first of prompt, caption, text)")
    cache.add_argument("--model", required=True, help="pipeline folder or hub id (clip: also a text-encoder folder)")
    cache.add_argument("--family", required=True, choices=sorted(PROMPT_ENCODERS),
                       help="how to encode prompts: a teacher family (backbone.name; fills the cache its "
                            "backbone.prompt_cache reads) or clip")
    cache.add_argument("--out", required=True, help="cache root; embeddings go to OUT/<text-encoder fingerprint>/")
    cache.add_argument("--negative-prompt", default="", help="unconditional / negative prompt (default: empty)")
    cache.add_argument("--keep-duplicates", action="store_true", help="keep repeated prompts (default: drop)")
    cache.add_argument("--batch-size", type=int, default=64)
    cache.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    cache.add_argument("--dtype", default="float32", choices=DTYPES, help="the text encoders' (= backbone.dtype)")

    plan = sub.add_parser("plan", help="what a preset needs per GPU and per iteration, before any download",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    plan.add_argument("--config", required=True, help="preset name in configs/ or a YAML file")
    plan.add_argument("--gpus", type=int, default=8, help="GPUs (processes) the batch per GPU runs on")
    plan.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of memory per GPU")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the time estimate assumes")
    plan.add_argument("--peak-tflops", type=float, default=989.0, help="a GPU's dense peak (H100 bf16: 989)")
    _add_overrides(plan, "change the preset, e.g. train.batch_size=8 (repeat for more)")

    for name, what in (("train-teacher", "the digits teacher"), ("train-classifier", "the digits metric classifier")):
        p = sub.add_parser(name, help=f"retrain {what}; options as `python -m tdm.toys.digits {name} --help`")
        p.add_argument("toy", choices=["digits"])
        p.add_argument("options", nargs=argparse.REMAINDER,
                       help="--out, --steps, --batch-size, --seed, --lr, --threads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "distill":
            _distill(args.config, args.overrides, args.out, args.resume, not args.no_report,
                     args.allow_config_change, args.start_fresh)
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "reward":
            _reward(args.start, args.reward, args.overrides, args.out, args.resume, not args.no_report,
                    args.allow_config_change, args.start_fresh)
        elif args.command == "demo":
            _distill("digits-demo", args.overrides, args.out, None, True)
        elif args.command == "export":
            if args.private and not args.push_to_hub:
                raise ConfigError("--private: only with --push-to-hub REPO")
            out = _export(args.checkpoint, args.out, args.overrides, args.merged, args.ema, args.lora_scale,
                          args.overwrite, args.lora_format, args.scheduler, args.license)
            print(f"exported: {out}")
            if args.push_to_hub:
                from .hub import push_to_hub

                print(f"pushed: {push_to_hub(out, args.push_to_hub, private=args.private)}")
        elif args.command == "generate":
            from .generate import generate

            files = generate(args.model, args.prompts, args.out, steps=args.steps, seed=args.seed,
                             merged=args.merged, dtype=args.dtype, device=args.device)
            if files is not None:  # the main process, which writes
                print(f"wrote {len(files)} samples to {args.out}")
        elif args.command == "cache-prompts":
            _cache_prompts(args)
        elif args.command == "plan":
            from .plan.planner import plan
            from .plan.table import format_plan

            result = plan(load_config(args.config, args.overrides), args.gpus, args.gpu_memory, args.mfu,
                          args.peak_tflops)
            print(format_plan(result, args.config))
        else:
            from .toys import digits

            digits.main([args.command, *args.options])
    except KeyboardInterrupt:  # Ctrl-C outside training (training checkpoints and exits 0 on SIGINT)
        if args.debug:
            raise
        print(f"tdm: interrupted: tdm {args.command} stopped by Ctrl-C; files are written complete or not at all",
              file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    except TDMError as err:
        if args.debug:
            raise
        aborted = isinstance(err, TrainingAborted)
        print(f"tdm: {'training aborted' if aborted else 'error'}: {err}", file=sys.stderr)
        return 3 if aborted else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
