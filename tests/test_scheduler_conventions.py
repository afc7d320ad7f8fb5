"""TDMScheduler against diffusers' scheduler conventions: each check of diffusers' `SchedulerCommonTest`
(tests/schedulers/test_schedulers.py, not shipped in the wheel) performed here on TDMScheduler, for a VP, a
v-prediction zero-SNR and a flow config; then what `from_config` refuses, explicit `timesteps` / `sigmas`, and
`add_noise` against diffusers' own schedulers.

The checks of that file that are not about a scheduler's behaviour are skipped below with their reason."""

import inspect
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tdm.core.sampling import explicit_grid, rollout  # noqa: E402
from tdm.errors import ConfigError  # noqa: E402
from tdm.scheduler import TDMScheduler  # noqa: E402

CONFIGS = {  # a trained grid in each: a config without one is indistinguishable from a teacher's (from_config)
    "vp-eps": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timesteps=[899, 674, 449, 224]),
    "vp-v-zero-snr": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, snr_shift_scale=3.0,
                          rescale_betas_zero_snr=True, prediction_type="v_prediction", timesteps=[999, 856, 665, 399]),
    "flow": dict(schedule="flow", shift=3.0, prediction_type="flow_prediction", timesteps=[1000.0, 500.0]),
}
STEPS = 50  # diffusers' default_num_inference_steps: tdm's uniform grid for K = 50


@pytest.fixture(params=list(CONFIGS))
def config(request):
    return dict(CONFIGS[request.param])


def sample():
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def first_step(scheduler, num_inference_steps=STEPS, **kwargs):
    """One step at the grid's first timestep with residual 0.1 * sample, as the common checks take it."""
    scheduler.set_timesteps(num_inference_steps)
    x = sample()
    return scheduler.step(0.1 * x, scheduler.timesteps[0], x, **kwargs)


@pytest.mark.parametrize("num_inference_steps", [None, 1, 2, STEPS])
def test_save_load_gives_the_same_step(config, num_inference_steps, tmp_path):
    """check_over_configs, check_over_forward, test_from_save_pretrained: save_config -> from_pretrained steps
    the same, at the trained K (None) and others."""
    scheduler = TDMScheduler(**config)
    scheduler.save_config(tmp_path)
    loaded = TDMScheduler.from_pretrained(tmp_path)
    a, b = first_step(scheduler, num_inference_steps), first_step(loaded, num_inference_steps)
    assert torch.equal(a.prev_sample, b.prev_sample)


def test_from_pretrained_keeps_the_config(config, tmp_path):
    scheduler = TDMScheduler(**config)
    scheduler.save_pretrained(tmp_path)
    expected = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    assert dict(TDMScheduler.from_pretrained(tmp_path).config) == expected


def test_compatibles_round_trip(config):
    """test_compatibles: each compatible class builds from this config, and this class from theirs, with the same
    config (diffusers carries the keys that differ from their defaults)."""
    scheduler = TDMScheduler(**config)
    assert scheduler.compatibles and all(c is not None for c in scheduler.compatibles)
    assert {c.__name__ for c in scheduler.compatibles} >= {"DDIMScheduler", "FlowMatchEulerDiscreteScheduler"}
    init_keys = set(inspect.signature(TDMScheduler.__init__).parameters)
    for cls in scheduler.compatibles:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            other = cls.from_config(scheduler.config)
        back = TDMScheduler.from_config(other.config)
        assert {k: v for k, v in back.config.items() if k in scheduler.config} == dict(scheduler.config), cls
        assert not ({k for k in back.config if k not in scheduler.config} & init_keys)


def test_step_shape_and_outputs_equivalence(config):
    """test_step_shape (two steps on one grid keep the shape) and test_scheduler_outputs_equivalence (tuple and
    dataclass outputs agree)."""
    scheduler = TDMScheduler(**config)
    scheduler.set_timesteps(STEPS)
    x = sample()
    out_0 = scheduler.step(0.1 * x, scheduler.timesteps[0], x).prev_sample
    out_1 = scheduler.step(0.1 * x, scheduler.timesteps[1], x).prev_sample
    assert out_0.shape == out_1.shape == x.shape
    as_dict = first_step(scheduler)
    as_tuple = first_step(scheduler, return_dict=False)
    assert len(as_tuple) == 2
    for value, (name, field) in zip(as_tuple, as_dict.items()):
        assert torch.allclose(value.nan_to_num(), field.nan_to_num(), atol=1e-5), name


