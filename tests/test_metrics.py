"""Frechet and energy distances against closed forms and a direct reference computation."""

import numpy as np
import pytest
import torch
from scipy import linalg

from tdm.metrics import energy_distance, frechet_distance, frechet_distance_from_stats


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the standard deviations.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    got = frechet_distance_from_stats(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert got == pytest.approx(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum(), rel=1e-9)


def test_frechet_distance_of_samples_matches_a_direct_scipy_computation():
    g = np.random.default_rng(0)
    a = g.normal(size=(500, 4)) @ g.normal(size=(4, 4))
    b = g.normal(size=(600, 4)) + 0.5
    mu1, mu2, c1, c2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def _sqrtm_frechet_distance(mu1, c1, mu2, c2) -> float:
    """The Frechet distance as tdm computed it before the eigenvalue form (and pytorch-fid does): sqrtm of C1 C2,
    regularised if not finite."""
    covmean = linalg.sqrtm(c1 @ c2)
    if not np.isfinite(covmean).all():
        offset = np.eye(c1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((c1 + offset) @ (c2 + offset))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("n, d", [(2000, 256), (100, 64)])  # full rank, and fewer samples than dimensions
def test_frechet_distance_eigenvalue_form_equals_the_sqrtm_form(n, d):
    g = np.random.default_rng(1)
    a = np.maximum(g.normal(size=(n, d)) @ g.normal(size=(d, d)) / np.sqrt(d), 0)  # ReLU-like, as pool features
    b = np.maximum(g.normal(size=(n, d)) @ g.normal(size=(d, d)) / np.sqrt(d) + 0.1, 0)
    stats = [x for f in (a, b) for x in (f.mean(0), np.cov(f, rowvar=False))]
    assert frechet_distance(a, b) == pytest.approx(_sqrtm_frechet_distance(*stats), rel=1e-6)


def test_energy_distance_is_zero_on_identical_sets_and_grows_with_a_shift():
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    near, far = energy_distance(x, x + 0.1), energy_distance(x, x + 1.0)
    assert 0 < near < far
