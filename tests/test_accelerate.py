"""accelerate in full on the digits teacher: gradient accumulation, lr schedules and their resume, the optimiser
choice, mixed-precision precedence, trackers, the logged iteration time, and launches that start fewer processes
than they ask for (an error) or the processes and precision an accelerate config file asks for (honoured)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import tdm.trainer
from tdm.checkpoint import latest_checkpoint
from tdm.config import load_config
from tdm.errors import ConfigError, MissingPackage
from tdm.tracking import tracker_names
from tdm.trainer import Trainer

TESTS = Path(__file__).parent
ACCELERATE = Path(sys.executable).parent / "accelerate"
SMALL = ["train.log_every=1", "train.eval_every=0", "train.report_to=none", "optim.generator_lr=1e-3",
         "optim.fake_lr=5e-3"]


def _trainer(out, *extra) -> Trainer:
    return Trainer(load_config("digits-demo", [*SMALL, *extra]), out)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide state fixes the mixed precision of the first Accelerator: reset it around tests
    that need another."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


# ---- gradient accumulation ----

def _update_gradients(out, *extra) -> list[tuple[str, torch.Tensor]]:
    """Each optimiser step's (role, flat gradient) of a 2-iteration run, in order."""
    trainer = _trainer(out, "train.iterations=2", *extra)
    seen = []
    for role, opt in (("fake_score", trainer.opt_f), ("generator", trainer.opt_g)):
        params = [p for group in opt.optimizer.param_groups for p in group["params"]]
        opt.optimizer.register_step_pre_hook(lambda *_, role=role, params=params: seen.append(
            (role, torch.cat([p.grad.flatten() for p in params]).clone())))
    trainer.train()
    trainer.close()
    return seen


def test_two_accumulated_half_batches_equal_one_batch(tmp_path):
    """Equality, defined: M micro-batches of B draw the conditions, noise and TDM draws of one batch of M x B with
    the same generator, so every update's gradient is the same up to the order of float sums (< 1e-4 relative;
    measured ~1e-5); a batch of B alone (other draws) is far off."""
    whole = _update_gradients(tmp_path / "whole", "train.batch_size=8", "train.generator_forward=recompute")
    halves = _update_gradients(tmp_path / "halves", "train.batch_size=4", "train.gradient_accumulation_steps=2")
    half_only = _update_gradients(tmp_path / "half", "train.batch_size=4")
    assert [r for r, _ in whole] == [r for r, _ in halves] == ["fake_score", "generator"] * 2
    for (role, a), (_, b), (_, c) in zip(whole, halves, half_only):
        assert (a - b).norm() / a.norm() < 1e-4, role
        assert (a - c).norm() / a.norm() > 1e-2, role


# ---- learning-rate schedules ----

def _lrs_used(trainer) -> dict[str, list[float]]:
    """The lr each optimiser step used, per role."""
    used = {"generator": [], "fake_score": []}
    for role, opt in (("fake_score", trainer.opt_f), ("generator", trainer.opt_g)):
        opt.optimizer.register_step_pre_hook(lambda o, *_, role=role: used[role].append(o.param_groups[0]["lr"]))
    return used


def test_cosine_with_restarts_and_generator_warmup_follow_diffusers_formula(tmp_path):
    """lr of iteration n: warm-up n / w (generator only), then half a cosine per cycle over the rest of the run."""
    iterations, warmup, cycles = 6, 2, 2
    trainer = _trainer(tmp_path, f"train.iterations={iterations}", "train.batch_size=2",
                       "optim.lr_scheduler=cosine_with_restarts", f"optim.warmup_steps={warmup}",
                       f"optim.lr_num_cycles={cycles}")
    used = _lrs_used(trainer)
    trainer.train()
    trainer.close()

    def cosine(n, w):
        if n < w:
            return n / w
        progress = (n - w) / (iterations - w)
        return 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1)))

    assert used["generator"] == pytest.approx([1e-3 * cosine(n, warmup) for n in range(iterations)], abs=1e-12)
    assert used["fake_score"] == pytest.approx([5e-3 * cosine(n, 0) for n in range(iterations)], abs=1e-12)
    assert used["generator"][0] == 0.0 and len(set(used["fake_score"])) > 3


def _checkpoint_tensors(path):
    return {f"{p.name}/{k}": v for p in sorted(path.glob("*.safetensors")) if p.name != "rng.safetensors"
            for k, v in load_file(p).items()}


