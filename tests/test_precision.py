"""Precision: trained weights are float32 on any base dtype, fp16 overflow is the grad scaler's to handle, and an
epsilon teacher on a zero-terminal-SNR table is refused.

Real models throughout: a bfloat16 linear network, the tiny diffusers SD1.5 pipeline (tests/tiny_diffusers.py) and
the shipped digits teacher in the trainer.
"""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

import tdm.trainer
from tdm.config import ConfigError, load_config
from tdm.core.algorithm import TDM, TDMConfig
from tdm.core.prediction import PredictionType, to_x0
from tdm.core.schedules import DiscreteVP
from tdm.roles import Roles
from tdm.trainer import Trainer

diffusers = pytest.importorskip("diffusers")


# ---- item: full copies train in float32 whatever the base's dtype ----

class CastingNet(nn.Module):
    """A small denoiser that casts its input to its own dtype and returns float32, as tdm's diffusers denoisers
    do at their boundary."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, x):
        return self.net(x.to(self.net[0].weight.dtype)).float()


class NeverChanged:
    """Per trainable tensor of the watched modules: which elements no step has changed so far (`step()` after
    each update; an element that moves and moves back still counts as changed)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.params = {f"{role}/{n}": p for role, m in modules.items() for n, p in m.named_parameters()}
        self.last = {k: p.detach().clone() for k, p in self.params.items()}
        self.never = {k: torch.ones_like(p, dtype=torch.bool) for k, p in self.params.items()}

    def step(self) -> None:
        for k, p in self.params.items():
            self.never[k] &= p.detach() == self.last[k]
            self.last[k] = p.detach().clone()

    def fractions(self) -> dict[str, float]:
        return {k: v.float().mean().item() for k, v in self.never.items()}


def small_lr_training(base_dtype: torch.dtype, steps: int = 20, lr: float = 4e-6) -> dict[str, float]:
    """`steps` AdamW steps at a fine-tuning learning rate on full copies of a `base_dtype` network."""
    torch.manual_seed(0)
    base = CastingNet().to(base_dtype)
    roles = Roles.separate_copies(base, base)
    watch = NeverChanged({"student": roles.student})
    opt = torch.optim.AdamW(roles.student.parameters(), lr=lr, betas=(0.0, 0.95))
    x, target = torch.randn(64, 256), torch.randn(64, 256)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (roles.student(x) - target).square().mean().backward()
        opt.step()
        watch.step()
    return watch.fractions()


def test_every_trainable_tensor_moves_on_a_bf16_base_as_on_a_float32_one():
    """A bf16 weight has 8 significant bits: lr-4e-6 updates round away (on main most weights never change)."""
    fp32, bf16 = small_lr_training(torch.float32), small_lr_training(torch.bfloat16)
    assert max(fp32.values()) < 0.01, fp32
    assert all(bf16[name] <= fp32[name] + 0.01 for name in fp32), bf16


def test_separate_copies_are_float32_and_the_teacher_keeps_its_dtype():
    base = CastingNet(16).to(torch.bfloat16)
    roles = Roles.separate_copies(base, base)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in roles.teacher.parameters())
    for module in (roles.student, roles.fake_score, roles.student_ema()):
        assert all(p.dtype == torch.float32 for p in module.parameters())
    x = torch.randn(2, 16)
    assert torch.allclose(roles.student(x), roles.teacher(x), atol=0.05)  # the same network, in two dtypes


def _tiny_sd15_trainer(tiny_dirs, tmp_path, dtype: str, lr: float) -> Trainer:
    from tiny_diffusers import TINY_SIZE, load_backbone

    folder = tiny_dirs["sd15"]
    overrides = [f"backbone.teacher={folder}", f"backbone.height={TINY_SIZE['sd15']}",
                 f"backbone.width={TINY_SIZE['sd15']}", f"backbone.dtype={dtype}",
                 "backbone.gradient_checkpointing=false",
                 "train.roles=separate", "train.mixed_precision=no", "train.batch_size=2", "train.ema_decay=0.5",
                 "tdm.num_steps_set=[2, 4]", f"optim.generator_lr={lr}", f"optim.fake_lr={lr}",
                 "optim.warmup_steps=0", "optim.max_grad_norm=0"]
    config = load_config("sd15-lora", overrides)
    return Trainer(config, tmp_path / dtype, backbone=load_backbone("sd15", folder, dtype=dtype))


