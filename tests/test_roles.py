"""Roles on one base: student and fake score as two peft LoRA adapters on one frozen network, teacher = the base.

Real models throughout: a tiny diffusers UNet2DConditionModel (built from config, saved and loaded with
from_pretrained, conditioned on fixed random text embeddings) and the shipped digits teacher in the trainer.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from roles_worker import SMALL, audited_training, probe_input
from tdm.checkpoint import latest_checkpoint
from tdm.cli import main
from tdm.config import ConfigError, load_config
from tdm.core.algorithm import TDM, TDMConfig
from tdm.core.prediction import PredictionType
from tdm.core.schedules import DiscreteVP
from tdm.roles import Roles, base_fingerprint, resolve_targets
from tdm.toys.digits import TEACHER_FILE, WEIGHTS_DIR, load_teacher
from tdm.trainer import Trainer

diffusers = pytest.importorskip("diffusers")
peft_utils = pytest.importorskip("peft.utils")

TESTS = Path(__file__).parent
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


class TextUNet(nn.Module):
    """A test denoiser: the tiny UNet as `module(x_t, t, cond)`, cond = text embeddings [B, L, 32]."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x_t, t, cond):
        return self.unet(x_t, t, encoder_hidden_states=cond).sample


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    path = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(path)
    return path


def load(unet_dir, checkpointing=False) -> TextUNet:
    unet = diffusers.UNet2DConditionModel.from_pretrained(unet_dir)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return TextUNet(unet)


def inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([700.0, 250.0])[:batch], \
        torch.randn(batch, 6, 32, generator=g)


def lora_roles(unet_dir, checkpointing=False, **kwargs) -> Roles:
    net = load(unet_dir, checkpointing)
    return Roles.lora(net, net, **{"rank": 4, "alpha": 8.0, "targets": ("attention",), **kwargs})


def snapshot(roles: Roles) -> dict[str, dict[str, torch.Tensor]]:
    base = {k: v.clone() for k, v in roles.shared.base.state_dict().items() if "lora_" not in k}
    return {"student": {k: v.clone() for k, v in roles.student.state_dict().items()},
            "fake_score": {k: v.clone() for k, v in roles.fake_score.state_dict().items()}, "base": base}


def moved(before, roles: Roles) -> set[str]:
    now = snapshot(roles)
    return {r for r in before if any(not torch.equal(v, now[r][k]) for k, v in before[r].items())}


def perturb(module: nn.Module, scale=0.05, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---- the views on one base ----

def test_one_frozen_base_two_disjoint_adapters_and_all_roles_start_as_the_teacher(unet_dir):
    reference = load(unet_dir)(*inputs()).detach()  # the same network, no adapters anywhere
    roles = lora_roles(unet_dir)
    base = roles.shared.base
    student, fake = list(roles.student.named_parameters()), list(roles.fake_score.named_parameters())
    assert student and len(student) == len(fake)
    assert all(".lora_" in n and p.requires_grad and p.dtype == torch.float32 for n, p in student + fake)
    assert {id(p) for _, p in student}.isdisjoint({id(p) for _, p in fake})
    assert list(roles.teacher.parameters()) == []
    lora_ids = {id(p) for _, p in student + fake}
    assert not any(p.requires_grad for p in base.parameters() if id(p) not in lora_ids)
    assert not base.training
    for role in (roles.teacher, roles.student, roles.fake_score):  # LoRA B starts at 0
        assert torch.equal(role(*inputs()).detach(), reference)


def test_views_do_not_leak_into_each_other_or_the_base_even_after_an_exception(unet_dir):
    reference = load(unet_dir)(*inputs()).detach()
    roles = lora_roles(unet_dir)
    perturb(roles.student)
    x, t, cond = inputs()
    with torch.no_grad():
        student, teacher, fake = roles.student(x, t, cond), roles.teacher(x, t, cond), roles.fake_score(x, t, cond)
    assert not torch.allclose(student, teacher, atol=1e-3)
    assert torch.equal(teacher, reference) and torch.equal(fake, reference)
    with pytest.raises(RuntimeError):  # fails inside the base, with the student adapter active
        roles.student(x, t, torch.randn(2, 6, 5))
    assert roles.shared.active is None  # at rest the base is the teacher
    with torch.no_grad():
        assert torch.equal(roles.shared.base(x, t, cond), reference)
        assert torch.equal(roles.teacher(x, t, cond), reference)
        assert torch.equal(roles.student(x, t, cond), student)


def _tdm():
    schedule = DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012)
    return TDM(schedule, PredictionType.EPSILON, TDMConfig(num_steps=2, total_steps=1000, guidance_scale=2.0))


