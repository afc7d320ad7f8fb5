"""Noise schedules: x_t = alpha(t) * x0 + sigma(t) * eps (TDM paper Sec. 3, method.md A.1 and A.3).

Both schedules are stateless and share one time axis, t in [0, T] with T = `num_train_timesteps`:
`DiscreteVP` uses integer DDPM indices t in {0, ..., T-1}; `FlowMatch` uses continuous t with
sigma = shift(t / T). Tables are computed in float64 and held in float32; no schedule math runs in fp16.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Give a per-sample vector [B] trailing singleton dims so it broadcasts against a [B, ...] tensor."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class Schedule:
    """Shared math of every schedule; subclasses define `alpha`, `sigma`, `num_train_timesteps`, `discrete`."""

    num_train_timesteps: int
    discrete: bool

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def snr(self, t: Tensor) -> Tensor:
        return (self.alpha(t) / self.sigma(t)) ** 2

    def snap(self, t: Tensor) -> Tensor:
        """Map a continuous draw onto the schedule's time axis (floor to an index for discrete schedules)."""
        return t.floor().long() if self.discrete else t

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward marginal q(x_t | x0): alpha(t) x0 + sigma(t) noise."""
        a, s = append_dims(self.alpha(t), x0.ndim), append_dims(self.sigma(t), x0.ndim)
        return a * x0 + s * noise

    def ddim_step(self, x0: Tensor, eps: Tensor, t_next: Tensor) -> Tensor:
        """Deterministic DDIM (eta = 0) update: re-noise the predicted x0 with the predicted eps at t_next."""
        return self.add_noise(x0, eps, t_next)

    def transition_coefficients(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) of the exact Gaussian kernel q(x_t | x_s) = N(a x_s, b^2 I) for t >= s (method.md A.1)."""
        a = self.alpha(t).double() / self.alpha(s).double()
        b2 = self.sigma(t).double() ** 2 - (a * self.sigma(s).double()) ** 2
        return a.float(), b2.clamp_min(0).sqrt().float()

    def transition(self, x_s: Tensor, s: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample q(x_t | x_s): diffuse a less noisy state x_s forward to the noisier level t."""
        a, b = self.transition_coefficients(s, t)
        return append_dims(a, x_s.ndim) * x_s + append_dims(b, x_s.ndim) * noise


def beta_table(kind: str, T: int, beta_start: float, beta_end: float) -> Tensor:
    """DDPM betas [T] in float64 for diffusers' `beta_schedule` names."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":  # cosine schedule (Nichol & Dhariwal), betas capped at 0.999
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    raise ValueError(f"beta_schedule must be linear, scaled_linear or squaredcos_cap_v2, got {kind!r}")


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has SNR 0 (Lin et al. 2024, Alg. 1)."""
    a = alphas_cumprod.double().sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)
    return a**2


class DiscreteVP(Schedule):
    """Variance-preserving DDPM schedule from any `alphas_cumprod` table: alpha = sqrt(acp), sigma = sqrt(1-acp)."""

    discrete = True

    def __init__(self, alphas_cumprod: Tensor):
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if acp.ndim != 1 or not ((acp >= 0) & (acp <= 1)).all():
            raise ValueError("alphas_cumprod must be a 1-D table of values in [0, 1]")
        self.num_train_timesteps = acp.numel()
        self.alphas_cumprod = acp.float()
        self._alpha = acp.sqrt().float()
        self._sigma = (1 - acp).sqrt().float()

    @classmethod
    def from_betas(cls, beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                   beta_start: float = 1e-4, beta_end: float = 0.02, zero_terminal_snr: bool = False):
        acp = torch.cumprod(1 - beta_table(beta_schedule, num_train_timesteps, beta_start, beta_end), 0)
        return cls(rescale_zero_terminal_snr(acp) if zero_terminal_snr else acp)

    def _lookup(self, table: Tensor, t: Tensor) -> Tensor:
        return table.to(t.device)[t.long()]

    def alpha(self, t: Tensor) -> Tensor:
        return self._lookup(self._alpha, t)

    def sigma(self, t: Tensor) -> Tensor:
        return self._lookup(self._sigma, t)


class FlowMatch(Schedule):
    """Rectified flow: sigma = shift(t / T), alpha = 1 - sigma (SD3, Flux; method.md A.3).

    shift(u) = s u / (1 + (s - 1) u) is the timestep shift of SD3; s = 1 is the identity.
    """

    discrete = False

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps

    def sigma(self, t: Tensor) -> Tensor:
        u = t.double() / self.num_train_timesteps
        return (self.shift * u / (1 + (self.shift - 1) * u)).float()

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - self.sigma(t)
