"""The student grid and rollout, the two losses and one TDM iteration, on small real networks."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tdm.core.algorithm import TDM, TDMConfig, make_grid
from tdm.core.losses import fake_score_loss, generator_loss, importance_weight
from tdm.core.prediction import PredictionType
from tdm.core.sampling import explicit_grid, flow_grid, guided, rollout, rollout_per_sample, uniform_grid
from tdm.core.schedules import DiscreteVP, FlowMatch

VP = DiscreteVP.from_betas("linear", 1000, 1e-4, 0.02)


class TinyDenoiser(nn.Module):
    """A small real conditional network: (x [B, 2], t [B], cond [B] labels) -> raw output [B, 2]."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(2 + 1 + 4, 32), nn.SiLU(), nn.Linear(32, 2))
        self.calls, self.samples = 0, 0

    def forward(self, x, t, cond):
        self.calls += 1
        self.samples += x.shape[0]
        feats = torch.cat([x, t.float()[:, None] / 1000, nn.functional.one_hot(cond, 4).float()], 1)
        return self.net(feats)


def test_official_grid():
    g = uniform_grid(900, 4)
    assert g.timesteps == (899, 674, 449, 224) and g.lower == (675, 450, 225, 0)
    assert uniform_grid(1000, 4).timesteps == (999, 749, 499, 249)
    assert explicit_grid([999, 856, 665, 399]).lower == (856, 665, 399, 0)
    with pytest.raises(ValueError, match="num_steps"):
        uniform_grid(10, 20)
    with pytest.raises(ValueError, match="strictly decrease"):
        explicit_grid([500, 600])


def test_flow_grid_starts_at_pure_noise():
    sched = FlowMatch(shift=3.0)
    grid = flow_grid(4)
    sig = sched.sigma(torch.tensor(grid.timesteps))
    assert sig[0] == pytest.approx(1.0) and (sig[1:] < sig[:-1]).all()
    assert sched.sigma(torch.tensor(grid.lower))[-1] == 0
    assert make_grid(TDMConfig(num_steps=4), sched).timesteps == grid.timesteps


@pytest.mark.parametrize("prediction", [PredictionType.EPSILON, PredictionType.V_PREDICTION])
def test_rollout_equals_hand_written_ddim(prediction):
    model = TinyDenoiser()
    cond = torch.arange(8) % 4
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    grid = uniform_grid(900, 4)
    x = noise
    ts = list(grid.timesteps)
    acp = VP.alphas_cumprod
    for i, t in enumerate(ts):  # DDIM (eta = 0), written out with the table
        a, s = acp[int(t)].sqrt(), (1 - acp[int(t)]).sqrt()
        out = model(x, torch.full((8,), int(t)), cond)
        if prediction is PredictionType.EPSILON:
            x0, eps = (x - s * out) / a, out
        else:
            x0, eps = a * x - s * out, s * x + a * out
        if i + 1 < len(ts):
            a2, s2 = acp[int(ts[i + 1])].sqrt(), (1 - acp[int(ts[i + 1])]).sqrt()
            x = a2 * x0 + s2 * eps
    got = rollout(model, noise, cond, grid, VP, prediction)
    assert torch.allclose(got, x0, atol=1e-5)


def test_rollout_trajectory_stops_at_the_requested_level():
    model = TinyDenoiser()
    cond = torch.zeros(5, dtype=torch.long)
    traj = rollout(model, torch.randn(5, 2), cond, uniform_grid(900, 4), VP, PredictionType.EPSILON,
                   stop_level=3, return_trajectory=True)
    assert model.calls == 2
    assert sorted(traj.x0) == [3, 4] and sorted(traj.states) == [2, 3, 4]
    full = rollout(model, traj.states[4], cond, uniform_grid(900, 4), VP, PredictionType.EPSILON,
                   return_trajectory=True)
    assert torch.allclose(full.states[2], traj.states[2]) and torch.allclose(full.x0[3], traj.x0[3])
    k = torch.tensor([4, 3, 3, 2, 4])
    picked = full.gather("states", k)
    assert all(torch.equal(picked[i], full.states[int(k[i])][i]) for i in range(5))


def test_guidance_is_one_batched_call_and_skipped_at_scale_one():
    model = TinyDenoiser()
    x, t, cond = torch.randn(6, 2), torch.full((6,), 500), torch.arange(6) % 3
    uncond = torch.full((6,), 3)
    out = guided(model, uncond, 3.0)(x, t, cond)
    assert model.calls == 1 and model.samples == 12
    expected = model(x, t, uncond) + 3.0 * (model(x, t, cond) - model(x, t, uncond))
    assert torch.allclose(out, expected, atol=1e-6)
    assert guided(model, uncond, 1.0) is model


