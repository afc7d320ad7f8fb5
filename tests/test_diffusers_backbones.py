"""Diffusers teachers: schedules from scheduler configs, and each family's adapter on a tiny real pipeline."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tdm.backbones.diffusers_schedule import schedule_from_config  # noqa: E402
from tdm.config import ConfigError  # noqa: E402
from tdm.core.prediction import PredictionType  # noqa: E402

# ---------------------------------------------------------------- schedules from diffusers configs

VP_SCHEDULERS = {
    "ddpm-scaled-linear": lambda: diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012),
    "ddim-zero-snr-v": lambda: diffusers.DDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                                                       prediction_type="v_prediction"),
    "euler": lambda: diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.012),
    "pndm-cosine": lambda: diffusers.PNDMScheduler(beta_schedule="squaredcos_cap_v2"),
    "dpm-trained-betas": lambda: diffusers.DPMSolverMultistepScheduler(
        trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist(), prediction_type="sample"),
    "cogvideox-ddim": lambda: diffusers.CogVideoXDDIMScheduler(snr_shift_scale=3.0, rescale_betas_zero_snr=True,
                                                               prediction_type="v_prediction"),
}


@pytest.mark.parametrize("name", VP_SCHEDULERS)
def test_vp_schedule_matches_diffusers_alphas_cumprod(name):
    scheduler = VP_SCHEDULERS[name]()
    schedule, prediction = schedule_from_config(scheduler)
    assert prediction.value == scheduler.config.prediction_type
    assert torch.allclose(schedule.alphas_cumprod.double(), scheduler.alphas_cumprod.double(), atol=1e-6, rtol=0)


def test_vp_schedule_from_json_dict_uses_class_defaults(tmp_path):
    """A scheduler_config.json that leaves keys out gets its class's defaults (CogVideoX: scaled_linear, 3.0)."""
    reference = diffusers.CogVideoXDDIMScheduler(rescale_betas_zero_snr=True)
    schedule, _ = schedule_from_config({"_class_name": "CogVideoXDDIMScheduler", "rescale_betas_zero_snr": True})
    assert torch.allclose(schedule.alphas_cumprod.double(), reference.alphas_cumprod.double(), atol=1e-6, rtol=0)


def test_flow_schedule_matches_diffusers_sigmas():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule, prediction = schedule_from_config(scheduler)
    assert prediction is PredictionType.FLOW and schedule.shift == 3.0
    t = torch.arange(1000, 0, -1).float()  # the scheduler's training timesteps, pre-shift
    assert torch.allclose(schedule.sigma(t), scheduler.sigmas, atol=1e-6, rtol=0)
    dpm = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=6.0, prediction_type="flow_prediction")
    assert schedule_from_config(dpm)[0].shift == 6.0


@pytest.mark.parametrize("config, key", [
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, "invert_sigmas"),
    ({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"_class_name": "DDPMScheduler", "prediction_type": "flow_prediction"}, "prediction_type"),
    ({"_class_name": "DDPMScheduler", "trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"beta_schedule": "linear"}, "num_train_timesteps"),
])
def test_unsupported_scheduler_config_names_the_key(config, key):
    with pytest.raises(ConfigError, match=key):
        schedule_from_config(config)
