"""TDM-R1's reward objectives as pure functions (docs/reward.md Part 1: eqs. A, S3, S5, G3).

Nothing here draws random numbers or calls a network: the caller passes rewards, group ids, noise and the networks'
outputs, reduces the per-sample losses and calls backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedules import Schedule, append_dims

ADVANTAGE_STDS = ("global", "group")


def _mean_per_sample(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def _group_means(values: Tensor, group: Tensor) -> Tensor:
    """Per sample, the mean of `values` over its group (`group`: integer ids [B], any order)."""
    ids, index = torch.unique(group, return_inverse=True)
    sums = torch.zeros(len(ids), dtype=values.dtype, device=values.device).index_add_(0, index, values)
    counts = torch.zeros(len(ids), dtype=values.dtype, device=values.device).index_add_(0, index,
                                                                                         torch.ones_like(values))
    return (sums / counts)[index]


def group_advantages(rewards: Tensor, group: Tensor, std: str = "global", clip: float = 5.0,
                     eps: float = 1e-4, global_std: Tensor | None = None) -> Tensor:
    """Eq. (A): A_i = clip((r_i - mean of i's group) / (std + eps), -clip, clip).

    std: "global", the population std of all rewards (`global_std` when given: the std over every rank's
    rewards), or "group", that of i's group. A group whose rewards are all equal gets zero advantages."""
    if std not in ADVANTAGE_STDS:
        raise ValueError(f"advantage std must be one of {ADVANTAGE_STDS}, got {std!r}")
    r = rewards.double()
    centred = r - _group_means(r, group)
    if std == "group":
        scale = _group_means(centred**2, group).sqrt()
    else:
        scale = global_std.double() if global_std is not None else r.std(unbiased=False)
    return (centred / (scale + eps)).clamp(-clip, clip).float()


def conditional_score_target(x_from: Tensor, t_from: Tensor, tau: Tensor, z: Tensor,
                             schedule: Schedule) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. (S3), schedule-generic: x_tau ~ q(x_tau | x_from) = N(a x_from, b^2 I) with noise z, and the (x0, eps)
    whose eps is the conditional score's: eps* = sigma_tau z / b, so that -eps*/sigma_tau = -z/b = grad log q, and
    x0* = (x_tau - sigma_tau eps*) / alpha_tau. Returns (x_tau, x0*, eps*). For a clean x_from (t_from = 0 on a
    schedule with alpha(0) = 1) x0* = x_from: plain denoising score matching."""
    a, b = (append_dims(c, x_from.ndim) for c in schedule.transition_coefficients(t_from, tau))
    alpha, sigma = (append_dims(c(tau).float(), x_from.ndim) for c in (schedule.alpha, schedule.sigma))
    x_tau = a * x_from + b * z
    eps = sigma * z / b
    return x_tau, (x_tau - sigma * eps) / alpha, eps


def trust_region_mask(dsm: Tensor, dsm_anchor: Tensor, advantages: Tensor, eps: float) -> Tensor:
    """Where the surrogate's loss stops its gradient (docs/reward.md 1.4): its likelihood ratio to an anchor,
    exp(dsm_anchor - dsm), already above 1 + eps for A > 0, or below 1 - eps for A < 0."""
    ratio = (dsm_anchor.double() - dsm.detach().double()).exp()
    return ((advantages > 0) & (ratio > 1 + eps)) | ((advantages < 0) & (ratio < 1 - eps))


def group_preference_loss(dsm: Tensor, dsm_ref: Tensor, advantages: Tensor, group: Tensor, beta_dpo: float = 1.0,
                          frozen: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. (S5): the group Bradley-Terry loss of DGPO, as per-sample losses whose mean has the gradient of
    mean over groups of -log sigmoid(-u_g), u_g = (beta_dpo / G) sum_{i in g} A_i (dsm_i - dsm_ref_i).

    `dsm`: the surrogate's per-sample denoising loss (with gradient), `dsm_ref` the reference's (the base, no
    gradient). Lowering dsm_i relative to dsm_ref_i raises sample i's implicit reward, so the loss pushes it down
    where A_i > 0 and up where A_i < 0, weighted by sigmoid(u_g): how wrong the group's ranking still is.
    `frozen` [B] (trust_region_mask): samples whose dsm carries no gradient. Groups must be whole in the batch."""
    delta = dsm - dsm_ref.detach()
    u = beta_dpo * _group_means(advantages.double() * delta.detach().double(), group)  # u_g per sample
    live = dsm if frozen is None else torch.where(frozen, dsm.detach(), dsm)
    loss = torch.sigmoid(u).float().detach() * beta_dpo * advantages * (live - dsm_ref.detach())
    bt = -torch.nn.functional.logsigmoid(-u)
    return loss, {"reward_model/bradley_terry": bt.mean().float(), "reward_model/implicit_reward_gap":
                  (-(advantages.sign() * delta.detach())).mean(),
                  "reward_model/frozen": (frozen.float().mean() if frozen is not None else torch.zeros(()))}


def reward_generator_loss(student_x0: Tensor, surrogate_x0: Tensor,
                          reference_x0: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The Delta_R term of eq. (G3): regress the student's x0 onto sg(x0 + surrogate_x0 - reference_x0), divided by
    the per-sample normaliser omega_R = mean_d |x0 - surrogate_x0|. Its gradient moves x0 along the surrogate's
    reward direction, which is proportional to grad_x log(p_surrogate / p_reference) at the diffused level."""
    x0 = student_x0.float()
    d = (x0 - x0.detach()) + (reference_x0.float() - surrogate_x0.float()).detach()
    omega = _mean_per_sample((x0.detach().double() - surrogate_x0.double()).abs()).clamp_min(1e-12).float()
    loss = _mean_per_sample(d**2) / omega
    return loss, {"generator/reward_direction": _mean_per_sample(d.detach() ** 2).sqrt().mean(),
                  "generator/omega_reward": omega.mean()}