@pytest.mark.parametrize("interval", ["separate", "overlap"])
@pytest.mark.parametrize("randmid", [False, True])
def test_draws_respect_the_bands(interval, randmid):
    tdm = TDM(VP, PredictionType.EPSILON, TDMConfig(total_steps=900, interval=interval, randmid=randmid))
    d = tdm.draw((20000, 2), torch.Generator().manual_seed(0))
    assert set(d.k.tolist()) == {1, 2, 3, 4}
    assert torch.equal(d.t_k, (d.k * 225 - 1))
    lower = (d.k - 1) * 225
    if randmid:
        assert (d.t_mid >= lower).all() and (d.t_mid < d.t_k - 20 + 1).all() and (d.t_mid > lower).any()
    else:
        assert torch.equal(d.t_mid, lower)
    top = d.t_k - 10 if interval == "separate" else torch.full_like(d.t_k, 899 - 10)
    assert (d.tau >= d.t_mid.clamp(min=20)).all() and (d.tau < top).all()
    if interval == "separate" and not randmid:  # method.md C.4: [20,213], [225,438], [450,663], [675,888]
        for k, (lo, hi) in enumerate([(20, 213), (225, 438), (450, 663), (675, 888)], start=1):
            sel = d.tau[d.k == k]
            assert sel.min() == lo and sel.max() == hi


def test_importance_weight_is_one_for_unit_rms_eps_on_a_wide_band():
    g = torch.Generator().manual_seed(0)
    tdm = TDM(VP, PredictionType.EPSILON, TDMConfig())
    d_shape = (16, 4096)
    eps = torch.randn(d_shape, generator=g)
    eps = eps / eps.pow(2).mean(1, keepdim=True).sqrt()  # unit RMS
    x0 = torch.randn(d_shape, generator=g)
    from tdm.core.algorithm import Draws

    def draws(t_mid, tau):
        n = d_shape[0]
        return Draws(torch.ones(n, dtype=torch.long), torch.full((n,), 224), torch.full((n,), t_mid),
                     torch.full((n,), tau), torch.randn(d_shape, generator=g), 4)

    d = draws(0, 600)
    _, mixed = tdm._diffuse(x0, eps, d)
    w = importance_weight(mixed, d.noise)
    assert torch.allclose(w, torch.ones(16), atol=5e-3)
    d = draws(200, 205)  # narrow band and a student eps of RMS 2: the weight must fall well below 1
    _, mixed = tdm._diffuse(x0, 2 * eps, d)
    assert (importance_weight(mixed, d.noise) < 0.5).all()
    assert (importance_weight(mixed, d.noise, "off") == 1).all()
    big = importance_weight(-10 * mixed.abs().clamp(max=0.1), d.noise * 3, "clipped", clip=2.0)
    assert big.max() <= 2.0


def test_generator_gradient_vanishes_when_fake_equals_teacher():
    """Fixed point (paper Eq. 6): if the fake score equals the teacher, the student receives no gradient."""
    student, teacher = TinyDenoiser(0), TinyDenoiser(1)
    tdm = TDM(VP, PredictionType.EPSILON, TDMConfig(guidance_scale=1.0))
    g = torch.Generator().manual_seed(0)
    cond = torch.arange(16) % 4
    d = tdm.draw((16, 2), g)
    traj = tdm.student_trajectory(student, torch.randn(16, 2, generator=g), cond, 1)
    for kind in ("pseudo_huber", "mse", "pseudo_huber_vector"):
        tdm.config = TDMConfig(guidance_scale=1.0, generator_loss=kind)
        loss, _ = tdm.generator_loss(student, teacher, teacher, traj, d, cond, torch.full((16,), 3))
        student.zero_grad()
        loss.mean().backward()
        assert all(p.grad.abs().max() == 0 for p in student.parameters()), kind
    # and a different fake score does move the student
    loss, logs = tdm.generator_loss(student, teacher, TinyDenoiser(2), traj, d, cond, torch.full((16,), 3))
    student.zero_grad()
    loss.mean().backward()
    assert sum(p.grad.abs().sum() for p in student.parameters()) > 0 and logs["generator/teacher_fake_gap"] > 0


def test_generator_loss_gradient_is_the_distribution_matching_direction():
    x0 = torch.randn(4, 8, requires_grad=True)
    teacher, fake = torch.randn(4, 8), torch.randn(4, 8)
    loss, _ = generator_loss(x0, teacher, fake, "mse")
    loss.sum().backward()
    omega = (x0.detach() - teacher).abs().mean(1, keepdim=True)
    assert torch.allclose(x0.grad, 2 * (fake - teacher) / (8 * omega), atol=1e-5)


def test_fake_score_loss_weights():
    fake, target = torch.zeros(3, 4), torch.ones(3, 4)
    loss, logs = fake_score_loss(fake, target, torch.tensor([0.5, 5.0, 50.0]), torch.tensor([1.0, 2.0, 1.0]))
    assert torch.allclose(loss, torch.tensor([0.5, 10.0, 5.0]))
    assert logs["fake/mse"] == 1.0


