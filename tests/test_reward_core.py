"""TDM-R1's reward objectives (tdm.core.reward) against closed forms and hand-computed small cases."""

import pytest
import torch

from tdm.core.reward import (
    conditional_score_target,
    group_advantages,
    group_preference_loss,
    reward_generator_loss,
    trust_region_mask,
)
from tdm.core.schedules import DiscreteVP, FlowMatch


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    std = r.std(unbiased=False)  # mean 0.5, every deviation 0.5
    assert float(std) == pytest.approx(0.5)
    a = group_advantages(r, group, eps=0.0)
    assert torch.allclose(a, torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0]))  # (r - group mean) / 0.5
    a_group = group_advantages(r, group, std="group", eps=1e-12, clip=100.0)
    assert torch.allclose(a_group[:2], torch.tensor([1.0, -1.0]))   # the group's own std is 0.5 too
    assert torch.equal(a_group[2:], torch.zeros(4))                 # no spread: no signal (0 / eps)
    big = group_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), torch.zeros(4, dtype=torch.long), clip=1.5)
    assert float(big.max()) == 1.5 and float(big.min()) == pytest.approx(-25 / 43.30127, rel=1e-4)  # 1.732 clipped


@pytest.mark.parametrize("schedule", [DiscreteVP.from_betas("scaled_linear", 1000), FlowMatch(shift=3.0)])
def test_conditional_score_target_is_the_kernels_score(schedule):
    """-eps*/sigma_tau is the score of q(x_tau | x_from) = N(a x_from, b^2) at x_tau, and x_tau = alpha x0* +
    sigma eps*."""
    g = torch.Generator().manual_seed(0)
    x_from, z = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t_from = torch.tensor([0.0, 100, 300, 500, 700]) if schedule.discrete else torch.tensor([0.0, 100, 300, 500, 700.])
    tau = t_from + 150
    x_tau, x0, eps = conditional_score_target(x_from, t_from, tau, z, schedule)
    a, b = (c[:, None].double() for c in schedule.transition_coefficients(t_from, tau))
    sigma, alpha = schedule.sigma(tau)[:, None].double(), schedule.alpha(tau)[:, None].double()
    analytic = -(x_tau.double() - a * x_from.double()) / b**2
    assert torch.allclose(-eps.double() / sigma, analytic, rtol=1e-4, atol=1e-4)
    assert torch.allclose(alpha * x0.double() + sigma * eps.double(), x_tau.double(), atol=1e-5)


def test_conditional_score_target_regresses_to_the_marginal_score_on_a_gaussian():
    """DSM: for x_from ~ N(0, s^2), the least-squares fit of the conditional score on x_tau is the marginal score
    -x_tau / (a^2 s^2 + b^2) of the Gaussian q(x_tau)."""
    schedule = FlowMatch()
    g = torch.Generator().manual_seed(1)
    n, s = 200_000, 0.7
    x_from = s * torch.randn(n, 1, generator=g)
    t_from, tau = torch.full((n,), 200.0), torch.full((n,), 600.0)
    x_tau, _, eps = conditional_score_target(x_from, t_from, tau, torch.randn(n, 1, generator=g), schedule)
    score = -eps / schedule.sigma(tau)[:, None]
    slope = float((score * x_tau).sum() / (x_tau**2).sum())
    a, b = (float(c[0]) for c in schedule.transition_coefficients(t_from, tau))
    assert slope == pytest.approx(-1 / (a**2 * s**2 + b**2), rel=0.02)


def test_group_preference_loss_has_the_bradley_terry_gradient():
    """The mean per-sample loss's gradient in dsm equals that of mean_g -log sigmoid(-u_g)."""
    g = torch.Generator().manual_seed(2)
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    advantages = torch.randn(6, generator=g)
    dsm_ref = torch.rand(6, generator=g)
    dsm = (dsm_ref + 0.3 * torch.randn(6, generator=g)).requires_grad_(True)
    beta = 2.5
    loss, logs = group_preference_loss(dsm, dsm_ref, advantages, group, beta)
    (grad,) = torch.autograd.grad(loss.mean(), dsm)

    dsm2 = dsm.detach().clone().requires_grad_(True)
    u = torch.stack([beta * (advantages[group == j] * (dsm2 - dsm_ref)[group == j]).mean() for j in (0, 1)])
    bt = -torch.nn.functional.logsigmoid(-u).mean()
    (expected,) = torch.autograd.grad(bt, dsm2)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert float(logs["reward_model/bradley_terry"]) == pytest.approx(float(bt.detach()), rel=1e-5)


def test_trust_region_freezes_samples_past_the_ratio():
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    anchor = torch.zeros(4)
    dsm = torch.tensor([-0.01, 0.0, 0.01, 0.0])  # ratios e^0.01, 1, e^-0.01, 1
    frozen = trust_region_mask(dsm, anchor, advantages, eps=1e-3)
    assert frozen.tolist() == [True, False, True, False]
    dsm = dsm.clone().requires_grad_(True)
    loss, _ = group_preference_loss(dsm, anchor, advantages, torch.zeros(4, dtype=torch.long), frozen=frozen)
    (grad,) = torch.autograd.grad(loss.sum(), dsm)
    assert grad[0] == 0 and grad[2] == 0 and grad[1] != 0 and grad[3] != 0


def test_reward_generator_loss_moves_x0_along_the_surrogate_direction():
    x0 = torch.zeros(2, 4, requires_grad=True)
    surrogate, reference = torch.tensor([[1.0, 2, 3, 4], [0, 0, 0, 1]]), torch.zeros(2, 4)
    loss, _ = reward_generator_loss(x0, surrogate, reference)
    (grad,) = torch.autograd.grad(loss.sum(), x0)
    omega = (x0.detach() - surrogate).abs().mean(1, keepdim=True)
    assert torch.allclose(grad, -2 * (surrogate - reference) / 4 / omega)  # d/dx0 of mean_d (x0 - sg(x0 + D))^2