def test_public_api(config):
    scheduler = TDMScheduler(**config)
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1
    x = sample()
    assert scheduler.scale_model_input(x, 0.0).shape == x.shape
    assert callable(scheduler.step) and callable(scheduler.add_noise) and len(scheduler) == 1000


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_add_noise_device(config, device):
    scheduler = TDMScheduler(**config)
    scheduler.set_timesteps(STEPS)
    x = scheduler.scale_model_input(sample().to(device), 0.0)
    noised = scheduler.add_noise(x, torch.randn(x.shape).to(device), scheduler.timesteps[5][None])
    assert noised.shape == x.shape and noised.device.type == device


def test_no_undeclared_deprecated_kwargs():
    assert "kwargs" not in inspect.signature(TDMScheduler.__init__).parameters
    assert not TDMScheduler._deprecated_kwargs


def test_trained_betas_survive_save_load(tmp_path):
    scheduler = TDMScheduler(num_train_timesteps=2, trained_betas=np.array([0.1, 0.3]))
    scheduler.save_pretrained(tmp_path)
    loaded = TDMScheduler.from_pretrained(tmp_path)
    assert scheduler.betas.tolist() == loaded.betas.tolist()
    torch.testing.assert_close(loaded.betas, torch.tensor([0.1, 0.3]))


def test_trained_betas_do_not_apply_to_a_flow_schedule():
    """The check cannot apply to flow: a flow schedule has no betas (diffusers' flow schedulers have none)."""
    assert not hasattr(TDMScheduler(**CONFIGS["flow"]), "betas")


def test_getattr_is_correct():
    scheduler = TDMScheduler()
    scheduler.dummy_attribute = 5
    scheduler.register_to_config(test_attribute=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scheduler.dummy_attribute == 5 and hasattr(scheduler, "dummy_attribute")
        assert hasattr(scheduler, "save_pretrained")
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
    with pytest.raises(AttributeError, match="^'TDMScheduler' object has no attribute 'does_not_exist'$"):
        scheduler.does_not_exist  # noqa: B018


@pytest.mark.skip(reason="SchedulerPushToHubTester: pushes to the Hub's staging server (network); the method is "
                         "ConfigMixin's own, unchanged here (tdm export's upload: tests/test_export_stock.py)")
def test_push_to_hub():
    pass


@pytest.mark.skip(reason="SchedulerBaseTests: checks ConfigMixin itself on mock classes and on PNDM/Euler/DEIS/UniPC "
                         "switches of a hub pipeline; nothing of a given scheduler (TDMScheduler's switches: "
                         "test_compatibles_round_trip)")
def test_scheduler_base_tests():
    pass


# ---------------------------------------------------------------- from_config refuses what it cannot honour


@pytest.mark.parametrize("teacher", [
    lambda: diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
])
def test_from_config_refuses_a_teacher_config(teacher, tmp_path):
    """The common idiom on a teacher's pipeline would silently sample another grid (or a VP schedule for a flow
    teacher): a one-line error instead, from a config dict or a saved folder."""
    teacher = teacher()
    with pytest.raises(ConfigError, match=r"^TDMScheduler.from_config: a scheduler config has no student grid"):
        TDMScheduler.from_config(teacher.config)
    teacher.save_config(tmp_path)
    name = type(teacher).__name__
    with pytest.raises(ConfigError, match=f"^TDMScheduler.from_config: a {name} config has no student grid"):
        TDMScheduler.from_pretrained(tmp_path)


def test_from_config_refuses_a_flow_config_read_as_vp():
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "timesteps": [1000.0, 500.0]}
    with pytest.raises(ConfigError, match="flow-matching FlowMatchEulerDiscreteScheduler config with "
                                          "schedule='vp'; expected schedule='flow'"):
        TDMScheduler.from_config(config)
    flow = TDMScheduler.from_config({**config, "schedule": "flow", "prediction_type": "flow_prediction"})
    assert flow.schedule.shift == 3.0


def test_from_config_accepts_its_own_configs():
    assert TDMScheduler.from_config(TDMScheduler().config).config.timesteps is None  # tdm's default grid
    assert TDMScheduler.from_config(dict(TDMScheduler(**CONFIGS["vp-eps"]).config)).config.timesteps == \
        CONFIGS["vp-eps"]["timesteps"]


# ---------------------------------------------------------------- explicit grids, add_noise


def toy_model(x, t, cond):
    return torch.tanh(0.7 * x + 1e-3 * t.float().reshape(-1, *[1] * (x.ndim - 1)))