def test_trainer_on_a_bf16_diffusers_base_trains_float32_roles_as_on_a_float32_base(tiny_dirs, tmp_path):
    """Through Roles.from_config and the trainer on the tiny SD1.5 pipeline loaded in bfloat16: the teacher
    stays bf16; student, fake score, EMA and the TDM-unify step embeddings are float32, and after a few
    fine-tuning-lr iterations every trainable tensor has moved as much as on a float32 base."""
    fractions = {}
    for dtype in ("float32", "bfloat16"):
        trainer = _tiny_sd15_trainer(tiny_dirs, tmp_path, dtype, lr=4e-6)
        assert {p.dtype for p in trainer.teacher.parameters()} == {getattr(torch, dtype)}
        roles = {"student": trainer.student, "fake_score": trainer.fake_score, "ema": trainer.ema}
        for name, module in roles.items():
            assert {p.dtype for p in module.parameters()} == {torch.float32}, name
        assert trainer.student.num_steps_embedding.weight.dtype == torch.float32
        watch = NeverChanged({"student": trainer.student, "fake_score": trainer.fake_score})
        for _ in range(3):
            logs = trainer.train_step()
            assert logs["skipped/student"] == logs["skipped/fake_score"] == 0
            watch.step()
        fractions[dtype] = watch.fractions()
        trainer.close()
    fp32, bf16 = fractions["float32"], fractions["bfloat16"]
    assert sum(fp32.values()) / len(fp32) < 0.05  # the reference: nearly every element moves in float32
    worse = {name: (bf16[name], fp32[name]) for name in fp32 if bf16[name] > fp32[name] + 0.02}
    assert not worse, worse


# ---- item: fp16 overflow is handled by the grad scaler, as in a plain fp16 loop ----