def test_resume_with_a_schedule_is_bit_exact_and_keeps_the_schedule_length(tmp_path):
    """A cosine run of 6 iterations (2 micro-batches each) resumed from its checkpoint at 3 (in another folder, as
    after a crash) ends bit for bit as the uninterrupted run (weights, optimiser states with their lr); resumed with
    train.iterations=8, its schedule keeps the length of the run's first start."""
    extra = ["train.batch_size=2", "train.gradient_accumulation_steps=2", "optim.lr_scheduler=cosine",
             "optim.warmup_steps=2", "train.checkpoint_every=3", "train.keep_checkpoints=0"]

    def run(out, iterations, resume=None):
        trainer = _trainer(out, f"train.iterations={iterations}", *extra)
        if resume:
            trainer.resume(str(resume))
        used = _lrs_used(trainer)
        trainer.train()
        trainer.close()
        return used

    full = run(tmp_path / "full", 6)
    middle = tmp_path / "full" / "checkpoints" / "step_0000003"
    assert json.loads((middle / "state.json").read_text())["trainer"]["lr_schedule_steps"] == 6
    resumed = run(tmp_path / "resumed", 6, resume=middle)
    assert resumed["generator"] == full["generator"][3:] and resumed["fake_score"] == full["fake_score"][3:]
    assert len(set(full["fake_score"])) == 6  # the schedule moves every iteration
    a = _checkpoint_tensors(latest_checkpoint(tmp_path / "full" / "checkpoints"))
    b = _checkpoint_tensors(latest_checkpoint(tmp_path / "resumed" / "checkpoints"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("generator", "fake_score"):
        groups = [json.loads((latest_checkpoint(tmp_path / r / "checkpoints") / f"{name}.optim.json").read_text())
                  ["param_groups"] for r in ("full", "resumed")]
        assert groups[0] == groups[1]
    longer = run(tmp_path / "longer", 8, resume=middle)
    assert longer["generator"][:3] == full["generator"][3:] and len(longer["generator"]) == 5


# ---- optimiser ----

@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_is_one_line_with_the_install_hint(tmp_path, monkeypatch):
    def no_loading(_):
        raise AssertionError("the teacher was loaded before the missing package was found")

    monkeypatch.setattr(tdm.trainer, "build_backbone", no_loading)
    with pytest.raises(MissingPackage, match=r"^optim.optimizer=adamw8bit needs the `bitsandbytes` package, which "
                                             r"is not installed: pip install bitsandbytes$"):
        _trainer(tmp_path, "optim.optimizer=adamw8bit")
    monkeypatch.undo()
    trainer = _trainer(tmp_path / "default")
    assert type(trainer.opt_g.optimizer) is torch.optim.AdamW and type(trainer.opt_f.optimizer) is torch.optim.AdamW
    trainer.close()


def test_adamw_takes_the_fused_step_and_updates_as_the_per_parameter_loop(tmp_path):
    """Both roles' AdamW take torch's fused kernel on the CPU, and one update moves every weight as the default
    per-parameter loop does, to float rounding (same lr, betas, weight decay, gradients)."""
    trainer = _trainer(tmp_path)
    for opt in (trainer.opt_g.optimizer, trainer.opt_f.optimizer):
        assert opt.defaults["fused"] is True
        params = [p for group in opt.param_groups for p in group["params"]]
        before = [p.detach().clone() for p in params]
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        loop = torch.optim.AdamW(copies, **{k: opt.defaults[k] for k in ("lr", "betas", "weight_decay")})
        assert loop.defaults["fused"] is None
        generator = torch.Generator().manual_seed(0)
        for p, c in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=generator)
            c.grad = p.grad.clone()
        opt.step()
        loop.step()
        assert max((p - c).abs().max().item() for p, c in zip(params, copies)) < 1e-7
        assert all(not torch.equal(p, b) for p, b in zip(params, before))  # every weight moved
    trainer.close()


def test_adamw_keeps_the_loop_for_an_fp16_grad_scaler_and_where_torch_has_no_fused_kernel():
    from tdm.config import OptimConfig
    from tdm.optimizers import build_optimizer

    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert build_optimizer(cpu, 1e-3, OptimConfig()).defaults["fused"] is True
    assert build_optimizer(cpu, 1e-3, OptimConfig(), grad_scaler=True).defaults["fused"] is None
    assert build_optimizer([torch.nn.Parameter(torch.zeros(3, device="meta"))], 1e-3,
                           OptimConfig()).defaults["fused"] is None


# ---- mixed precision: the run's config, else accelerate's ----

def test_mixed_precision_comes_from_accelerate_unless_the_config_sets_it(tmp_path, monkeypatch, capsys,
                                                                         fresh_accelerate_state):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    trainer = _trainer(tmp_path / "a", "train.mixed_precision=")
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.close()
    AcceleratorState._reset_state(True)
    trainer = _trainer(tmp_path / "b", "train.mixed_precision=no")
    assert trainer.accelerator.mixed_precision == "no"
    assert "train.mixed_precision=no (the run's config) overrides accelerate's mixed_precision=bf16" in \
        capsys.readouterr().err
    trainer.close()


# ---- trackers and logging ----

def test_tracker_selection_and_missing_trackers():
    assert tracker_names("none") == [] and tracker_names("tensorboard") == ["tensorboard"]
    assert "tensorboard" in tracker_names("all")
    with pytest.raises(ConfigError, match="train.report_to: unknown tracker 'tensorbored'"):
        tracker_names("tensorbored")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(MissingPackage, match=r"^train.report_to=wandb needs the `wandb` package, which is not "
                                                 r"installed: pip install wandb$"):
            tracker_names("tensorboard,wandb")


def test_logged_iteration_time_divides_by_the_iterations_that_ran(tmp_path, monkeypatch):
    """A 3-iteration run with log_every=10 logs once, at its last iteration: the time of 3 iterations over 3 (a
    clock advancing 2 s per iteration gives exactly 2; dividing by log_every gave 0.6)."""
    trainer = _trainer(tmp_path, "train.iterations=3", "train.log_every=10", "train.batch_size=2",
                       "train.report_to=tensorboard")
    clock = [100.0]

    class Clock:
        @staticmethod
        def perf_counter():
            return clock[0]

    step = trainer.train_step

    def timed_step():
        clock[0] += 2.0
        return step()

    monkeypatch.setattr(tdm.trainer, "time", Clock)
    trainer.train_step = timed_step
    trainer.train()
    trainer.close()
    assert [h["step"] for h in trainer.history] == [3] and trainer.history[0]["time/iteration_s"] == 2.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"generator/loss", "fake/loss", "time/iteration_s"} <= set(events.Tags()["scalars"])


