"""`tdm evaluate`'s harness on a digits run, as tests/test_distributed_eval.py runs it in one process and under

    torchrun --standalone --nproc_per_node 2 tests/evaluate_worker.py RUN OUT

The main process saves every sampler's samples (OUT/samples.safetensors) and the payload without them and without
timings (OUT/result.json); every process notes its place in the launch (OUT/process<index>.json)."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tdm.evaluate.harness import evaluate
from tdm.evaluate.options import EvaluateOptions
from tdm.processes import launched_processes

# 22 samples in batches of 5: five batches, the last one short; two processes take three and two of them
OPTIONS = EvaluateOptions(teacher_steps=(4,), student_steps=(1, 4), num_samples=22, batch_size=5,
                          latency_repeats=0, device="cpu")
TIMINGS = ("ms_per_sample", "samples_per_s", "latency_ms")


def main(run: str, out: str) -> None:
    torch.set_num_threads(1)  # as torchrun's processes: one thread each
    result, _ = evaluate(run, None, OPTIONS)
    processes, out = launched_processes(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"process{processes.index}.json").write_text(json.dumps(
        {"count": processes.count, "batch_starts": list(processes.batch_starts(OPTIONS.num_samples,
                                                                               OPTIONS.batch_size))}))
    if result is not None:  # the main process
        write(result, out)
    processes.finish()


def write(result: dict, out: Path) -> None:
    save_file(result.pop("samples"), str(out / "samples.safetensors"))
    result["rows"] = [{k: v for k, v in row.items() if k not in TIMINGS} for row in result["rows"]]
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
