"""Sample-set distances used by the toys and evaluation: Frechet distance and energy distance."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from torch import Tensor


def gaussian_fit(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a [N, D] feature set, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), the Frechet distance of two Gaussians."""
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as the reference FID code does
        offset = np.eye(cov1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussian fits of two feature sets (the FID formula on any features)."""
    return frechet_distance_from_stats(*gaussian_fit(features_a), *gaussian_fit(features_b))


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two sample sets [N, D] (V-statistic)."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
