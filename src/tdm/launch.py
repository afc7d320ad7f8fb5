"""What the launch asked for against what started: mixed precision and the process count.

Mixed precision, in order of precedence: train.mixed_precision when the run's config sets it (a warning names
accelerate's setting where they differ); else accelerate's own, which `accelerate launch` passes down from
--mixed_precision or its config file (ACCELERATE_MIXED_PRECISION); else no. Plain `python` / `tdm distill` reads
no accelerate config file, as accelerate itself does not.

Process count: under `accelerate launch`, the processes asked for (--num_processes, else the config file's
num_processes) must all have started. A launch that quietly runs fewer (a MULTI_CPU config without an mpirun
hostfile, or --cpu, starts one process) is an error. A plain `python` start where accelerate's default config
file asks for more than one process gets a warning: it runs one process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import TDMError

WORKING_LAUNCH = ("on CPU-only machines use `accelerate launch --multi_gpu --num_processes N ...` (or a config "
                  "file with distributed_type: MULTI_GPU; ranks fall back to gloo on the CPU) or `torchrun "
                  "--nproc_per_node N ...`")


class LaunchError(TDMError):
    """The launch started fewer processes than it asked for."""


def _main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def mixed_precision(configured: str) -> str | None:
    """The Accelerator's mixed_precision: train.mixed_precision when set, else None (accelerate's own)."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if configured and launched and launched != configured and _main_rank():
        print(f"tdm: warning: train.mixed_precision={configured} (the run's config) overrides accelerate's "
              f"mixed_precision={launched}; set train.mixed_precision=\"\" to use accelerate's", file=sys.stderr)
    return configured or None


def _launch_arguments() -> list[str] | None:
    """The `accelerate launch` arguments of the process that started this one, or None if it was not that.
    Both launchers start the script as a child of the `accelerate launch` process (Linux: /proc)."""
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:  # every accelerate launcher sets it
        return None
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    for i, arg in enumerate(argv):
        if (arg == "launch" and i > 0 and "accelerate" in Path(argv[i - 1]).name) or arg.endswith("commands.launch"):
            return [a for a in argv[i + 1:] if a]
    return None


def requested_processes() -> tuple[int, str] | None:
    """(processes, where that was asked) for a run started by `accelerate launch`, or None for other starts."""
    args = _launch_arguments()
    if args is None:
        return None
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    parsed, _ = launch_command_parser().parse_known_args(args)
    if parsed.num_processes is not None:
        return parsed.num_processes, "accelerate launch --num_processes"
    config_file = parsed.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    if config_file is None:
        return None
    return load_config_from_file(config_file).num_processes, f"num_processes in {config_file}"


def check_process_count(started: int) -> None:
    """Raise LaunchError where `accelerate launch` asked for more processes than `started`; warn where plain
    python ran a run that accelerate's default config file meant for several."""
    requested = requested_processes()
    if requested is not None:
        count, where = requested
        if (count or 0) > started:
            raise LaunchError(f"{where} asks for {count} processes but accelerate started {started} (a MULTI_CPU "
                              f"config without --mpirun_hostfile, or --cpu, runs one process); {WORKING_LAUNCH}")
        return
    if "ACCELERATE_MIXED_PRECISION" in os.environ or "WORLD_SIZE" in os.environ:
        return  # an accelerate launch of another shape, or torchrun: what started is what was asked
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file

    if os.path.isfile(default_config_file) and _main_rank():
        count = load_config_from_file(default_config_file).num_processes
        if (count or 0) > started:
            print(f"tdm: warning: accelerate's config {default_config_file} asks for {count} processes, but this "
                  f"run was started without `accelerate launch` and runs {started}: start it with `accelerate "
                  f"launch -m tdm.cli ...` to use that config", file=sys.stderr)
