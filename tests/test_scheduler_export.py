"""TDMScheduler against tdm's own rollout, export of a student, and THE round trip: tdm's rollout of a LoRA
student equals the stock diffusers pipeline with the exported LoRA and TDMScheduler, for every family."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tdm.backbones.diffusers_schedule import schedule_from_config  # noqa: E402
from tdm.core.algorithm import TDMConfig, make_grid  # noqa: E402
from tdm.core.sampling import rollout  # noqa: E402
from tdm.scheduler import TDMScheduler  # noqa: E402

# ---------------------------------------------------------------- the scheduler alone, on a closed-form model

TEACHER_SCHEDULERS = {
    "vp-eps": lambda: diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "vp-v-zero-snr": lambda: diffusers.CogVideoXDDIMScheduler(rescale_betas_zero_snr=True,
                                                              prediction_type="v_prediction"),
    "flow-shift3": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
}


def toy_model(x, t, cond):
    """A fixed nonlinear function of (x, t), standing in for a network."""
    return torch.tanh(0.7 * x + 1e-3 * t.float().reshape(-1, *[1] * (x.ndim - 1))) + 0.1 * cond


def scheduler_loop(scheduler, noise, cond, K, tdm_time):
    """What every stock pipeline does with a scheduler (guidance 1), the network seeing `timesteps`."""
    scheduler.set_timesteps(K)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(toy_model(scheduler.scale_model_input(x, t), tdm_time[i].expand(len(x)), cond), t, x,
                           return_dict=False)[0]
    return x


@pytest.mark.parametrize("teacher", TEACHER_SCHEDULERS)
@pytest.mark.parametrize("tdm_config, K", [(TDMConfig(num_steps=4, total_steps=900), 4),
                                           (TDMConfig(num_steps=4, total_steps=900), 2),
                                           (TDMConfig(num_steps=3, timesteps=(999, 700, 300)), 3)])
def test_scheduler_reproduces_rollout(teacher, tdm_config, K, tmp_path):
    teacher_scheduler = TEACHER_SCHEDULERS[teacher]()
    trained_grid = make_grid(tdm_config, schedule_from_config(teacher_scheduler)[0])
    scheduler = TDMScheduler.for_student(teacher_scheduler, trained_grid, total_steps=tdm_config.total_steps)
    scheduler.save_config(tmp_path)  # and back, as a user loads it
    scheduler = TDMScheduler.from_pretrained(tmp_path)
    schedule, prediction = scheduler.schedule, scheduler.prediction
    grid = make_grid(tdm_config, schedule, K)
    noise, cond = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.randn(3, 1, 1, 1)
    expected = rollout(toy_model, noise, cond, grid, schedule, prediction)
    scheduler.set_timesteps(K)
    tdm_time = scheduler.levels  # the network's own time axis (the adapters map flow timesteps back)
    assert torch.equal(scheduler_loop(scheduler, noise, cond, K, tdm_time), expected)
    if schedule.discrete:
        assert scheduler.timesteps.tolist() == [int(t) for t in grid.timesteps]
    else:
        torch.testing.assert_close(scheduler.timesteps, schedule.sigma(torch.tensor(grid.timesteps)) * 1000)
