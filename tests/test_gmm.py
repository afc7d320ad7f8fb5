"""toy-gmm: the exact teacher against Monte Carlo, the mixture density, metrics, fitting and the backbone."""

from __future__ import annotations

import math

import pytest
import torch

from tdm.core.prediction import PredictionType, to_x0_eps
from tdm.core.sampling import rollout, uniform_grid
from tdm.core.schedules import DiscreteVP, FlowMatch, Schedule
from tdm.toys.gmm import (
    NULL_CLASS,
    ExactGMMDenoiser,
    GaussianMixture,
    GMMBackbone,
    ToyMLP,
    fit_to_teacher,
    in_mode_fraction,
    mode_coverage,
    teacher_mismatch,
    train_dsm,
)

torch.set_num_threads(1)

SCHEDULES: dict[str, Schedule] = {
    "vp": DiscreteVP.from_betas("linear", 1000, 1e-4, 0.02),
    "flow": FlowMatch(shift=3.0),
}


def _monte_carlo_posterior_mean(mixture: GaussianMixture, schedule: Schedule, x_t: torch.Tensor, t: float,
                                label: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Self-normalised estimate of E[x0 | x_t] with weights w_i ∝ N(x_t; alpha x0_i, sigma^2 I), x0_i ~ p(x0 | c).

    Returns (estimate, standard error per coordinate, effective sample size).
    """
    x0 = mixture.sample(torch.full((n,), label), generator).double()
    tt = torch.tensor([t])
    a, s = schedule.alpha(tt).double(), schedule.sigma(tt).double()
    w = torch.softmax(-((x_t.double() - a * x0) ** 2).sum(-1) / (2 * s**2), 0)
    mean = w @ x0
    stderr = ((w[:, None] ** 2) * (x0 - mean) ** 2).sum(0).sqrt()  # delta method for a ratio estimator
    return mean, stderr, 1 / (w**2).sum()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_exact_posterior_mean_matches_monte_carlo(name):
    schedule, mixture = SCHEDULES[name], GaussianMixture()
    denoiser = ExactGMMDenoiser(mixture, schedule, "sample")
    generator = torch.Generator().manual_seed(0)
    for t in (100.0, 400.0, 800.0):
        alpha = schedule.alpha(torch.tensor([t])).item()
        queries = [(alpha * torch.tensor([2.0, 0.1]), 0), (torch.tensor([0.05, -0.02]), NULL_CLASS),
                   (alpha * torch.tensor([1.2, 1.5]), 1), (alpha * torch.tensor([-1.0, 0.3]), NULL_CLASS)]
        for x_t, label in queries:
            est, stderr, ess = _monte_carlo_posterior_mean(mixture, schedule, x_t, t, label, 200_000, generator)
            assert ess > 200, f"too few effective samples at t={t}: {ess}"
            exact = denoiser(x_t[None], torch.tensor([t]), torch.tensor([label]))[0].double()
            assert torch.all((exact - est).abs() <= 5 * stderr + 1e-3), (name, t, label, exact, est, stderr)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("prediction", list(PredictionType))
def test_raw_output_round_trips_to_the_same_x0(name, prediction):
    schedule, mixture = SCHEDULES[name], GaussianMixture()
    reference = ExactGMMDenoiser(mixture, schedule, "sample")
    denoiser = ExactGMMDenoiser(mixture, schedule, prediction)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, NULL_CLASS + 1, (256,), generator=g)
    t = schedule.snap(torch.rand(256, generator=g) * 900)
    x_t = schedule.add_noise(mixture.sample(labels, g), torch.randn(256, 2, generator=g), t)
    x0, eps = to_x0_eps(denoiser(x_t, t, labels), x_t, t, schedule, PredictionType(prediction))
    x0_ref, eps_ref = reference.x0_eps(x_t, t, labels)
    torch.testing.assert_close(x0, x0_ref.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps, eps_ref.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_exact_denoiser_is_finite_at_the_ends_of_the_time_axis(name):
    schedule = SCHEDULES[name]
    denoiser = ExactGMMDenoiser(GaussianMixture(), schedule, "epsilon")
    last = schedule.num_train_timesteps - 1 if schedule.discrete else schedule.num_train_timesteps
    t = schedule.snap(torch.tensor([0.0, last]))
    assert torch.isfinite(denoiser(torch.randn(2, 2), t, torch.tensor([0, NULL_CLASS]))).all()


def test_log_prob_matches_direct_formula_and_normalises():
    mixture = GaussianMixture()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(2)) * 2
    modes = mixture.modes(2).double()
    cov = mixture.std**2 * torch.eye(2, dtype=torch.float64)
    comps = [torch.distributions.MultivariateNormal(mu, cov).log_prob(x.double()) for mu in modes]
    direct = torch.logsumexp(torch.stack(comps), 0) - math.log(2)  # two equal-weight modes of class 2
    torch.testing.assert_close(mixture.log_prob(x, torch.full((64,), 2)), direct)
    axis = torch.linspace(-3.5, 3.5, 701, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    cell = (axis[1] - axis[0]) ** 2
    for label in (0, 3, NULL_CLASS):
        mass = mixture.log_prob(grid, torch.full((grid.shape[0],), label)).exp().sum() * cell
        assert abs(mass.item() - 1) < 1e-3


def test_sample_respects_labels():
    mixture = GaussianMixture()
    labels = torch.arange(4000) % (NULL_CLASS + 1)
    x = mixture.sample(labels, torch.Generator().manual_seed(3))
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    assert in_mode_fraction(x, labels, mixture) > 0.98
    assert mode_coverage(x, labels, mixture) == 1.0


def test_metrics_of_true_samples_sit_at_the_floor_and_collapse_is_caught():
    backbone = GMMBackbone()
    floors = backbone.floor_metrics(2000, seed=0)
    labels = backbone.evaluation_conditions(2000)
    true = backbone.metrics(backbone.mixture.sample(labels, torch.Generator().manual_seed(4)), labels)
    entropy = math.log(2) + 1 + math.log(2 * math.pi * backbone.mixture.std**2)  # 2 well-separated modes
    assert abs(floors["nll"] - entropy) < 0.1 and abs(true["nll"] - floors["nll"]) < 0.1
    assert true["mode_coverage"] == floors["mode_coverage"] == 1.0
    assert true["in_mode_fraction"] > 0.98 and floors["in_mode_fraction"] > 0.98
    assert true["energy_distance"] < 3 * floors["energy_distance"]
    collapsed = backbone.mixture.modes(0)[:1].expand(2000, 2) + 0.01 * torch.randn(2000, 2)
    bad = backbone.metrics(collapsed, labels)
    assert bad["mode_coverage"] == pytest.approx(1 / 8) and bad["in_mode_fraction"] == pytest.approx(0.25)
    assert bad["energy_distance"] > 50 * floors["energy_distance"] and bad["nll"] > floors["nll"] + 10


def test_fit_to_teacher_reduces_error_and_is_deterministic():
    backbone = GMMBackbone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = ToyMLP()
    args = (backbone.teacher, backbone.schedule, backbone.mixture)
    before = teacher_mismatch(untrained, *args)
    fitted = fit_to_teacher(*args, steps=300, batch=256, seed=0)
    assert teacher_mismatch(fitted, *args) < 0.05 * before
    again = fit_to_teacher(*args, steps=300, batch=256, seed=0)
    for p, q in zip(fitted.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_train_dsm_is_deterministic_and_learns():
    backbone = GMMBackbone()
    a = train_dsm(backbone.mixture, backbone.schedule, "epsilon", steps=200, seed=5)
    b = train_dsm(backbone.mixture, backbone.schedule, "epsilon", steps=200, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        untrained = ToyMLP()
    args = (backbone.teacher, backbone.schedule, backbone.mixture)
    assert teacher_mismatch(a, *args) < 0.25 * teacher_mismatch(untrained, *args)


def test_backbone_interface_and_exact_teacher_sampling():
    backbone = GMMBackbone(fit_steps=5)
    g = torch.Generator().manual_seed(6)
    cond = backbone.sample_conditions(16, g)
    assert cond.dtype == torch.long and 0 <= cond.min() and cond.max() < NULL_CLASS
    assert torch.equal(backbone.null_condition(3), torch.full((3,), NULL_CLASS))
    assert torch.equal(backbone.evaluation_conditions(6), torch.tensor([0, 1, 2, 3, 0, 1]))
    out = backbone.teacher(torch.randn(16, 2), backbone.schedule.snap(torch.rand(16) * 1000), cond)
    assert out.shape == (16, 2) and out.dtype == torch.float32
    fitted = backbone.initial_weights()
    assert isinstance(fitted, ToyMLP) and backbone.initial_weights() is fitted
    labels = backbone.evaluation_conditions(1000)
    noise = torch.randn(1000, 2, generator=g)
    samples = rollout(backbone.teacher, noise, labels, uniform_grid(1000, 50), backbone.schedule,
                      backbone.prediction)
    metrics, floors = backbone.metrics(samples, labels), backbone.floor_metrics(1000)
    assert metrics["mode_coverage"] == 1.0 and metrics["in_mode_fraction"] > 0.97
    assert metrics["nll"] < floors["nll"] + 0.2 and metrics["energy_distance"] < 3 * floors["energy_distance"]


def test_mlp_teacher_is_its_own_initial_weights():
    backbone = GMMBackbone(teacher="mlp", fit_steps=5)
    assert isinstance(backbone.teacher, ToyMLP) and backbone.initial_weights() is backbone.teacher
    with pytest.raises(ValueError):
        GMMBackbone(teacher="nope")
