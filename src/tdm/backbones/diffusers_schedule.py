"""A tdm `Schedule` and `PredictionType` from a diffusers scheduler config (method.md Decisions 1-2).

Only the config is read, never a scheduler object (diffusers schedulers mutate themselves while sampling).
VP configs (DDPM, DDIM, Euler, DPM-Solver, PNDM, UniPC, CogVideoX-DDIM/DPM, ...) give `DiscreteVP` from their
betas; flow-matching configs (FlowMatchEuler/Heun, DPM-Solver with `use_flow_sigmas`) give `FlowMatch(shift)`.
Keys that only shape the inference sampler (timestep_spacing, steps_offset, solver order, karras sigmas,
clipping, ...) do not change the training noise process and are ignored. Keys that would change it in a way
tdm cannot express raise a `ConfigError` naming the key.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import torch

from ..core.prediction import PredictionType, terminal_x0_undefined
from ..core.schedules import DiscreteVP, FlowMatch, Schedule, beta_table, rescale_zero_terminal_snr
from ..errors import ConfigError

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = {"epsilon": PredictionType.EPSILON, "v_prediction": PredictionType.V_PREDICTION,
               "sample": PredictionType.SAMPLE, "flow_prediction": PredictionType.FLOW}


def full_config(config) -> dict:
    """A scheduler config as a plain dict with its diffusers class's defaults filled in for keys it leaves out.

    `config` is a config dict (as in scheduler_config.json, with `_class_name`) or a scheduler object, whose
    class name and config are read."""
    if not isinstance(config, Mapping):
        config = {"_class_name": type(config).__name__, **config.config}
    name = config.get("_class_name")
    defaults = {}
    if name:
        import diffusers

        cls = getattr(diffusers, name, None)
        if cls is not None:
            defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                        if p.default is not inspect.Parameter.empty}
    return {**defaults, **config}


def _get(config: dict, key: str):
    if key not in config:
        raise ConfigError(f"scheduler config: missing key {key!r} (class {config.get('_class_name', '?')})")
    return config[key]


def _reject(config: dict, key: str, why: str) -> None:
    if config.get(key):
        raise ConfigError(f"scheduler config: {key}={config[key]!r} is not supported: {why}")


def _vp_alphas_cumprod(config: dict) -> torch.Tensor:
    """alphas_cumprod in float64, as diffusers builds it (betas -> cumprod -> SNR shift -> zero-SNR rescale)."""
    T = int(_get(config, "num_train_timesteps"))
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        if betas.shape != (T,):
            raise ConfigError(f"scheduler config: trained_betas has {betas.numel()} entries, expected "
                              f"num_train_timesteps = {T}")
    else:
        kind = _get(config, "beta_schedule")
        if kind not in BETA_SCHEDULES:
            raise ConfigError(f"scheduler config: beta_schedule must be one of {list(BETA_SCHEDULES)}, got {kind!r}")
        betas = beta_table(kind, T, float(_get(config, "beta_start")), float(_get(config, "beta_end")))
    acp = torch.cumprod(1 - betas, 0)
    shift = float(config.get("snr_shift_scale", 1.0))  # CogVideoX: SNR / snr_shift_scale, "following SD3"
    acp = acp / (shift + (1 - shift) * acp)
    return rescale_zero_terminal_snr(acp) if config.get("rescale_betas_zero_snr") else acp


def is_flow(config) -> bool:
    """Whether a (full) scheduler config describes a flow-matching teacher."""
    return config.get("_class_name") in FLOW_SCHEDULERS or bool(config.get("use_flow_sigmas"))


def fixed_shift_config(config: Mapping, mu: float) -> dict:
    """A FlowMatchEulerDiscreteScheduler config whose resolution-dependent shift (`use_dynamic_shifting`) is fixed
    at `mu`, the value a pipeline computes for its sample size (FLUX): sigma = e^mu / (e^mu + 1 / u - 1) is the fixed
    shift s u / (1 + (s - 1) u) with s = e^mu (s = mu for time_shift_type='linear')."""
    shift = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
    return {**config, "shift": shift, "use_dynamic_shifting": False}


def resolved_scheduler(scheduler, image_seq_len: int):
    """The scheduler as a dynamic-shift pipeline (FluxPipeline, ZImagePipeline, QwenImagePipeline) uses it for
    `image_seq_len` latent patches: a `use_dynamic_shifting` config fixed at the mu of the pipelines'
    `calculate_shift`; a fixed-shift config is returned as is (the pipeline's mu does not reach it)."""
    config = scheduler.config
    if not config.get("use_dynamic_shifting"):
        return scheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # the one the others copy

    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    return type(scheduler).from_config(fixed_shift_config(config, mu))


def schedule_from_config(config, kind: str | None = None) -> tuple[Schedule, PredictionType]:
    """The teacher's noise schedule and output parameterisation from a diffusers scheduler config (a dict or
    a scheduler object, see `full_config`). `kind` ("vp" or "flow") overrides the detection by `is_flow`."""
    config = full_config(config)
    if kind is None:
        kind = "flow" if is_flow(config) else "vp"
    if kind not in ("vp", "flow"):
        raise ConfigError(f"scheduler config: schedule kind must be vp or flow, got {kind!r}")
    _reject(config, "use_dynamic_shifting", "a resolution-dependent shift (mu) has no fixed time axis; "
                                            "set use_dynamic_shifting=false and a fixed shift")
    _reject(config, "invert_sigmas", "tdm's time axis runs from data (t = 0) to noise (t = T)")
    T = int(_get(config, "num_train_timesteps"))
    if kind == "flow":
        if config.get("use_flow_sigmas"):  # DPM-Solver style flow config (e.g. Sana): flow_shift
            shift = float(_get(config, "flow_shift"))
        else:
            shift = float(config.get("shift", 1.0))
        prediction = config.get("prediction_type", "flow_prediction")
        if prediction != "flow_prediction":
            raise ConfigError(f"scheduler config: prediction_type must be flow_prediction for a flow-matching "
                              f"schedule, got {prediction!r}")
        if shift <= 0:
            raise ConfigError(f"scheduler config: shift must be > 0, got {shift}")
        return FlowMatch(shift=shift, num_train_timesteps=T), PredictionType.FLOW
    prediction = _get(config, "prediction_type")
    if prediction not in PREDICTIONS or prediction == "flow_prediction":
        raise ConfigError(f"scheduler config: prediction_type must be epsilon, v_prediction or sample for a "
                          f"VP schedule, got {prediction!r}")
    schedule = DiscreteVP(_vp_alphas_cumprod(config))
    if terminal_x0_undefined(schedule, PREDICTIONS[prediction]):
        cause = ("rescale_betas_zero_snr=True" if config.get("rescale_betas_zero_snr") else
                 "its betas (alphas_cumprod = 0 at the last step)")
        raise ConfigError(f"scheduler config: prediction_type='epsilon' on a table with zero terminal SNR, from "
                          f"{cause}: x0 = (x_t - sigma eps) / alpha is NaN at t = {schedule.num_train_timesteps - 1}"
                          f"; use prediction_type='v_prediction' (a v-prediction teacher), or a table without "
                          f"zero terminal SNR (rescale_betas_zero_snr=false)")
    return schedule, PREDICTIONS[prediction]
