"""FSDP2 training on two CPU processes (gloo), launched as a user does: `accelerate launch` with the shipped
1-node config file, translated to 2 processes without mixed precision. For both role strategies, on digits and
on a tiny diffusers family: the first iteration's fake-score loss is a single process's (rank 0 draws what a
single process draws, from the same weights; later losses follow the ranks' averaged updates), and a stopped
run resumed with `--resume auto` (or from a checkpoint) ends bit for bit as an uninterrupted one; a 2-process
checkpoint resumes in one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tdm.checkpoint import latest_checkpoint
from tdm.config import load_config
from tdm.launch import LaunchError
from tdm.sharding import check_config, launch_settings
from tdm.trainer import Trainer
from tiny_diffusers import PROMPTS, save_tiny, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
EXAMPLE = ROOT / "examples" / "accelerate" / "fsdp-1node-8gpu.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                                           os.environ.get("PYTHONPATH", "")])}
DIGITS = ["train.batch_size=8", "train.log_every=1", "train.eval_every=0", "train.ema_decay=0.9",
          "optim.generator_lr=1e-4", "optim.fake_lr=5e-4"]

pytestmark = pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate's launcher not installed")


def test_the_shipped_accelerate_configs_parse_and_the_slurm_script_is_valid_bash():
    from accelerate.commands.config.config_args import load_config_from_file

    for name, machines, processes in (("fsdp-1node-8gpu", 1, 8), ("fsdp-2node-8gpu", 2, 16)):
        config = load_config_from_file(str(EXAMPLE.with_name(f"{name}.yaml")))
        assert str(config.distributed_type) == "DistributedType.FSDP" and config.fsdp_config["fsdp_version"] == 2
        assert (config.num_machines, config.num_processes, config.mixed_precision) == (machines, processes, "bf16")
    script = ROOT / "examples" / "slurm" / "distill-fsdp.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "--resume auto" in script.read_text() and "#SBATCH --requeue" in script.read_text()


def test_fsdp_settings_tdm_does_not_implement_are_one_line_errors_naming_the_key(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(LaunchError, match=r"^fsdp_config.fsdp_version: tdm shards with FSDP2 only"):
        launch_settings()
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(LaunchError, match=r"^fsdp_config.fsdp_activation_checkpointing: .*"
                                          r"backbone.gradient_checkpointing=true$"):
        launch_settings()
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "ResBlock, BasicTransformerBlock")
    assert launch_settings().unit_classes == ("ResBlock", "BasicTransformerBlock")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    settings = launch_settings()
    assert settings.from_rank0
    check_config(load_config("digits-demo"), "no", settings)  # digits builds on meta
    with pytest.raises(LaunchError, match=r"^fsdp_config.fsdp_cpu_ram_efficient_loading: backbone toy-gmm .*"
                                          r"set it to false$"):
        check_config(load_config("toy-gmm"), "no", settings)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert launch_settings() is None


@pytest.fixture(scope="module")
def two_process_config(tmp_path_factory) -> Path:
    """The shipped 8-GPU FSDP config with 2 processes and no mixed precision (CPU ranks compute in float32)."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config.update(num_processes=2, mixed_precision="no")
    path = tmp_path_factory.mktemp("accelerate") / "fsdp-2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def rank0_loading_config(two_process_config) -> Path:
    """The 2-process config with fsdp_cpu_ram_efficient_loading: rank 1 builds the networks on meta."""
    config = yaml.safe_load(two_process_config.read_text())
    config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = True
    path = two_process_config.with_name("fsdp-2-rank0-loading.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def _launch(config: Path, preset: str, out: Path, overrides: list[str], *flags: str) -> list[str]:
    return [str(ACCELERATE), "launch", "--config_file", str(config), "-m", "tdm.cli", "distill", "--config", preset,
            "--out", str(out), "--no-report", *[a for s in overrides for a in ("--set", s)], *flags]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """`cmd` to its end; on a timeout (ranks waiting in a collective) the launcher and its ranks are killed."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after 300 s: {err[-3000:]}") from None
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (weights and optimiser states) but the RNG states."""
    return {f"{p.name}/{k}": v for p in sorted(checkpoint.glob("*.safetensors")) if p.name != "rng.safetensors"
            for k, v in load_file(p).items()}


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def _first_fake_loss(run: Path) -> float:
    return json.loads((run / "history.json").read_text())[0]["fake/loss"]


def _single_process_fake_loss(preset: str, overrides: list[str], out: Path) -> float:
    trainer = Trainer(load_config(preset, overrides), out)
    loss = trainer.train_step()["fake/loss"]
    trainer.close()
    return loss


@pytest.mark.parametrize("roles", ["lora", "separate"])
def test_digits_fsdp_matches_one_process_and_resumes_bit_for_bit_after_sigterm(roles, two_process_config, tmp_path):
    overrides = [*DIGITS, f"train.roles={roles}"]
    run = tmp_path / "stopped"
    proc = subprocess.Popen(_launch(two_process_config, "digits-demo", run, [*overrides, "train.iterations=100000"]),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((run / "tensorboard").glob("events.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # inside the training loop
    workers = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()  # the two ranks
    assert len(workers) == 2, workers
    os.kill(int(workers[0]), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    launch = json.loads((run / "launch.json").read_text())
    assert launch["num_processes"] == 2 and launch["fsdp"] is True
    stopped_at = int(latest_checkpoint(run / "checkpoints").name.split("_")[1])
    total = f"train.iterations={stopped_at + 2}"
    _run(_launch(two_process_config, "digits-demo", run, [*overrides, total], "--resume", "auto"))
    straight = tmp_path / "straight"
    _run(_launch(two_process_config, "digits-demo", straight, [*overrides, total]))
    _assert_same(latest_checkpoint(run / "checkpoints"), latest_checkpoint(straight / "checkpoints"))
    single = _single_process_fake_loss("digits-demo", [*overrides, "train.report_to=none"], tmp_path / "single")
    assert _first_fake_loss(straight) == pytest.approx(single, rel=1e-5)
    # another process count: the 2-process checkpoint (full tensors) resumes in one process and trains on
    last = latest_checkpoint(straight / "checkpoints")
    longer = [*overrides, "train.report_to=none", f"train.iterations={stopped_at + 3}"]
    one = Trainer(load_config("digits-demo", longer), tmp_path / "one")
    assert one.resume(str(last)) == last and one.state.step == stopped_at + 2
    saved = load_file(last / "student.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in one.student.state_dict().items())
    one.train()
    one.close()
    assert latest_checkpoint(tmp_path / "one" / "checkpoints").name == f"step_{stopped_at + 3:07d}"


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("tiny")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"sd3": save_tiny("sd3", root / "sd3")}


@pytest.mark.parametrize("roles", ["lora", "separate"])
def test_tiny_sd3_fsdp_matches_one_process_and_resumes_bit_for_bit(roles, two_process_config, rank0_loading_config,
                                                                  tiny_sd3, tmp_path):
    """SD3's preset (gradient checkpointing on) on a tiny pipeline: a 2-iteration run, the same run resumed from
    its first checkpoint in another folder, and the same run loaded by rank 0 alone (fsdp_cpu_ram_efficient_loading:
    rank 1 builds the transformer on meta and receives its shards of rank 0's weights): both end bit for bit as the
    first, so every rank's shards (whose gradients both ranks' updates average) compute what a full load does."""
    overrides = [*tiny_overrides("sd3", tiny_sd3), f"train.roles={roles}", "train.eval_every=0"]
    straight, resumed, rank0 = tmp_path / "straight", tmp_path / "resumed", tmp_path / "rank0"
    _run(_launch(two_process_config, "sd3-medium-lora", straight, overrides))
    _run(_launch(two_process_config, "sd3-medium-lora", resumed, overrides, "--resume",
                 str(straight / "checkpoints" / "step_0000001")))
    _assert_same(straight / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    _run(_launch(rank0_loading_config, "sd3-medium-lora", rank0, overrides))
    _assert_same(straight / "checkpoints" / "step_0000002", rank0 / "checkpoints" / "step_0000002")
    assert _first_fake_loss(rank0) == _first_fake_loss(straight)
    state = [json.loads((run / "checkpoints" / "step_0000002" / "state.json").read_text()) for run in (straight, rank0)]
    assert state[0].get("base_fingerprint") == state[1].get("base_fingerprint")  # lora: rank 0's; separate: None
    single = _single_process_fake_loss("sd3-medium-lora", [*overrides, "train.report_to=none"], tmp_path / "single")
    assert _first_fake_loss(straight) == pytest.approx(single, rel=1e-5)


@pytest.fixture(scope="module")
def tiny_wan22(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from tiny_wan import save_wan

    root = tmp_path_factory.mktemp("wan22")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return save_wan(root / "two", two_experts=True)


def test_wan22_experts_fsdp_from_rank0_equal_every_rank_loading_and_one_process(two_process_config,
                                                                              rank0_loading_config, tiny_wan22,
                                                                              tmp_path):
    """Wan 2.2 A14B's preset on a tiny two-expert pipeline. Each sample runs the expert its t selects, so in a call
    one process may need an expert that another does not: every process still runs it (a sharded network's calls
    are collectives; a process that skipped one would leave the others waiting). Loaded by rank 0 alone (rank 1
    builds both experts on meta), two iterations end bit for bit as when every rank loads, and the first fake
    loss is one process's."""
    from test_wan import overrides as wan_overrides

    overrides = [*wan_overrides(tiny_wan22), "train.eval_every=0", "train.validation_every=0"]
    straight, rank0 = tmp_path / "straight", tmp_path / "rank0"
    _run(_launch(two_process_config, "wan2.2-t2v-a14b-lora", straight, overrides))
    _run(_launch(rank0_loading_config, "wan2.2-t2v-a14b-lora", rank0, overrides))
    _assert_same(straight / "checkpoints" / "step_0000002", rank0 / "checkpoints" / "step_0000002")
    single = _single_process_fake_loss("wan2.2-t2v-a14b-lora", [*overrides, "train.report_to=none"],
                                       tmp_path / "single")
    assert _first_fake_loss(straight) == pytest.approx(single, rel=1e-5)


def test_roles_loaded_by_rank0_compute_on_every_rank_what_a_full_load_does(tmp_path):
    """fsdp_cpu_ram_efficient_loading's sharding step on a network with a buffer outside its state dict, for both
    strategies, and a rank whose network differs from rank 0's (tests/rank0_loading_worker.py asserts on every rank)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(ROOT / "tests" / "rank0_loading_worker.py")],
                            env=ENV, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