def test_each_optimiser_step_moves_only_its_own_role_and_the_teacher_never_changes(unet_dir):
    """Both phases of tdm.core.algorithm on the tiny UNet; the generator loss calls the fake score and the
    teacher after the student's forward and before its backward, which must not reroute the student's grads."""
    roles, tdm = lora_roles(unet_dir), _tdm()
    x, t, cond = inputs()
    teacher_before = roles.teacher(x, t, cond).detach()
    opt_g = torch.optim.AdamW(roles.student.parameters(), lr=1e-3)
    opt_f = torch.optim.AdamW(roles.fake_score.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    noise, uncond = torch.randn(x.shape, generator=g), torch.zeros_like(cond)
    for _ in range(2):
        fake_draws, gen_draws = tdm.draw(x.shape, g), tdm.draw(x.shape, g)
        traj = tdm.rollout_for(roles.student, noise, cond, [fake_draws], gen_draws)  # takes the generator's step

        loss, _ = tdm.fake_score_loss(roles.fake_score, traj, fake_draws, cond)
        opt_f.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        loss.mean().backward()
        assert all(p.grad is None for p in roles.student.parameters())
        before = snapshot(roles)
        opt_f.step()
        assert moved(before, roles) == {"fake_score"}

        loss, _ = tdm.generator_loss(roles.student, roles.teacher, roles.fake_score, traj, gen_draws, cond, uncond)
        opt_g.zero_grad(set_to_none=True)
        opt_f.zero_grad(set_to_none=True)
        loss.mean().backward()
        assert all(p.grad is None for p in roles.fake_score.parameters())
        assert all(p.grad is not None for p in roles.student.parameters())
        before = snapshot(roles)
        opt_g.step()
        assert moved(before, roles) == {"student"}
    assert torch.equal(roles.teacher(x, t, cond).detach(), teacher_before)
    assert not torch.allclose(roles.student(x, t, cond), teacher_before, atol=1e-4)


def test_gradient_checkpointing_recomputes_under_the_adapter_of_the_original_forward(unet_dir):
    """diffusers recomputes checkpointed blocks during backward, after the student's call has returned and the
    fake score and teacher have run: the student's gradients must be those of the run without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        roles = lora_roles(unet_dir, checkpointing)
        perturb(roles.student)
        perturb(roles.fake_score, seed=3)
        x, t, cond = inputs()
        out = roles.student(x, t, cond)
        with torch.no_grad():
            target = roles.fake_score(x, t, cond) - roles.teacher(x, t, cond)
        (out * target).sum().backward()
        grads.append({k: p.grad for k, p in roles.student.named_parameters()})
    assert roles.shared.base.unet.is_gradient_checkpointing
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    assert any(g.abs().sum() > 0 for g in grads[1].values())


def test_student_weights_are_the_peft_lora_state_dict_that_diffusers_loads(unet_dir, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig

    roles = lora_roles(unet_dir)
    ema = roles.student_ema()  # a third adapter on the same base must not leak into the student's state dict
    perturb(roles.student)
    perturb(ema, seed=4)
    student = roles.student.state_dict()
    peft_sd = peft_utils.get_peft_model_state_dict(roles.shared.base, adapter_name="student")
    assert peft_sd.keys() == student.keys() and all(torch.equal(peft_sd[k], student[k]) for k in student)

    # export as a diffusers LoRA (keys relative to the UNet, diffusers naming, rank/alpha as metadata) and load it
    unet_sd = {k.removeprefix("unet."): v for k, v in student.items()}
    metadata = LoraConfig(r=4, lora_alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]).to_dict()
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
        unet_lora_adapter_metadata=metadata)
    fresh = load(unet_dir)
    fresh.unet.load_lora_adapter(tmp_path, weight_name="pytorch_lora_weights.safetensors", prefix="unet",
                                 adapter_name="tdm")
    with torch.no_grad():
        assert torch.allclose(fresh(*inputs()), roles.student(*inputs()), atol=1e-6, rtol=0)


def test_bf16_base_keeps_fp32_lora_weights(unet_dir):
    net = load(unet_dir).to(torch.bfloat16)
    roles = Roles.lora(net, net, rank=4, alpha=4.0, targets=("attention",))
    assert all(p.dtype == torch.float32 for p in roles.student.parameters())
    x, t, cond = inputs()
    out = roles.student(x.bfloat16(), t, cond.bfloat16())
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in roles.student.parameters())


def test_lora_targets_groups_patterns_and_errors(unet_dir):
    net = load(unet_dir)
    assert resolve_targets(net, ("attention",)) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert resolve_targets(net, ("feedforward", "conv", "time_emb_proj")) == [
        "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
    with pytest.raises(ConfigError, match=r"train.lora_targets: \['nowhere'\] match no"):
        resolve_targets(net, ("to_q", "nowhere"))
    with pytest.raises(ConfigError, match="train.lora_targets"):
        resolve_targets(net, ("norm1",))  # GroupNorm: no LoRA layer for it
    assert resolve_targets(load_teacher(), ("conv1", "conv2", "emb")) == ["conv1", "conv2", "emb"]


def test_unmatched_lora_targets_stop_the_cli_with_one_line(tmp_path, capsys):
    code = main(["distill", "--config", "digits-demo", "--out", str(tmp_path), "--set", "train.roles=lora",
                 "--set", "train.lora_targets=[attention]"])
    err = capsys.readouterr().err
    assert code == 2 and "tdm: error: train.lora_targets: ['attention'] match no" in err
    assert "Traceback" not in err and not (tmp_path / "checkpoints").exists()


# ---- the trainer with train.roles=lora (digits teacher) ----

def test_trainer_steps_move_only_their_role_and_the_teacher_stays_fixed(tmp_path):
    trainer = Trainer(load_config("digits-demo", [*SMALL, "train.roles=lora", "train.iterations=2"]), tmp_path)
    ema_start = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    record = audited_training(trainer)
    assert record["steps"] == [["fake_score", ["fake_score"]], ["student", ["student"]]] * 2
    assert torch.equal(record["teacher_before"], record["teacher_after"])
    with torch.no_grad():
        assert not torch.allclose(trainer.student(*probe_input()), record["teacher_after"], atol=1e-4)
    assert any(not torch.equal(v, trainer.ema.state_dict()[k]) for k, v in ema_start.items())
    trainer.close()


def test_distill_cli_checkpoints_only_the_adapters_and_refuses_another_base(tmp_path, capsys):
    sets = [a for s in [*SMALL, "train.roles=lora", "train.iterations=2"] for a in ("--set", s)]
    run = tmp_path / "run"
    assert main(["distill", "--config", "digits-demo", "--out", str(run), "--no-report", *sets]) == 0
    ckpt = latest_checkpoint(run / "checkpoints")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["base_fingerprint"] == base_fingerprint(load_teacher())
    teacher_params = sum(p.numel() for p in load_teacher().parameters())
    for role in ("student", "fake_score", "student_ema"):
        weights = load_file(ckpt / f"{role}.safetensors")
        assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), role
        assert sum(v.numel() for v in weights.values()) < teacher_params / 2

    other = load_teacher()  # a fine-tuned base: same architecture, other weights
    with torch.no_grad():
        other.conv_in.weight.mul_(1.01)
    other_path = tmp_path / "other_teacher.safetensors"
    save_file(other.state_dict(), other_path)
    other_path.with_suffix(".json").write_text((WEIGHTS_DIR / TEACHER_FILE).with_suffix(".json").read_text())
    capsys.readouterr()
    resume = ["distill", "--config", "digits-demo", "--out", str(run), "--no-report", *sets,
              "--set", f"backbone.teacher={other_path}", "--resume", str(ckpt)]
    assert main(resume) == 2 and "backbone.teacher" in capsys.readouterr().err  # a changed config is refused first
    code = main([*resume, "--allow-config-change"])  # even when the change is allowed, the base is checked
    err = capsys.readouterr().err
    assert code == 2 and "was trained on another base model" in err, err


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.parametrize("roles", ["lora", "separate"])
def test_two_processes_train_identical_roles(tmp_path, roles):
    """2-process DDP on CPU (gloo): per rank, each step moves only its role and the teacher stays fixed; both
    ranks hold identical roles after steps although each rank draws other samples (gradients averaged), also
    where the ranks' rollouts call the student a different number of times (separate copies: DDP-wrapped)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"),
                                                                               os.environ.get("PYTHONPATH", "")])}
    cmd = [TORCHRUN, "--nproc_per_node", "2", str(TESTS / "roles_worker.py"), str(tmp_path),
           f"train.roles={roles}", "train.iterations=2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    for r in (0, 1):
        steps = json.loads((tmp_path / f"rank{r}.json").read_text())["steps"]
        assert steps == [["fake_score", ["fake_score"]], ["student", ["student"]]] * 2
        t = ranks[r]
        assert torch.equal(t["teacher_before"], t["teacher_after"])
        for role in ("student", "fake_score"):
            assert any(not torch.equal(v, t[f"end/{role}/{k.split('/', 2)[2]}"])
                       for k, v in t.items() if k.startswith(f"start/{role}/"))
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