def test_report_to_none_writes_no_tracker_files(tmp_path):
    trainer = _trainer(tmp_path, "train.iterations=1", "train.batch_size=2")
    trainer.train()
    trainer.close()
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "history.json").is_file()


# ---- launches ----

def _launch(tmp_path, accelerate_config: str, *tdm_args) -> subprocess.CompletedProcess:
    config = tmp_path / "accelerate.yaml"
    config.write_text(accelerate_config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"),
                                                                               os.environ.get("PYTHONPATH", "")])}
    cmd = [str(ACCELERATE), "launch", "--config_file", str(config), "-m", "tdm.cli", *tdm_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: {kind}
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: bf16
use_cpu: {cpu}
gpu_ids: all
main_training_function: main
rdzv_backend: static
same_network: true
"""
TOY_RUN = ["distill", "--config", "toy-gmm", "--no-report", "--set", "train.iterations=2", "--set",
           "train.batch_size=16", "--set", "train.eval_every=0", "--set", "train.ema_decay=0", "--set",
           "train.mixed_precision="]


def test_plain_python_warns_where_accelerates_default_config_asks_for_more_processes(tmp_path, monkeypatch,
                                                                                     capsys):
    from accelerate.commands.config import config_args

    from tdm.launch import check_process_count

    default = tmp_path / "default_config.yaml"
    default.write_text(ACCELERATE_CONFIG.format(kind="MULTI_GPU", cpu="false"))
    monkeypatch.setattr(config_args, "default_config_file", str(default))
    for name in ("ACCELERATE_MIXED_PRECISION", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    check_process_count(1)
    assert f"accelerate's config {default} asks for 2 processes, but this run was started without `accelerate " \
           f"launch` and runs 1" in capsys.readouterr().err
    check_process_count(2)
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate's launcher not installed")
def test_a_launch_that_starts_fewer_processes_than_its_config_asks_is_an_error(tmp_path):
    """distributed_type MULTI_CPU without an mpirun hostfile: accelerate starts one process for num_processes 2."""
    result = _launch(tmp_path, ACCELERATE_CONFIG.format(kind="MULTI_CPU", cpu="true"), *TOY_RUN,
                     "--out", str(tmp_path / "run"))
    assert result.returncode != 0 and "exit status 2" in result.stderr, result.stderr[-2000:]  # tdm's one-line error
    asked = f"num_processes in {tmp_path / 'accelerate.yaml'} asks for 2 processes"
    assert f"tdm: error: {asked} but accelerate started 1" in \
        result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate's launcher not installed")
def test_a_two_process_launch_from_a_config_file_honours_its_processes_and_mixed_precision(tmp_path):
    """The working multi-process CPU launch (distributed_type MULTI_GPU: ranks on gloo) with mixed_precision bf16
    in the file: 2 processes, and the training forwards autocast to bfloat16 (with 2 micro-batches per update, so
    DDP's all-reduce is skipped on the first: Accelerator.no_sync)."""
    result = _launch(tmp_path, ACCELERATE_CONFIG.format(kind="MULTI_GPU", cpu="false"), *TOY_RUN,
                     "--set", "train.gradient_accumulation_steps=2", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    launch = json.loads((tmp_path / "run" / "launch.json").read_text())
    assert launch["num_processes"] == 2 and launch["distributed_type"] == "DistributedType.MULTI_CPU"
    assert launch["mixed_precision"] == "bf16" and launch["autocast_dtype"] == "bfloat16"
    assert launch["mixed_precision_from"] == "accelerate" and launch["gradient_accumulation_steps"] == 2
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_0000002"
