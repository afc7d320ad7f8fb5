"""Closed-form checks of the schedules and the prediction conversions."""

import pytest
import torch

from tdm.core.prediction import PredictionType, from_x0_eps, to_x0_eps
from tdm.core.schedules import DiscreteVP, FlowMatch

VP_TABLES = {
    "linear": lambda: DiscreteVP.from_betas("linear", 1000, 1e-4, 0.02),
    "scaled_linear": lambda: DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012),
    "cosine": lambda: DiscreteVP.from_betas("squaredcos_cap_v2", 1000),
    "zero_terminal_snr": lambda: DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=True),
}
SCHEDULES = {**VP_TABLES, "flow": lambda: FlowMatch(shift=1.0), "flow_shift3": lambda: FlowMatch(shift=3.0)}


@pytest.mark.parametrize("name", VP_TABLES)
def test_vp_alpha_sigma_on_unit_circle(name):
    s = VP_TABLES[name]()
    t = torch.arange(1000)
    assert torch.allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones(1000), atol=1e-6)
    assert (s.alpha(t)[1:] <= s.alpha(t)[:-1]).all(), "alpha must decrease with t"


def test_official_linear_table_values():
    # method.md A.1: alpha_t of the official schedule at a few grid points.
    s = VP_TABLES["linear"]()
    got = s.alpha(torch.tensor([224, 449, 674, 899]))
    assert torch.allclose(got, torch.tensor([0.769, 0.356, 0.099, 0.0166]), rtol=0.02)


def test_zero_terminal_snr_ends_at_zero():
    s = VP_TABLES["zero_terminal_snr"]()
    assert s.alpha(torch.tensor([999])).item() == pytest.approx(0.0, abs=1e-7)
    assert s.snr(torch.tensor([999])).item() == pytest.approx(0.0, abs=1e-12)
    plain = VP_TABLES["scaled_linear"]()
    assert s.alpha(torch.tensor([0])).item() == pytest.approx(plain.alpha(torch.tensor([0])).item())


@pytest.mark.parametrize("shift", [1.0, 3.0, 7.0])
def test_flow_endpoints_and_shift(shift):
    s = FlowMatch(shift=shift)
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    assert s.sigma(t)[0] == 0 and s.sigma(t)[-1] == pytest.approx(1.0)
    assert torch.allclose(s.alpha(t) + s.sigma(t), torch.ones(4))
    u = 0.5
    assert s.sigma(torch.tensor([500.0])).item() == pytest.approx(shift * u / (1 + (shift - 1) * u), rel=1e-6)


@pytest.mark.parametrize("name", SCHEDULES)
def test_forward_kernel_moments_compose_to_the_marginal(name):
    """x0 -> x_s by q(x_s|x0), then x_s -> x_t by q(x_t|x_s), must have the moments of q(x_t|x0)."""
    sched = SCHEDULES[name]()
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x0 = torch.full((n, 1), 0.7)
    s = torch.full((n,), 300 if sched.discrete else 300.0)
    t = torch.full((n,), 700 if sched.discrete else 700.0)
    x_s = sched.add_noise(x0, torch.randn(n, 1, generator=g), s)
    x_t = sched.transition(x_s, s, t, torch.randn(n, 1, generator=g))
    assert x_t.mean().item() == pytest.approx(0.7 * sched.alpha(t[:1]).item(), abs=4e-3)
    assert x_t.std().item() == pytest.approx(sched.sigma(t[:1]).item(), rel=4e-3)
    a, b = sched.transition_coefficients(s[:1], t[:1])  # and the kernel alone has mean a x_s, std b
    x_fixed = torch.full((n, 1), 0.3)
    y = sched.transition(x_fixed, s, t, torch.randn(n, 1, generator=g))
    assert y.mean().item() == pytest.approx(0.3 * a.item(), abs=4e-3)
    assert y.std().item() == pytest.approx(b.item(), rel=4e-3)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("prediction", list(PredictionType))
def test_conversion_round_trip(name, prediction):
    sched = SCHEDULES[name]()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(64, 3, 4, 4, generator=g), torch.randn(64, 3, 4, 4, generator=g)
    hi = 998 if name == "zero_terminal_snr" else 999  # alpha = 0 at the last zSNR step: x0 is not identifiable
    t = torch.randint(1, hi, (64,), generator=g)
    t = t if sched.discrete else t.float()
    x_t = sched.add_noise(x0, eps, t)
    out = from_x0_eps(x0, eps, t, sched, prediction)
    x0_back, eps_back = to_x0_eps(out, x_t, t, sched, prediction)
    assert torch.allclose(x0_back, x0, atol=2e-3, rtol=1e-4)
    assert torch.allclose(eps_back, eps, atol=2e-3, rtol=1e-4)
    assert torch.allclose(from_x0_eps(x0_back, eps_back, t, sched, prediction), out, atol=2e-3, rtol=1e-4)


def test_known_prediction_formulas():
    sched = VP_TABLES["linear"]()
    t = torch.tensor([500])
    a, s = sched.alpha(t).item(), sched.sigma(t).item()
    x0, eps = torch.tensor([[1.0]]), torch.tensor([[-2.0]])
    assert from_x0_eps(x0, eps, t, sched, PredictionType.V_PREDICTION).item() == pytest.approx(a * -2 - s * 1, abs=1e-6)
    fm = FlowMatch()
    assert from_x0_eps(x0, eps, torch.tensor([500.0]), fm, PredictionType.FLOW).item() == pytest.approx(-3.0)


def test_unknown_prediction_type_is_a_clear_error():
    with pytest.raises(ValueError, match="prediction type must be one of"):
        PredictionType.parse("velocity")