def loop(scheduler, x, begin=0):
    """A stock pipeline's loop (an img2img pipeline's from `begin`), the network seeing tdm's levels."""
    for i, t in enumerate(scheduler.timesteps[begin:], begin):
        x = scheduler.step(toy_model(x, scheduler.levels[i].expand(len(x)), None), t, x).prev_sample
    return x


def test_flow_sigmas_are_the_recipes():
    """set_timesteps(sigmas=t / T) is the trained flow grid, as FlowMatchEulerDiscreteScheduler takes the export's
    sigmas; timesteps= takes the network's (shifted) timesteps."""
    trained = TDMScheduler(**CONFIGS["flow"])
    trained.set_timesteps()
    explicit = TDMScheduler(**CONFIGS["flow"])
    explicit.set_timesteps(sigmas=[1.0, 0.5])
    assert torch.equal(explicit.levels, trained.levels) and torch.equal(explicit.timesteps, trained.timesteps)
    stock = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock.set_timesteps(sigmas=[1.0, 0.5])
    torch.testing.assert_close(trained.timesteps, stock.timesteps)
    explicit.set_timesteps(timesteps=trained.timesteps.tolist())
    torch.testing.assert_close(explicit.levels, trained.levels)


def test_explicit_vp_timesteps_replay_the_rollout():
    scheduler = TDMScheduler(**CONFIGS["vp-eps"])
    scheduler.set_timesteps(timesteps=[999, 500, 100])
    assert scheduler.timesteps.tolist() == [999, 500, 100] and scheduler.num_inference_steps == 3
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = rollout(toy_model, noise, None, explicit_grid([999, 500, 100]), scheduler.schedule,
                       scheduler.prediction)
    assert torch.equal(loop(scheduler, noise), expected)


@pytest.mark.parametrize("timesteps, sigmas, match", [
    ([999, 500], [1.0, 0.5], "timesteps or sigmas, not both"),
    (None, [1.0, 0.5], "sigmas apply to a flow schedule"),
    ([999.5, 500], None, r"integers in \[0, 1000\)"),
    ([1000, 500], None, r"integers in \[0, 1000\)"),
    ([500, 999], None, "strictly decrease"),
])
def test_explicit_vp_grid_errors(timesteps, sigmas, match):
    with pytest.raises(ValueError, match=match):
        TDMScheduler(**CONFIGS["vp-eps"]).set_timesteps(timesteps=timesteps, sigmas=sigmas)


@pytest.mark.parametrize("name, stock", [
    ("vp-eps", lambda: diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    ("vp-v-zero-snr", lambda: diffusers.CogVideoXDDIMScheduler(rescale_betas_zero_snr=True, snr_shift_scale=3.0,
                                                               prediction_type="v_prediction")),
])
def test_add_noise_is_diffusers(name, stock):
    """add_noise at network timesteps equals the stock scheduler's on the same table (flow: scale_noise)."""
    scheduler = TDMScheduler(**CONFIGS[name])
    x, noise, t = sample(), torch.randn(4, 3, 8, 8), torch.tensor([999, 674, 10, 0])
    torch.testing.assert_close(scheduler.add_noise(x, noise, t), stock().add_noise(x, noise, t), atol=2e-6, rtol=0)


def test_flow_scale_noise_is_diffusers():
    scheduler = TDMScheduler(**CONFIGS["flow"])
    scheduler.set_timesteps()
    stock = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock.set_timesteps(sigmas=[1.0, 0.5])
    x, noise = sample(), torch.randn(4, 3, 8, 8)
    t = scheduler.timesteps[1:2]
    torch.testing.assert_close(scheduler.scale_noise(x, t, noise), stock.scale_noise(x, stock.timesteps[1:2], noise))


def test_img2img_from_a_later_level_replays_the_rollout():
    """An img2img pipeline noises the image to timesteps[begin] with add_noise, sets the begin index and loops
    over the rest: tdm's rollout from that level."""
    scheduler = TDMScheduler(**CONFIGS["vp-eps"])
    scheduler.set_timesteps()
    image, noise = sample(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x = scheduler.add_noise(image, noise, scheduler.timesteps[1:2])
    scheduler.set_begin_index(1)
    levels = [float(t) for t in scheduler.levels[1:]]
    expected = rollout(toy_model, x, None, explicit_grid(levels), scheduler.schedule, scheduler.prediction)
    assert torch.equal(loop(scheduler, x, begin=1), expected)
