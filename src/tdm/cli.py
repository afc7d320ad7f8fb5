"""The `tdm` command: distill | evaluate | demo | train-teacher | train-classifier."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from .config import load_config
from .errors import TDMError, TrainingAborted
from .evaluate.options import FEATURE_CHOICES, EvaluateOptions


def _command_line() -> str:
    """The command as typed, for reports."""
    return "tdm " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _distill(preset: str, overrides: list[str], out: str, resume: str | None, report: bool) -> Path:
    from .evaluate.run_report import evaluate_distillation, write_report
    from .trainer import Trainer

    config = load_config(preset, overrides)  # validate before any heavy work
    trainer = Trainer(config, out)
    if resume:
        path = trainer.resume(resume)
        print(f"resuming from {path} at iteration {trainer.step}" if path else
              f"--resume {resume}: no complete checkpoint in {out}, starting from scratch")
    path = trainer.train()
    if trainer.accelerator.is_main_process:
        if trainer.stopped_by:
            print(f"tdm: stopped by {trainer.stopped_by} after iteration {trainer.step}; checkpoint: {path}; "
                  f"continue with --resume auto")
        elif report and config.eval.num_samples > 0:
            write_report(Path(out), evaluate_distillation(trainer), trainer.history, trainer.backbone,
                         _command_line())
            print(f"report: {Path(out) / 'report.md'}")
    trainer.close()
    return Path(out)


def _evaluate(args: argparse.Namespace) -> Path:
    from .evaluate.comparison_report import comparison_table
    from .evaluate.harness import evaluate, write_evaluation

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvaluateOptions)
             if getattr(args, f.name, None) is not None}
    options = EvaluateOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    result, backbone = evaluate(args.run, args.baseline, options)
    report = write_evaluation(args.out, result, backbone, _command_line())
    print(comparison_table(result["rows"], result["floor"]))
    print(f"report: {report}")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdm", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    distill = sub.add_parser("distill", help="distil a teacher into a few-step student")
    distill.add_argument("--config", required=True, help="preset name in configs/ or a YAML file")
    distill.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.KEY=VALUE")
    distill.add_argument("--out", required=True, help="run folder (checkpoints, tensorboard, report)")
    distill.add_argument("--resume", help="checkpoint folder, or 'auto' for the newest complete one in --out")
    distill.add_argument("--no-report", action="store_true", help="skip the end-of-run evaluation report")

    ev = sub.add_parser("evaluate", help="compare teacher, baseline and student: FD, KID, CLIP, timings, grids",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Sample the teacher (DDIM, the run's CFG) at each --teacher-steps, the baseline "
                        "at its K and the student at each --student-steps on the same conditions and seeds; write "
                        "report.md, metrics.json, samples.png and quality.png to --out and print the table.")
    o = EvaluateOptions  # the defaults
    ev.add_argument("run", help="a run folder (its newest checkpoint) or a checkpoint folder")
    ev.add_argument("--out", required=True, help="folder for report.md, metrics.json and the figures")
    ev.add_argument("--baseline", help="run or checkpoint of the DMD-style baseline, e.g. one made with "
                    "`tdm distill --config digits-demo --set tdm.num_steps=1 --out runs/k1`")
    ev.add_argument("--teacher-steps", type=int, nargs="+", default=list(o.teacher_steps),
                    help="teacher DDIM step counts; the first is the FD / KID reference")
    ev.add_argument("--student-steps", type=int, nargs="+", default=list(o.student_steps),
                    help="step counts the student (trained at its K) is sampled at")
    ev.add_argument("--num-samples", type=int, default=o.num_samples, help="samples per sampler")
    ev.add_argument("--seed", type=int, default=o.seed, help="noise seed of every row (reference teacher: seed + 1)")
    ev.add_argument("--batch-size", type=int, default=o.batch_size, help="samples per sampling call (timed)")
    ev.add_argument("--features", default=o.features, choices=FEATURE_CHOICES,
                    help="feature network of FD / KID (auto: digits classifier for digits, else Inception if found)")
    ev.add_argument("--inception", metavar="PATH", help="inception-2015-12-05.pt (else $TDM_INCEPTION, "
                    "~/.cache/tdm/, $TORCH_HOME/hub/checkpoints/; never downloaded)")
    ev.add_argument("--reference-dir", metavar="DIR", help="folder of reference images for fd_reference, kid_reference")
    ev.add_argument("--clip-model", metavar="ID_OR_DIR", help="transformers CLIP model for clip_score")
    ev.add_argument("--preference", nargs="+", default=list(o.preference), metavar="NAME[=MODEL]",
                    help="hpsv2, imagereward, pickscore (each needs its package or model installed)")
    ev.add_argument("--latency-repeats", type=int, default=o.latency_repeats,
                    help="single-sample runs timed per sampler (0: skip)")
    ev.add_argument("--grid-columns", type=int, default=o.grid_columns, help="conditions per sampler in samples.png")
    ev.add_argument("--device", help="default: cuda if available, else cpu")

    demo = sub.add_parser("demo", help="distil the shipped digits teacher into a 4-step student on CPU")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.KEY=VALUE")

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
            _distill(args.config, args.overrides, args.out, args.resume, not args.no_report)
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "demo":
            _distill("digits-demo", args.overrides, args.out, None, True)
        else:
            from .toys import digits

            digits.main([args.command, *args.options])
    except TDMError as err:
        if args.debug:
            raise
        aborted = isinstance(err, TrainingAborted)
        print(f"tdm: {'training aborted' if aborted else 'error'}: {err}", file=sys.stderr)
        return 3 if aborted else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
