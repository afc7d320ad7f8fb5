"""`tdm evaluate` and `tdm generate` under two CPU processes (torchrun, gloo): the processes share out the
samples and the main process gathers and writes; results equal one process's, bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evaluate_worker
from tdm.cli import main

TESTS = Path(__file__).parent
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
pytestmark = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")


def _torchrun(*args) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"),
                                                                               os.environ.get("PYTHONPATH", "")])}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", *map(str, args)]  # --standalone: a free port
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _one_thread(fn, *args):
    """Run in this process with one thread, as each torchrun process runs."""
    threads = torch.get_num_threads()
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def test_two_processes_evaluate_the_same_samples_and_metrics_as_one(tmp_path):
    run = tmp_path / "run"
    assert main(["distill", "--config", "digits-demo", "--out", str(run), "--no-report", "--set",
                 "train.iterations=1", "--set", "train.batch_size=8", "--set", "train.eval_every=0"]) == 0
    _one_thread(evaluate_worker.main, run, tmp_path / "one")
    _torchrun(TESTS / "evaluate_worker.py", run, tmp_path / "two")
    places = [json.loads((tmp_path / "two" / f"process{i}.json").read_text()) for i in (0, 1)]
    assert places == [{"count": 2, "batch_starts": [0, 10, 20]}, {"count": 2, "batch_starts": [5, 15]}]
    one, two = (load_file(tmp_path / name / "samples.safetensors") for name in ("one", "two"))
    assert set(one) == set(two) == {"teacher4", "student1", "student4"}
    for name in one:
        assert one[name].shape == (22, 1, 8, 8) and torch.equal(one[name], two[name]), name
    rows = json.loads((tmp_path / "two" / "result.json").read_text())["rows"]
    assert {"fd_teacher4", "kid_teacher4", "class_accuracy"} <= set(rows[0])
    assert (tmp_path / "one" / "result.json").read_text() == (tmp_path / "two" / "result.json").read_text()


@pytest.fixture(scope="module")
def sd15_export(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tdm.export import export_student
    from test_scheduler_export import TRAINED, lora_student
    from tiny_diffusers import load_backbone, save_tiny

    root = tmp_path_factory.mktemp("sd15")
    backbone = load_backbone("sd15", save_tiny("sd15", root / "tiny"))
    return export_student(backbone, lora_student(backbone), root / "export", tdm_config=TRAINED["sd15"])


def test_two_processes_generate_the_same_files_as_one(sd15_export, tmp_path):
    prompts = ["a cat", "a dog", "a red house"]  # two rounds: the second has a prompt for one process only
    args = ["generate", "--model", sd15_export, *[a for p in prompts for a in ("--prompt", p)], "--seed", "3"]
    assert _one_thread(main, [*map(str, args), "--out", str(tmp_path / "one")]) == 0
    printed = _torchrun("-m", "tdm.cli", *args, "--out", tmp_path / "two")
    assert printed.count("wrote 3 samples") == 1  # by the main process alone
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == ["0000.png", "0001.png", "0002.png", "samples.json"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == files
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
