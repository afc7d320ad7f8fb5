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
    """A scheduler_config.json that leaves keys out gets its class's defaults (CogVideoX: scaled_linear, 3.0).
    (v_prediction: the class's default epsilon on a zero-terminal-SNR table is refused.)"""
    reference = diffusers.CogVideoXDDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    schedule, _ = schedule_from_config({"_class_name": "CogVideoXDDIMScheduler", "rescale_betas_zero_snr": True,
                                        "prediction_type": "v_prediction"})
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


# ---------------------------------------------------------------- adapters on tiny real pipelines

from tdm.config import BackboneConfig  # noqa: E402
from tdm.core.sampling import concat_batch  # noqa: E402
from tdm.registry import build_backbone  # noqa: E402
from tiny_diffusers import BUILDERS, PROMPTS, TINY_FRAMES, TINY_SIZE, load_backbone  # noqa: E402

FAMILIES = list(BUILDERS)


def capture_network_calls(pipe, backbone, prompts, guidance_scale):
    """Run the stock pipeline (2 steps, latents out) and record each call of its network: (x, t, output)."""
    network = getattr(pipe, backbone.denoiser_name)
    calls = []

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((x.clone(), t.clone(), (output[0] if isinstance(output, tuple) else output.sample).clone()))

    handle = network.register_forward_hook(hook, with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompts, num_inference_steps=2, guidance_scale=guidance_scale, output_type="latent",
         generator=torch.Generator().manual_seed(0), **backbone.pipeline_kwargs())
    handle.remove()
    return calls


def to_tdm_time(backbone, timestep, batch):
    """The network's timestep -> tdm's time axis (flow: invert sigma * T with sigma = shift(t / T))."""
    timestep = timestep.reshape(-1)[:1].double().expand(batch)
    if backbone.schedule.discrete:
        return timestep.long()
    T, s = backbone.schedule.num_train_timesteps, backbone.schedule.shift
    sigma = timestep / T
    return (T * sigma / (s - (s - 1) * sigma)).float()


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_matches_the_stock_pipeline_network_call(family, tiny_dirs):
    """Same latents and timestep as the pipeline's own call (CFG 2: negative and positive halves) -> the
    adapter, fed by encode_prompts and null_condition, returns what the pipeline's network returned."""
    backbone = load_backbone(family, tiny_dirs[family])
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_dirs[family])
    prompts = PROMPTS[:2]
    calls = capture_network_calls(pipe, backbone, prompts, guidance_scale=2.0)
    assert len(calls) == 2
    cond = concat_batch(backbone.null_condition(len(prompts)), backbone.encode_prompts(prompts))
    for x, t, expected in calls:
        assert x.shape == (2 * len(prompts), *backbone.sample_shape)
        if expected.shape[-3] == 2 * x.shape[-3]:  # PixArt's learned sigma: the pipeline keeps the first half
            expected = expected.chunk(2, dim=1)[0]
        out = backbone.teacher(x, to_tdm_time(backbone, t, x.shape[0]), cond)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["sd15", "cogvideox"])
def test_conditions_images_and_lazy_vae(family, tiny_dirs):
    backbone = load_backbone(family, tiny_dirs[family])
    a = backbone.sample_conditions(4, torch.Generator().manual_seed(3))
    b = backbone.sample_conditions(4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    index = torch.randint(len(PROMPTS), (4,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, backbone.encode_prompts([PROMPTS[i] for i in index]), atol=0, rtol=0)
    assert backbone.evaluation_prompts(4) == [*PROMPTS, PROMPTS[0]]
    assert backbone._vae is None  # the VAE is only loaded to decode
    samples = torch.randn(2, *backbone.sample_shape)
    images, size = backbone.to_images(samples), TINY_SIZE[family]
    assert images.shape == (2, 3, size, size)
    assert 0 <= images.min() and images.max() <= 1 and backbone._vae is not None
    if family == "cogvideox":
        videos = backbone.to_videos(samples)
        assert videos.shape == (2, TINY_FRAMES, 3, size, size) and torch.equal(videos[:, TINY_FRAMES // 2], images)


def test_sd3_without_t5(tiny_dirs):
    backbone = load_backbone("sd3", tiny_dirs["sd3"], text_encoder_3=False)
    assert backbone.pipeline.text_encoder_3 is None
    cond = backbone.encode_prompts(["a cat"])
    t5_part = cond["prompt_embeds"][:, 16:]  # after the 16 CLIP tokens: zeros in place of T5
    assert t5_part.shape[1] == 256 and not t5_part.any()


@pytest.mark.parametrize("overrides, match", [
    ({"height": 15}, "backbone.height"),
    ({"teacher": ""}, "backbone.teacher"),
    ({"teacher": "/nonexistent/pipeline"}, "backbone.teacher"),
    ({"prompts": "/nonexistent/prompts.txt"}, "backbone.prompts"),
    ({"prediction": "epsilon"}, "backbone.prediction"),
])
def test_bad_backbone_config_names_the_field(overrides, match, tiny_dirs):
    with pytest.raises(ConfigError, match=match):
        load_backbone("sd15", tiny_dirs["sd15"], **overrides)


def test_prompts_file_and_missing_prompts(tiny_dirs, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    backbone = build_backbone(BackboneConfig(name="sd15", teacher=str(tiny_dirs["sd15"]), prompts=str(path),
                                             height=16, width=16))
    assert backbone.conditions.prompts == ["a cat", "a dog"]
    backbone.conditions.prompts = []
    with pytest.raises(ConfigError, match="backbone.prompts"):
        backbone.sample_conditions(2, torch.Generator())


def test_long_prompts_are_truncated_with_one_warning(tiny_dirs, tmp_path, capfd):
    """Prompts far beyond the text encoder's length: one tdm warning with their count, instead of the libraries'
    logs at every encoding, which repeat the whole cut-off tail (megabytes for a 1 MB prompt)."""
    long = "cat " * 2000
    path = tmp_path / "prompts.txt"
    path.write_text(f"a cat\n{long}\n{long}dog\n")
    backbone = build_backbone(BackboneConfig(name="sd15", teacher=str(tiny_dirs["sd15"]), prompts=str(path),
                                             height=16, width=16))
    for seed in range(3):
        backbone.sample_conditions(3, torch.Generator().manual_seed(seed))
    backbone.evaluation_conditions(3)
    err = capfd.readouterr().err
    assert "truncated because" not in err and "Token indices" not in err, err[:300]
    assert err.count("tdm: warning:") == 1
    assert "2 prompt(s) longer than the text encoder takes (16 tokens) are truncated" in err


PRESETS = {"sd15-lora": ("sd15", 512, 512), "sdxl-lora": ("sdxl", 1024, 1024),
           "pixart-alpha-512": ("pixart-alpha", 512, 512), "pixart-alpha-1024": ("pixart-alpha", 1024, 1024),
           "sd3-medium-lora": ("sd3", 1024, 1024), "cogvideox-2b-lora": ("cogvideox", 480, 720)}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    from tdm.config import load_config
    from tdm.registry import BACKBONES

    config = load_config(preset)
    family, height, width = PRESETS[preset]
    assert config.backbone.name == family and family in BACKBONES
    assert "/" in config.backbone.teacher  # a hub id
    assert (config.backbone.height, config.backbone.width) == (height, width)
    assert config.tdm.num_steps == 4 and config.tdm.guidance_scale > 1
