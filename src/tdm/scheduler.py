"""`TDMScheduler`: the student's K-step rollout as a diffusers scheduler, for stock pipelines (method.md Decision 10).

Inside `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `PixArtAlphaPipeline`, `StableDiffusion3Pipeline`
or `CogVideoXPipeline` at guidance_scale = 1, it reproduces `tdm.core.sampling.rollout` on the grid of
`tdm.core.algorithm.make_grid`: the pipeline's network sees the student's levels t_K > ... > t_1 (flow: the
network timestep sigma(t_k) * T), every step converts the output to (x0, eps) with `tdm.core.prediction` and
takes the deterministic DDIM step of `tdm.core.schedules`; the last step returns x0.

    pipe.scheduler = TDMScheduler.from_config(recipe["tdm_scheduler"])   # recipe.json of a tdm export
    image = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).images[0]

`from_config` accepts what it can honour: a TDMScheduler config (`_class_name` TDMScheduler, or this class's keys
with the student's `timesteps`), also carried through a compatible stock scheduler's config (diffusers keeps the
keys that differ from their defaults). It refuses the config of another scheduler (a teacher's DDPM, Euler,
FlowMatch... has no student grid: the common idiom `TDMScheduler.from_config(pipe.scheduler.config)` would sample
another grid), and a flow-matching config read as VP.
A tdm export writes, by default, a stock scheduler that needs no tdm (`tdm.stock_scheduler`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .backbones.diffusers_pipeline import import_diffusers
from .backbones.diffusers_schedule import full_config, is_flow, schedule_from_config
from .core.algorithm import TDMConfig, make_grid
from .core.prediction import to_x0_eps
from .core.sampling import StudentGrid, explicit_grid
from .core.schedules import append_dims
from .errors import ConfigError

import_diffusers()  # a clear error when the [diffusers] extra is missing
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: E402
from diffusers.utils import BaseOutput  # noqa: E402

VP_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
           "rescale_betas_zero_snr", "snr_shift_scale", "prediction_type")


@dataclass
class TDMSchedulerOutput(BaseOutput):
    prev_sample: Tensor            # the state at the next student level (after the last step: x0)
    pred_original_sample: Tensor   # x0 predicted at this level


class TDMScheduler(SchedulerMixin, ConfigMixin):
    """Deterministic K-step student sampler on the teacher's schedule (VP betas or flow shift).

    `timesteps` is the student's trained grid on tdm's time axis (t in [0, T]); asking for another number of
    steps gives tdm's default grid for that K (uniform with `total_steps` for VP, T k / K for flow)."""

    # the stock schedulers a tdm export writes in its place (tdm.stock_scheduler); made from this config they sample
    # the teacher's own grid, and their config carries this one's keys back (`from_config` round trips)
    _compatibles = ["DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"]
    order = 1
    init_noise_sigma = 1.0  # the rollout starts from pure N(0, I) at t_K

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "vp", beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 rescale_betas_zero_snr: bool = False, snr_shift_scale: float = 1.0, shift: float = 1.0,
                 prediction_type: str = "epsilon", timesteps: list[float] | None = None, total_steps: int = 900):
        self.schedule, self.prediction = schedule_from_config(dict(self.config), kind=schedule)
        if self.schedule.discrete:  # diffusers' VP attributes, read by some pipelines
            self.alphas_cumprod = self.schedule.alphas_cumprod
            self.betas = 1 - self.alphas_cumprod / torch.cat([torch.ones(1), self.alphas_cumprod[:-1]])
        self.grid: StudentGrid | None = None
        self.levels: Tensor | None = None  # the grid on tdm's time axis, snapped as the rollout snaps it
        self.timesteps: Tensor | None = None  # what the network sees at each level
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @classmethod
    def for_student(cls, teacher_scheduler, grid: StudentGrid, total_steps: int = 900) -> TDMScheduler:
        """The scheduler of a student trained on `grid` against a teacher with this diffusers scheduler (an
        object or a config dict): the teacher's schedule parameters plus the student's grid."""
        teacher = full_config(teacher_scheduler)
        if is_flow(teacher):
            schedule = schedule_from_config(teacher)[0]
            params = {"schedule": "flow", "num_train_timesteps": schedule.num_train_timesteps,
                      "shift": schedule.shift, "prediction_type": "flow_prediction"}
        else:
            params = {"schedule": "vp", **{k: teacher[k] for k in VP_KEYS if k in teacher}}
            if params.get("trained_betas") is not None:
                params["trained_betas"] = [float(b) for b in params["trained_betas"]]
        return cls(**params, timesteps=list(grid.timesteps), total_steps=total_steps)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' `from_config`, for the configs this class can honour (module docstring); others raise a
        `ConfigError`."""
        given = {**(config or {}), **kwargs}
        name = given.get("_class_name") or "scheduler"
        if name != cls.__name__ and "timesteps" not in given:
            raise ConfigError(f"TDMScheduler.from_config: a {name} config has no student grid (key 'timesteps'); "
                              f"use the scheduler a tdm export wrote, or recipe.json's tdm_scheduler")
        if is_flow(given) and given.get("schedule", "vp") != "flow":
            raise ConfigError(f"TDMScheduler.from_config: a flow-matching {name} config with schedule="
                              f"{given.get('schedule', 'vp')!r}; expected schedule='flow'")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---- the grid ----
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[float] | None = None, sigmas: list[float] | None = None,
                      mu: float | None = None):
        """The student's grid for K = num_inference_steps (default: the trained K), or an explicit grid:
        `timesteps` as the network sees them (VP: integer levels; flow: sigma * T), or, for a flow schedule,
        `sigmas` before the shift (t / T on tdm's time axis, as FlowMatchEulerDiscreteScheduler takes them).
        `mu`, the resolution shift some pipelines pass (ZImagePipeline, QwenImagePipeline, FluxPipeline,
        Flux2KleinPipeline), is ignored: the config's shift is the teacher's at the training resolution."""
        if timesteps is not None or sigmas is not None:
            self.grid = explicit_grid(self._explicit_levels(timesteps, sigmas))
        else:
            trained = tuple(self.config.timesteps) if self.config.timesteps else None
            K = num_inference_steps or (len(trained) if trained else None)
            if not K:
                raise ValueError("TDMScheduler.set_timesteps: pass num_inference_steps (no trained grid in the "
                                 "config)")
            tdm_config = TDMConfig(num_steps=len(trained) if trained else K, total_steps=self.config.total_steps,
                                   timesteps=trained)
            self.grid = make_grid(tdm_config, self.schedule, K)
        K = self.grid.num_steps
        self.levels = self.schedule.snap(torch.tensor(self.grid.timesteps, dtype=torch.float32))
        model_t = self.levels if self.schedule.discrete else self.schedule.sigma(self.levels) * len(self)
        self.timesteps = model_t.to(device)
        # the noise level of each step and 0 after the last, as diffusers schedulers list them (WanPipeline reads it)
        self.sigmas = torch.cat([self.schedule.sigma(self.levels), torch.zeros(1)]).to(device)
        self.num_inference_steps = K
        self._step_index, self._begin_index = None, None

    def _explicit_levels(self, timesteps, sigmas) -> list[float]:
        """tdm's time axis for explicit network timesteps or (flow) unshifted sigmas."""
        T = len(self)
        if timesteps is not None and sigmas is not None:
            raise ValueError("TDMScheduler.set_timesteps: pass timesteps or sigmas, not both")
        if sigmas is not None:
            if self.schedule.discrete:
                raise ValueError("TDMScheduler.set_timesteps: sigmas apply to a flow schedule; a VP schedule takes "
                                 "timesteps (integer levels)")
            return [float(s) * T for s in sigmas]
        levels = [float(t) for t in timesteps]
        if self.schedule.discrete:
            if any(t != int(t) or not 0 <= t < T for t in levels):
                raise ValueError(f"TDMScheduler.set_timesteps: VP timesteps must be integers in [0, {T}), got "
                                 f"{levels}")
            return levels
        shift = self.schedule.shift  # invert sigma = shift(u) = s u / (1 + (s - 1) u)
        return [T * (t / T) / (shift - (shift - 1) * (t / T)) for t in levels]

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: Tensor | float) -> int:
        matches = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"TDMScheduler: timestep {timestep} is not on the student grid {self.timesteps.tolist()}")
        return int(matches[0])

    def scale_model_input(self, sample: Tensor, timestep: Tensor | float | None = None) -> Tensor:
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The forward process at network timesteps (img2img, inpainting): alpha x0 + sigma noise."""
        t = torch.as_tensor(timesteps, device=original_samples.device).reshape(-1)
        if self.schedule.discrete:
            alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        else:
            sigma = t.float() / len(self)  # the network's flow timestep is sigma * T
            alpha = 1 - sigma
        alpha, sigma = (append_dims(v.to(original_samples), original_samples.ndim) for v in (alpha, sigma))
        return alpha * original_samples + sigma * noise

    def scale_noise(self, sample: Tensor, timestep: Tensor, noise: Tensor) -> Tensor:
        """FlowMatchEulerDiscreteScheduler's name for `add_noise` (SD3's img2img and inpainting pipelines)."""
        return self.add_noise(sample, noise, timestep)

    # ---- one student step ----
    def step(self, model_output: Tensor, timestep: Tensor | float, sample: Tensor,
             return_dict: bool = True) -> TDMSchedulerOutput | tuple[Tensor, Tensor]:
        """(x0, eps) from the network output at the current level, then the DDIM step to the next level
        (the rollout's update, method.md B); the last level returns x0."""
        if self.levels is None:
            raise ValueError("TDMScheduler.step: call set_timesteps first")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(
                timestep)
        i, batch = self._step_index, sample.shape[0]
        t = self.levels[i].to(sample.device).expand(batch)
        x0, eps = to_x0_eps(model_output, sample, t, self.schedule, self.prediction)
        if i + 1 < len(self.levels):
            prev = self.schedule.ddim_step(x0, eps, self.levels[i + 1].to(sample.device).expand(batch))
        else:
            prev = x0
        self._step_index += 1
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        return TDMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)
