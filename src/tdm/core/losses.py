"""TDM's two objectives as pure functions returning (per-sample loss [B], logs) (method.md C and D).

The caller reduces, weights and calls backward. Nothing here draws random numbers or calls a network.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

IMPORTANCE_WEIGHTS = ("tempered", "off", "clipped")
GENERATOR_LOSSES = ("pseudo_huber", "mse", "pseudo_huber_vector")


def _mean_per_sample(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def importance_weight(mixed_noise: Tensor, noise: Tensor, mode: str = "tempered", clip: float = 20.0) -> Tensor:
    """Per-sample weight turning the trajectory-anchored proposal into the x0-anchored DSM target (method.md C.11).

    tempered: exp(-mean_d(n_mix^2)/2) / exp(-mean_d(z^2)/2), the density ratio q(x_tau|x0)/q(x_tau|x_mid)
    to the power 1/D without its constant (the official code); clipped: the same, capped at `clip`; off: 1.
    """
    if mode == "off":
        return torch.ones(noise.shape[0], device=noise.device)
    if mode not in IMPORTANCE_WEIGHTS:
        raise ValueError(f"importance weight must be one of {IMPORTANCE_WEIGHTS}, got {mode!r}")
    log_w = -0.5 * _mean_per_sample(mixed_noise.float() ** 2) + 0.5 * _mean_per_sample(noise.float() ** 2)
    w = log_w.exp()
    return w.clamp(max=clip) if mode == "clipped" else w


def fake_score_loss(fake_x0: Tensor, student_x0: Tensor, snr: Tensor, weight: Tensor,
                    snr_clamp: float = 5.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Denoising score matching of the fake score on diffused student trajectory samples (method.md C.12).

    L = min(SNR(tau), snr_clamp) * w * mean_d (x0_fake - x0_student)^2, the target being the student's
    clean prediction at the sampled step. `snr_clamp = inf` turns the Min-SNR clamp off.
    """
    mse = _mean_per_sample((fake_x0.float() - student_x0.float().detach()) ** 2)
    lam = snr.float().clamp(max=snr_clamp)
    loss = lam * weight.detach() * mse
    return loss, {"fake/mse": mse.detach().mean(), "fake/importance_weight": weight.detach().mean()}


def generator_loss(student_x0: Tensor, teacher_x0: Tensor, fake_x0: Tensor, kind: str = "pseudo_huber",
                   huber_c: float = 1e-3) -> tuple[Tensor, dict[str, Tensor]]:
    """Regress the student's x0 onto sg(x0) + (teacher_cfg_x0 - fake_x0) (method.md D.5-D.7, paper Eq. 6-7).

    The gradient is the distribution-matching direction (fake - teacher) pushed through dx0/dtheta.
    pseudo_huber: per element, sqrt(d^2 + c^2) - c, divided by the per-sample normaliser
                  omega = mean|x0 - teacher_x0| (the official code, c = 1e-3);
    mse:          d^2 / omega;
    pseudo_huber_vector: the paper's whole-vector form sqrt(||d||^2 + c^2) - c with c = 0.00054 sqrt(dim).
    """
    if kind not in GENERATOR_LOSSES:
        raise ValueError(f"generator loss must be one of {GENERATOR_LOSSES}, got {kind!r}")
    x0 = student_x0.float()
    # d = x0 - sg(x0 + teacher - fake), written so that its value is exactly fake - teacher
    d = (x0 - x0.detach()) + (fake_x0.float() - teacher_x0.float()).detach()
    omega = _mean_per_sample((x0.detach().double() - teacher_x0.double()).abs()).clamp_min(1e-12).float()
    if kind == "pseudo_huber":
        loss = _mean_per_sample((d**2 + huber_c**2).sqrt() - huber_c) / omega
    elif kind == "mse":
        loss = _mean_per_sample(d**2) / omega
    else:
        c = 0.00054 * math.sqrt(d[0].numel())
        loss = (d.flatten(1).pow(2).sum(1) + c**2).sqrt() - c
    gap = _mean_per_sample((teacher_x0.float() - fake_x0.float()) ** 2).sqrt()
    return loss, {"generator/omega": omega.mean(), "generator/teacher_fake_gap": gap.mean(),
                  "student/x0_mean": x0.detach().mean(), "student/x0_std": x0.detach().std()}
