"""Conversions between a network's raw output and (x0, eps), for every prediction type (method.md, Decision 2).

With x_t = a x0 + s eps (a = alpha(t), s = sigma(t)):
  epsilon       output = eps
  sample        output = x0
  v_prediction  output = a eps - s x0                  (Salimans & Ho; VP schedules)
  flow          output = eps - x0                      (rectified-flow velocity; method.md A.3)
The inverses below are written for general (a, s), so they hold on any schedule. Math runs in float64
(division by a small alpha) and returns float32.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from .schedules import Schedule, append_dims


class PredictionType(str, Enum):
    EPSILON = "epsilon"
    SAMPLE = "sample"
    V_PREDICTION = "v_prediction"
    FLOW = "flow"

    @classmethod
    def parse(cls, value: str | PredictionType) -> PredictionType:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"prediction type must be one of {[p.value for p in cls]}, got {value!r}") from None


def terminal_x0_undefined(schedule: Schedule, prediction: PredictionType) -> bool:
    """Whether x0 = (x_t - sigma eps) / alpha divides by zero at the noisiest level: an epsilon prediction on a
    schedule with zero terminal SNR (alpha = 0 at t = T-1; flow: t = T). The teacher's full-range sampler and
    a grid reaching T-1 would give NaN there; v_prediction, sample and flow stay defined."""
    T = schedule.num_train_timesteps
    top = torch.tensor([float(T - 1 if schedule.discrete else T)])
    return prediction is PredictionType.EPSILON and float(schedule.alpha(top)) == 0.0


def _coefficients(schedule: Schedule, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
    a = append_dims(schedule.alpha(t).double(), ndim)
    s = append_dims(schedule.sigma(t).double(), ndim)
    return a, s


def to_x0_eps(output: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule,
              prediction: PredictionType) -> tuple[Tensor, Tensor]:
    """Raw model output at (x_t, t) -> (x0, eps), both float32."""
    a, s = _coefficients(schedule, t, x_t.ndim)
    o, x = output.double(), x_t.double()
    if prediction is PredictionType.EPSILON:
        eps = o
        x0 = (x - s * eps) / a
    elif prediction is PredictionType.SAMPLE:
        x0 = o
        eps = (x - a * x0) / s
    elif prediction is PredictionType.V_PREDICTION:
        norm = a**2 + s**2
        x0 = (a * x - s * o) / norm
        eps = (s * x + a * o) / norm
    elif prediction is PredictionType.FLOW:
        x0 = (x - s * o) / (a + s)
        eps = x0 + o
    else:
        raise ValueError(f"unknown prediction type {prediction!r}")
    return x0.float(), eps.float()


def to_x0(output: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule, prediction: PredictionType) -> Tensor:
    return to_x0_eps(output, x_t, t, schedule, prediction)[0]


def from_x0_eps(x0: Tensor, eps: Tensor, t: Tensor, schedule: Schedule, prediction: PredictionType) -> Tensor:
    """(x0, eps) -> the raw output a model of this prediction type would give (inverse of `to_x0_eps`)."""
    a, s = _coefficients(schedule, t, x0.ndim)
    x0d, epsd = x0.double(), eps.double()
    if prediction is PredictionType.EPSILON:
        out = epsd
    elif prediction is PredictionType.SAMPLE:
        out = x0d
    elif prediction is PredictionType.V_PREDICTION:
        out = a * epsd - s * x0d
    elif prediction is PredictionType.FLOW:
        out = epsd - x0d
    else:
        raise ValueError(f"unknown prediction type {prediction!r}")
    return out.float()