@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision the first Accelerator fixes; reset it
    around a test that needs another (as accelerate's own test cases do)."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def gpu_like_fp16(monkeypatch, init_scale: float, growth_interval: int) -> None:
    """The trainer's Accelerator as accelerate builds it for fp16 on a GPU, here on the CPU (where it keeps
    neither fp16 autocast nor a grad scaler): fp16 autocast and a GradScaler starting at `init_scale`."""
    def build(**kwargs):
        accelerator = Accelerator(**kwargs)
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
        return accelerator

    monkeypatch.setattr(tdm.trainer, "Accelerator", build)


def plain_loop_scales(overflows: list[bool], init_scale: float, growth_interval: int) -> list[float]:
    """The scale after each step of a plain fp16 loop (scaler.step, scaler.update) whose steps overflow as given."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0)
    scaler.scale(p.sum())  # creates the scale
    scales = []
    for overflow in overflows:
        p.grad = torch.full((1,), float("inf") if overflow else 1.0)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


def test_fp16_overflow_backs_the_scale_off_as_a_plain_loop_and_training_goes_on(tmp_path, monkeypatch,
                                                                                fresh_accelerate_state):
    """A scale far too large for the generator's gradients (~500 on digits): its first updates overflow in
    fp16. The scaler skips them and halves the scale, exactly as a plain fp16 loop's would; weights and EMA
    change only on real steps, and the run does not abort (on main the scale never came down: abort after
    train.max_nonfinite)."""
    init_scale, growth_interval, iterations = 2.0**12, 2, 8
    gpu_like_fp16(monkeypatch, init_scale, growth_interval)
    config = load_config("digits-demo", ["train.mixed_precision=fp16", "train.max_nonfinite=2", "train.batch_size=2",
                                         "train.ema_decay=0.5", "train.eval_every=0", "optim.generator_lr=1e-4"])
    trainer = Trainer(config, tmp_path)
    scaler = trainer.accelerator.scaler
    scales, update = [], scaler.update
    monkeypatch.setattr(scaler, "update", lambda *a: (update(*a), scales.append(scaler.get_scale())))
    overflows, student_moved, ema_moved = [], [], []
    for _ in range(iterations):
        student = [p.detach().clone() for p in trainer.student.parameters()]
        ema = [p.detach().clone() for p in trainer.ema.parameters()]
        trainer.train_step()  # one fake-score step, then one generator step: two scaler updates
        overflows += [trainer.opt_f.step_was_skipped, trainer.opt_g.step_was_skipped]
        student_moved.append(any(not torch.equal(a, p) for a, p in zip(student, trainer.student.parameters())))
        ema_moved.append(any(not torch.equal(a, p) for a, p in zip(ema, trainer.ema.parameters())))
    generator_overflows = overflows[1::2]
    assert generator_overflows[:2] == [True, True] and not all(generator_overflows)  # >= max_nonfinite in a row
    assert scales == plain_loop_scales(overflows, init_scale, growth_interval)
    assert student_moved == ema_moved == [not o for o in generator_overflows]
    assert trainer.state.overflows["student"] == sum(generator_overflows)
    assert trainer.state.skipped == {"fake_score": 0, "student": 0}  # overflow is not a non-finite update
    trainer.close()


# ---- item: an epsilon teacher on a zero-terminal-SNR table is refused ----

def test_epsilon_on_a_zero_terminal_snr_scheduler_config_is_refused():
    from tdm.backbones.diffusers_schedule import schedule_from_config

    bad = diffusers.DDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                                  prediction_type="epsilon")
    with pytest.raises(ConfigError, match="prediction_type='epsilon'.*rescale_betas_zero_snr=True.*v_prediction"):
        schedule_from_config(bad)
    schedule, prediction = schedule_from_config({**bad.config, "prediction_type": "v_prediction"})
    T = schedule.num_train_timesteps
    t = torch.full((2,), T - 1)
    assert float(schedule.alpha(t[:1])) == 0.0  # the same table, zero terminal SNR
    x_t, out = torch.randn(2, 4), torch.randn(2, 4)
    assert torch.isfinite(to_x0(out, x_t, t, schedule, prediction)).all()
    assert not torch.isfinite(to_x0(out, x_t, t, schedule, PredictionType.EPSILON)).all()  # what is refused


def test_epsilon_on_a_zero_terminal_snr_schedule_is_refused_by_tdm():
    zero_snr = DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR.*v_prediction"):
        TDM(zero_snr, PredictionType.EPSILON, TDMConfig())
    TDM(zero_snr, PredictionType.V_PREDICTION, TDMConfig())
    TDM(DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012), PredictionType.EPSILON, TDMConfig())


# ---- item: the generator's signal (fake - teacher) in float32 under bf16 autocast ----

@pytest.mark.parametrize("fp32_signal", [False, True])
def test_fp32_signal_runs_teacher_and_fake_score_without_autocast(tmp_path, fresh_accelerate_state, fp32_signal):
    """Under train.mixed_precision=bf16 the generator step's teacher and fake-score forwards compute in bf16,
    unless train.fp32_signal; the student's forward stays under autocast either way."""
    config = load_config("digits-demo", ["train.mixed_precision=bf16", "train.batch_size=2", "train.eval_every=0",
                                         f"train.fp32_signal={str(fp32_signal).lower()}"])
    trainer = Trainer(config, tmp_path)
    trainer.train_step()  # the fake score's own step runs under autocast: record the generator step only
    seen = {}  # the output dtype of each role's first convolution: bf16 where it computes under autocast
    roles = {"teacher": trainer.teacher, "fake": trainer.fake_score, "student": trainer.student}
    first_convs = {role: next(m for m in module.modules() if isinstance(m, nn.Conv2d))
                   for role, module in roles.items()}
    hooks = [conv.register_forward_hook(lambda m, i, out, role=role: seen.setdefault(role, set()).add(out.dtype))
             for role, conv in first_convs.items()]
    traj = trainer.tdm.student_trajectory(trainer.student, torch.randn(2, 1, 8, 8), torch.arange(2), 4)
    seen.clear()
    draws = trainer.tdm.draw((2, 1, 8, 8), torch.Generator().manual_seed(0))
    trainer.generator_step([(slice(0, 2), torch.arange(2), traj)], draws, trainer.backbone.null_condition(2))
    for h in hooks:
        h.remove()
    signal = torch.float32 if fp32_signal else torch.bfloat16
    assert seen == {"teacher": {signal}, "fake": {signal}, "student": {torch.bfloat16}}
    trainer.close()


def test_fp32_signal_needs_a_float32_teacher():
    with pytest.raises(ConfigError, match="train.fp32_signal needs backbone.dtype=float32"):
        load_config("sd15-lora", ["train.fp32_signal=true"])
