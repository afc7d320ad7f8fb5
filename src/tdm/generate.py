"""`tdm generate`: sample from an exported student with its stock pipeline and exported scheduler (`TDMScheduler`
at another step count); save PNGs (GIFs for video), plus `samples.json` naming each file's prompt and seed.

Under `accelerate launch` or `torchrun` the processes take the prompts in turn (prompt i on process i mod P, with
seed + i, as in one process), and the main process gathers each round's samples and writes every file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data.long_prompts import LongPromptWarning, quiet_truncation
from .export import ExportError, load_pipeline, sampling_kwargs
from .files import atomic_write, write_text_atomic
from .output_dirs import check_output_dir
from .processes import launched_processes


def save_media(item, path: Path, fps: int = 8) -> Path:
    """One PIL image as PNG, or a list of frames as a looping GIF (the suffix is chosen here)."""
    if isinstance(item, list):
        path = path.with_suffix(".gif")
        atomic_write(path, lambda tmp: item[0].save(tmp, save_all=True, append_images=item[1:],
                                                    duration=round(1000 / fps), loop=0))
    else:
        path = path.with_suffix(".png")
        atomic_write(path, lambda tmp: item.save(tmp))
    return path


def generate(model_dir: str | Path, prompts: list[str], out_dir: str | Path, *, steps: int | None = None,
             seed: int = 0, merged: bool = False, dtype: str = "float32", device: str | None = None
             ) -> list[Path] | None:
    """Sample one image (or video) per prompt with seeds seed, seed + 1, ...; returns the written files (None
    on processes other than the main one of a multi-process launch)."""
    if steps is not None and steps < 1:
        raise ExportError(f"--steps must be >= 1, got {steps}")
    check_output_dir(out_dir)
    processes = launched_processes()
    written = _generate(processes, model_dir, prompts, out_dir, steps, seed, merged, dtype, device)
    processes.finish()  # after the pipeline is gone (_generate returned): a rank that exits holding it can abort
    return written if processes.is_main else None


def _generate(processes, model_dir, prompts, out_dir, steps, seed, merged, dtype, device) -> list[Path]:
    """`generate` on this process: its share of the prompts, and the files on the main process."""
    device = processes.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe, recipe = load_pipeline(model_dir, merged=merged, dtype=getattr(torch, dtype), device=device, steps=steps)
    pipe.set_progress_bar_config(disable=True)
    kwargs = sampling_kwargs(recipe, steps)
    steps = kwargs["num_inference_steps"]
    out_dir = Path(out_dir)
    written, index = [], []
    if processes.is_main:
        LongPromptWarning().check(pipe, prompts, recipe["pipeline_kwargs"])

    def sample(i: int):
        with quiet_truncation(pipe):
            return pipe(prompt=prompts[i], generator=torch.Generator().manual_seed(seed + i), **kwargs)[0][0]

    for first in range(0, len(prompts), processes.count):  # a round: one prompt per process
        i = first + processes.index
        for j, item in enumerate(processes.gather([(i, sample(i))] if i < len(prompts) else []) or [], start=first):
            path = save_media(item, out_dir / f"{j:04d}")  # on the main process, which gathered the round
            written.append(path)
            index.append({"file": path.name, "prompt": prompts[j], "seed": seed + j, "steps": steps})
    if processes.is_main:
        write_text_atomic(out_dir / "samples.json", json.dumps(index, indent=2) + "\n")
    return written
