"""Sample-set distances used by the toys and evaluation: Frechet distance, kernel (inception) distance and
energy distance. Each takes two feature sets [N, D]; which network made the features is the caller's business."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def gaussian_fit(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a [N, D] feature set, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative rounding noise in its
    eigenvalues clipped to 0)."""
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), the Frechet distance of two Gaussians.

    Tr (C1 C2)^(1/2) is the sum of the square roots of the eigenvalues of S C2 S with S = C1^(1/2): C1 C2 is
    similar to that symmetric positive semi-definite matrix, whose eigenvalues `eigvalsh` finds stably and real
    (no complex parts to drop, unlike the general eigenvalues of C1 C2), and at 2048 dimensions about 5x faster
    than `scipy.linalg.sqrtm` (same value to 1e-6 relative)."""
    root = _psd_sqrt(np.asarray(cov1, dtype=np.float64))
    eigenvalues = np.linalg.eigvalsh(root @ np.asarray(cov2, dtype=np.float64) @ root)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussian fits of two feature sets (the FID formula on any features)."""
    return frechet_distance_from_stats(*gaussian_fit(features_a), *gaussian_fit(features_b))


@dataclass(frozen=True)
class KernelDistance:
    """KID: the mean and standard deviation of the unbiased MMD^2 over `num_subsets` random subsets."""

    mean: float
    std: float
    subset_size: int
    num_subsets: int


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(a, b) = (a.b / D + 1)^3 for all pairs of rows: [m, D] x [n, D] -> [m, n] (Binkowski et al. 2018)."""
    k = x @ y.T / x.shape[1] + 1
    return k * k * k


def mmd2_from_kernels(k_xx: Tensor, k_yy: Tensor, k_xy: Tensor) -> float:
    """Unbiased MMD^2 of two equal-size sets from their kernel matrices: the off-diagonal means of k(x, x')
    and k(y, y') minus twice the mean of k(x, y)."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def polynomial_mmd2(x, y) -> float:
    """Unbiased MMD^2 of two equal-size feature sets [m, D] under `polynomial_kernel`."""
    x, y = (torch.as_tensor(np.asarray(f), dtype=torch.float64) for f in (x, y))
    return mmd2_from_kernels(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))


GRAM_LIMIT = 8192  # up to this many features in both sets, kernel matrices are computed once (<= 0.5 GB)


def kernel_distance(features_a, features_b, num_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> KernelDistance:
    """Kernel (inception) distance, as torch-fidelity and clean-fid compute it: `polynomial_mmd2` on
    `num_subsets` pairs of subsets of min(subset_size, N_a, N_b) features drawn without replacement.

    Unbiased: its expectation is 0 for two independent sets from one distribution, so small values may be
    negative. (Two identical sets score slightly below 0: the cross term pairs shared points with themselves.)"""
    a, b = (torch.as_tensor(np.asarray(f), dtype=torch.float64) for f in (features_a, features_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(a)} and {len(b)}")
    if len(a) + len(b) <= GRAM_LIMIT:  # all pairs once, then every subset is a lookup
        k_aa, k_bb, k_ab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)

        def kernels(i, j):
            return k_aa[i[:, None], i], k_bb[j[:, None], j], k_ab[i[:, None], j]
    else:
        def kernels(i, j):
            return polynomial_kernel(a[i], a[i]), polynomial_kernel(b[j], b[j]), polynomial_kernel(a[i], b[j])
    rng = np.random.default_rng(seed)
    values = [mmd2_from_kernels(*kernels(torch.from_numpy(np.sort(rng.choice(len(a), m, replace=False))),
                                         torch.from_numpy(np.sort(rng.choice(len(b), m, replace=False)))))
              for _ in range(num_subsets)]  # sorted indices: the same subsets, faster lookups
    return KernelDistance(float(np.mean(values)), float(np.std(values)), m, num_subsets)


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two sample sets [N, D] (V-statistic)."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
