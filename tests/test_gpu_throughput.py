"""benchmarks/gpu_throughput.py in its tiny CPU mode: tdm's real trainer on a random-weight diffusers network, one
configuration in its own process, a JSON row with positive finite measurements (no GPU needed)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from gpu_throughput import peak_tflops  # noqa: E402  (a script folder, not a package)


def test_peak_by_gpu_name_or_given():
    assert peak_tflops("NVIDIA H200", None) == peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert peak_tflops("NVIDIA A800-SXM4-80GB", None) == peak_tflops("NVIDIA A100-SXM4-40GB", None) == 312.0
    assert peak_tflops("NVIDIA GeForce RTX 4090", None) is None
    assert peak_tflops("NVIDIA GeForce RTX 4090", 165.0) == 165.0


def test_tiny_mode_writes_positive_finite_measurements(tmp_path):
    cmd = [sys.executable, str(BENCHMARKS / "gpu_throughput.py"), "--tiny", "--architectures", "pixart-alpha-512",
           "--configs", "*/ckpt/eager", "--batch", "2", "--warmup", "1", "--iterations", "2", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_throughput_tiny.json").read_text())
    assert result["device"] == "cpu" and result["tiny"] and result["command"].startswith("python benchmarks/")
    (row,) = result["rows"]
    assert row["status"] == "ok", row
    assert (row["architecture"], row["setting"], row["batch"], row["iterations"]) == ("pixart-alpha-512",
                                                                                       "ckpt/eager", 2, 2)
    for key in ("seconds_per_iteration", "iterations_per_s", "samples_per_s", "peak_memory_mib",
                "tflop_per_iteration", "tflop_per_iteration_executed", "achieved_tflops"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["samples_per_s"] == pytest.approx(2 * row["iterations_per_s"])
    assert row["tflop_per_iteration_executed"] > row["tflop_per_iteration"]  # checkpointing recomputes forwards
    assert "mfu" not in row  # no peak on the CPU unless --peak-tflops is given
    assert "ckpt/eager" in done.stdout and "samples/s" in done.stdout  # the printed table
