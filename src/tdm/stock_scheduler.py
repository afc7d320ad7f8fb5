"""The stock diffusers scheduler that replays a student's rollout, so an export samples with diffusers alone.

tdm's rollout (`tdm.core.sampling.rollout`) takes deterministic DDIM steps between the levels of the student's grid
and returns x0 after the last one. Per schedule, the stock scheduler whose arithmetic is that update:
  flow (SD3):  FlowMatchEulerDiscreteScheduler with the teacher's shift and explicit `sigmas` t_k / T, which it
               shifts as `tdm.core.schedules.FlowMatch` does; its Euler step x + (sigma' - sigma) v is the DDIM
               step of a flow, and its last step (to sigma = 0) returns x0.
  VP, a grid DDIM spaces itself (t_k = k T' / K - 1, steps of T' / K; the default 900-step grid is one, T' = 900):
               DDIMScheduler with timestep_spacing="trailing" on the teacher's table cut to T' entries (its betas
               where the teacher's own keys cannot say it: a cut, an SNR shift, a zero-SNR rescale); only
               `num_inference_steps` goes to the pipeline.
  VP, any other grid (e.g. CogVideoX's 999, 856, 665, 399) where every level has alpha > 0:
               EulerDiscreteScheduler with explicit `timesteps`: Euler on sigma = sqrt((1 - acp) / acp) of the
               scaled state is the DDIM step, and "leading" spacing makes init_noise_sigma sqrt(sigma_K^2 + 1),
               the scale of a pure-noise start.
A VP grid that is neither (a level with alpha = 0, zero terminal SNR, outside a DDIM-spaced grid) has no stock
scheduler that lands on x0 = -v exactly there (Euler clamps that alpha to 2^-12); `stock_sampling` returns None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbones.diffusers_schedule import full_config
from .core.sampling import StudentGrid
from .core.schedules import DiscreteVP, FlowMatch, Schedule


@dataclass(frozen=True)
class StockSampling:
    """A stock scheduler's config (with `_class_name`) and the `pipe(...)` arguments that make it replay a grid."""

    config: dict
    pipeline_kwargs: dict  # `timesteps` or `sigmas` where the grid needs them (beside num_inference_steps = K)

    @property
    def class_name(self) -> str:
        return self.config["_class_name"]


def _ddim_spacing(grid: StudentGrid, T: int) -> int | None:
    """The T' <= T on which DDIM's trailing spacing gives exactly this grid (steps of T' // K ending at
    T' // K - 1, so the last step lands on alpha = 1), or None."""
    K, top = grid.num_steps, grid.timesteps[0]
    total = int(top) + 1
    if total > T or total % K:
        return None
    stride = total // K
    return total if list(grid.timesteps) == [float(k * stride - 1) for k in range(K, 0, -1)] else None


def _betas(schedule: DiscreteVP, length: int) -> list[float]:
    """The betas whose cumulative product is the schedule's table, cut to its first `length` entries."""
    acp = schedule.alphas_cumprod.double()[:length]
    previous = torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
    return (1 - acp / previous).tolist()


def _vp_table(teacher: dict, schedule: DiscreteVP, length: int) -> dict:
    """Config keys that rebuild the teacher's alphas_cumprod (cut to `length`) in DDIM or Euler: the teacher's
    own beta keys where they suffice, else the betas themselves (after any SNR shift and zero-SNR rescale)."""
    own = length == schedule.num_train_timesteps and not teacher.get("rescale_betas_zero_snr") and \
        float(teacher.get("snr_shift_scale", 1.0)) == 1.0
    if own:
        keys = ("beta_start", "beta_end", "beta_schedule", "trained_betas")
        return {k: teacher[k] for k in keys if teacher.get(k) is not None}
    return {"trained_betas": _betas(schedule, length), "rescale_betas_zero_snr": False}


def stock_sampling(teacher_scheduler, schedule: Schedule, prediction_type: str,
                   grid: StudentGrid) -> StockSampling | None:
    """The stock scheduler and pipeline arguments that replay `grid` on the teacher's `schedule` (see the module
    docstring), or None where no stock scheduler is exact. `teacher_scheduler`: the teacher's diffusers
    scheduler or config."""
    T = schedule.num_train_timesteps
    if isinstance(schedule, FlowMatch):
        config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": T,
                  "shift": schedule.shift, "use_dynamic_shifting": False}
        return StockSampling(config, {"sigmas": [t / T for t in grid.timesteps]})
    teacher = full_config(teacher_scheduler)
    common = {"num_train_timesteps": T, "prediction_type": prediction_type}
    spacing = _ddim_spacing(grid, T)
    if spacing is not None:
        config = {"_class_name": "DDIMScheduler", **common, "num_train_timesteps": spacing,
                  **_vp_table(teacher, schedule, spacing), "timestep_spacing": "trailing", "steps_offset": 0,
                  "set_alpha_to_one": True, "clip_sample": False, "thresholding": False}
        return StockSampling(config, {})
    levels = torch.tensor(grid.timesteps).floor().long()
    if bool((schedule.alpha(levels) == 0).any()):
        return None
    config = {"_class_name": "EulerDiscreteScheduler", **common, **_vp_table(teacher, schedule, T),
              "timestep_spacing": "leading", "final_sigmas_type": "zero", "interpolation_type": "linear",
              "use_karras_sigmas": False, "steps_offset": 0}
    return StockSampling(config, {"timesteps": levels.tolist()})