def _iteration(tdm, roles, g, batch=64, generator_step=True):
    """One TDM iteration of the trainer's order on TinyDenoisers; returns both losses (per sample)."""
    student, teacher, fake = roles
    cond, uncond = torch.arange(batch) % 4, torch.full((batch,), 3)
    fake_d, gen_d = tdm.draw((batch, 2), g), tdm.draw((batch, 2), g)
    traj = tdm.rollout_for(student, torch.randn(batch, 2, generator=g), cond, [fake_d], gen_d, generator_step)
    fake_loss = tdm.fake_score_loss(fake, traj, fake_d, cond)[0]
    fake_loss.mean().backward()
    gen_loss = tdm.generator_loss(student, teacher, fake, traj, gen_d, cond, uncond)[0]
    gen_loss.mean().backward()
    return fake_loss, gen_loss, fake_d, gen_d


def test_one_iteration_makes_no_wasted_passes():
    """K = 4: each sample's rollout runs levels 4 .. min(k_fake, k_gen), one of them the generator's forward with
    gradient; teacher one 2B call, fake 1F/1B + 1F. On average 3.125 + 2 + 2 forwards and 2 backwards (issue 13)."""
    student, teacher, fake = TinyDenoiser(0), TinyDenoiser(1), TinyDenoiser(2)
    tdm = TDM(VP, PredictionType.EPSILON, TDMConfig(guidance_scale=3.0))
    g = torch.Generator().manual_seed(0)
    forwards = []
    for _ in range(30):
        for m in (student, teacher, fake):
            m.calls = m.samples = 0
        *_, fake_d, gen_d = _iteration(tdm, (student, teacher, fake), g)
        levels = 4 - torch.minimum(fake_d.k, gen_d.k) + 1
        assert student.samples == int(levels.sum())  # exactly the levels each sample needs, nothing recomputed
        assert (teacher.calls, teacher.samples, fake.calls, fake.samples) == (1, 128, 2, 128)
        forwards.append((student.samples + teacher.samples + fake.samples) / 64)
    assert sum(forwards) / len(forwards) == pytest.approx(7.125, abs=0.05)


@pytest.mark.parametrize("loss", ["pseudo_huber", "mse"])
def test_generator_step_from_the_rollout_equals_the_recomputed_one(loss):
    """The same draws give the same losses and gradients whether the rollout takes the generator's student forward
    (with gradient) or the generator loss recomputes it after the fake update."""
    results = []
    for generator_step in (True, False):
        roles = TinyDenoiser(0), TinyDenoiser(1), TinyDenoiser(2)
        tdm = TDM(VP, PredictionType.EPSILON, TDMConfig(guidance_scale=3.0, generator_loss=loss))
        fake_loss, gen_loss, *_ = _iteration(tdm, roles, torch.Generator().manual_seed(1), 32, generator_step)
        grads = [p.grad.clone() for m in (roles[0], roles[2]) for p in m.parameters()]
        results.append((fake_loss.detach(), gen_loss.detach(), grads, roles[0].samples))
    (f1, g1, grads1, n1), (f2, g2, grads2, n2) = results
    assert torch.allclose(f1, f2, atol=1e-6) and torch.allclose(g1, g2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads1, grads2))
    assert n1 < n2  # and recomputing costs forwards


def test_rollout_per_sample_runs_each_sample_only_where_it_is_needed():
    model = TinyDenoiser()
    grid, batch = uniform_grid(900, 4), 6
    noise, cond = torch.randn(batch, 2), torch.arange(batch) % 4
    stop, grad_level = torch.tensor([4, 3, 1, 2, 4, 1]), torch.tensor([4, 4, 1, 3, 4, 2])
    traj = rollout_per_sample(model, noise, cond, grid, VP, PredictionType.EPSILON, stop, grad_level)
    assert model.samples == int((4 - stop + 1).sum())
    # levels 4, 3, 2 above the gradient levels; one call with gradient; one for the samples that go deeper
    assert model.calls == 5
    full = rollout(model, noise, cond, grid, VP, PredictionType.EPSILON, return_trajectory=True)
    for k in range(1, 5):
        ran = stop <= k
        assert torch.allclose(traj.x0[k][ran], full.x0[k][ran], atol=1e-6) and traj.x0[k][~ran].isnan().all()
    x0, eps = traj.generator_step
    assert x0.requires_grad and torch.allclose(x0, full.gather("x0", grad_level), atol=1e-6)
    assert torch.allclose(eps, full.gather("eps", grad_level), atol=1e-6)
    with pytest.raises(ValueError, match="grad_level"):
        rollout_per_sample(model, noise, cond, grid, VP, PredictionType.EPSILON, stop, stop - 1)


def test_core_imports_nothing_but_torch():
    core = Path(__file__).parents[1] / "src" / "tdm" / "core"
    allowed = {"torch", "math", "enum", "dataclasses", "collections", "__future__"}
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level > 0 else {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
    code = ("import sys, tdm.core.algorithm, tdm.core.sampling, tdm.core.losses; "
            "bad = {'diffusers', 'peft', 'transformers', 'accelerate'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
