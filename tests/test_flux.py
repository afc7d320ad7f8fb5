"""FLUX.1 (backbone.name=flux) on a tiny real FluxPipeline: the network call as the stock pipeline makes it (packed
latents, the dynamic shift at the sample size, the embedded guidance), 2 iterations of LoRA-roles distillation,
resume, the export round trip through FluxPipeline.load_lora_weights, the prompt cache, and bad input."""

import math
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tdm.checkpoint import checkpoint_name  # noqa: E402
from tdm.cli import main  # noqa: E402
from tdm.config import ConfigError, load_config  # noqa: E402
from tdm.core.algorithm import make_grid  # noqa: E402
from tdm.export import read_recipe, sampling_kwargs  # noqa: E402
from tdm.trainer import Trainer  # noqa: E402
from test_lora_families import (  # noqa: E402
    Run,
    assert_checkpointing_changes_nothing,
    assert_flow_schedulers_reproduce,
    checkpoint_tensors,
    frozen_state,
    tdm_latents,
    weights,
)
from test_prompt_cache import assert_identical, conditions, encoded_together, no_model_loads  # noqa: E402
from tiny_diffusers import PROMPTS, cli_sets, save_tiny  # noqa: E402
from tiny_flux import FLUX_SCHEDULER, TINY_FLUX_SIZE, flux_overrides, load_flux, save_tiny_flux  # noqa: E402

PRESET = "flux-dev-lora"
ITERATIONS = 2


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-flux")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return save_tiny_flux(root / "flux")


def test_schedule_is_the_dynamic_shift_at_the_sample_size(flux_dir):
    backbone = load_flux(flux_dir)
    tokens = (TINY_FLUX_SIZE // 4) ** 2  # VAE factor 2, 2x2 packing
    assert backbone.sample_shape == (tokens, 16)
    slope = (FLUX_SCHEDULER["max_shift"] - FLUX_SCHEDULER["base_shift"]) / (4096 - 256)
    mu = FLUX_SCHEDULER["base_shift"] + slope * (tokens - 256)
    assert backbone.schedule.shift == pytest.approx(math.exp(mu), rel=1e-12)
    stock = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    stock.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)  # what FluxPipeline does
    tdm_sigmas = backbone.schedule.sigma(torch.tensor([1000.0, 750.0, 500.0, 250.0]))
    torch.testing.assert_close(stock.sigmas[:-1], tdm_sigmas.float(), atol=1e-6, rtol=0)
    larger = load_flux(flux_dir, height=64, width=64)  # more tokens, more shift
    assert larger.schedule.shift > backbone.schedule.shift and larger.sample_shape == (256, 16)


def test_adapter_matches_the_stock_pipeline_network_call(flux_dir):
    """The pipeline's own transformer calls (2 steps, its dynamic-shift scheduler, guidance 3.5) == the adapter
    fed by encode_prompts on the same packed latents at the same level."""
    backbone = load_flux(flux_dir)
    pipe = diffusers.FluxPipeline.from_pretrained(flux_dir)
    calls = []

    def hook(module, args, kwargs, output):
        calls.append({k: kwargs[k].clone() for k in ("hidden_states", "timestep", "guidance")} | {"out": output[0]})

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt=PROMPTS[:2], num_inference_steps=2, guidance_scale=backbone.unguided_scale, output_type="latent",
         generator=torch.Generator().manual_seed(0), **backbone.pipeline_kwargs())
    handle.remove()
    assert len(calls) == 2 and backbone.unguided_scale == 3.5
    cond = backbone.encode_prompts(PROMPTS[:2])
    s, T = backbone.schedule.shift, backbone.schedule.num_train_timesteps
    for call in calls:
        torch.testing.assert_close(call["guidance"], cond["guidance"])  # the embedded value, per sample
        sigma = call["timestep"].double()  # the pipeline passes its timestep / 1000: sigma
        t = (T * sigma / (s - (s - 1) * sigma)).float()  # invert sigma = shift(t / T)
        out = backbone.teacher(call["hidden_states"], t, cond)
        torch.testing.assert_close(out, call["out"], atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def trained(flux_dir, tmp_path_factory):
    """A 2-iteration LoRA-roles distillation of the flux-dev-lora preset on the tiny pipeline."""
    out = tmp_path_factory.mktemp("flux") / "run"
    trainer = Trainer(load_config(PRESET, flux_overrides(flux_dir)), out)
    frozen = frozen_state(trainer.backbone)
    adapters = {"student": weights(trainer.student), "fake_score": weights(trainer.fake_score),
                "student_ema": weights(trainer.ema)}
    trainer.train()
    yield Run("flux", trainer, out, frozen, adapters)
    trainer.close()


def test_distillation_moves_only_the_student_and_fake_adapters(trained):
    trainer, backbone = trained.trainer, trained.trainer.backbone
    assert trainer.config.train.roles == "lora" and trainer.state.step == ITERATIONS
    assert trainer.config.tdm.guidance_scale == 1.0 and backbone.embedded_guidance == 3.5
    after = frozen_state(backbone)
    assert not [k for k, v in trained.frozen_before.items() if not torch.equal(v, after[k])]
    for role, module in (("student", trainer.student), ("fake_score", trainer.fake_score),
                         ("student_ema", trainer.ema)):
        now = module.state_dict()
        assert any(not torch.equal(v, now[k]) for k, v in trained.adapters_before[role].items()), role
    layers = {k.split(".lora_")[0] for k in trainer.student.state_dict()}
    double, single = "model.transformer_blocks.0.", "model.single_transformer_blocks.0."
    # double blocks: both attention streams and both feed-forwards; single blocks: q, k, v (no output projection)
    assert {layer.removeprefix(double) for layer in layers if layer.startswith(double)} == {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2"}
    assert {layer.removeprefix(single) for layer in layers if layer.startswith(single)} == {
        "attn.to_q", "attn.to_k", "attn.to_v"}
    assert backbone.denoiser.gradient_checkpointing and trainer.roles.shared.checkpointing


def test_gradient_checkpointing_gives_the_same_lora_gradients(flux_dir, tmp_path):
    assert_checkpointing_changes_nothing(PRESET, flux_overrides(flux_dir, iterations=1), tmp_path)


def test_resume_after_one_iteration_equals_two_iterations(trained, flux_dir, tmp_path):
    code = main(["distill", "--config", PRESET, "--out", str(tmp_path), "--no-report",
                 "--resume", str(trained.checkpoint(1)), *cli_sets(flux_overrides(flux_dir))])
    assert code == 0
    a = checkpoint_tensors(trained.checkpoint(ITERATIONS))
    b = checkpoint_tensors(tmp_path / "checkpoints" / checkpoint_name(ITERATIONS))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


def test_exported_lora_in_the_stock_pipeline_reproduces_the_trained_student(trained, tmp_path):
    """`tdm export`, FluxPipeline.load_lora_weights, the exported stock scheduler (FluxPipeline passes it sigmas
    and mu) or TDMScheduler, the embedded guidance from the recipe: == tdm's rollout of the student."""
    trainer, out = trained.trainer, tmp_path / "export"
    assert main(["export", "--checkpoint", str(trained.checkpoint(ITERATIONS)), "--out", str(out)]) == 0
    noise = torch.randn(2, *trainer.backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    expected = tdm_latents(trainer, trainer.student, noise)
    assert (expected - tdm_latents(trainer, trainer.teacher, noise)).abs().max() > 1e-3  # the student moved

    recipe = read_recipe(out)
    assert recipe["lora"]["format"] == "diffusers" and recipe["guidance_scale"] == 3.5
    assert sampling_kwargs(recipe)["guidance_scale"] == 3.5
    assert recipe["scheduler"]["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert recipe["scheduler"]["shift"] == trainer.backbone.schedule.shift
    assert recipe["grid"] == list(make_grid(trainer.config.tdm, trainer.backbone.schedule).timesteps)
    pipe = diffusers.FluxPipeline.from_pretrained(recipe["base"])
    pipe.load_lora_weights(out, adapter_name="tdm")
    assert_flow_schedulers_reproduce(pipe, out, recipe, noise, expected)


def test_cached_conditioning_is_bit_identical_to_encoding_in_memory(flux_dir, tmp_path, monkeypatch):
    prompts, cache = flux_dir.parent / "prompts.txt", tmp_path / "cache"
    memory = load_flux(flux_dir, prompts=str(prompts))
    expected = encoded_together(memory, [*PROMPTS, ""])
    cold = load_flux(flux_dir, prompts=str(prompts), prompt_cache=str(cache))
    assert cold.pipeline.text_encoder is None and cold.pipeline.text_encoder_2 is None  # released after encoding
    assert_identical(conditions(cold), expected)
    assert expected["sample"]["guidance"].tolist() == [3.5] * 5  # computed, not cached
    with no_model_loads(monkeypatch):  # everything cached: neither text encoder is loaded
        assert_identical(conditions(load_flux(flux_dir, prompts=str(prompts), prompt_cache=str(cache))), expected)
    filled = tmp_path / "filled"
    assert main(["cache-prompts", "--family", "flux", "--model", str(flux_dir), "--prompts", str(prompts),
                 "--out", str(filled)]) == 0
    with no_model_loads(monkeypatch):
        assert_identical(conditions(load_flux(flux_dir, prompts=str(prompts), prompt_cache=str(filled))), expected)


def test_flux_without_a_guidance_embedding(tmp_path):
    """A transformer without guidance_embeds (FLUX.1-schnell): no guidance input; asking for one is an error."""
    folder = save_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    backbone = load_flux(folder)
    assert "guidance" not in backbone.encode_prompts(["a cat"]) and backbone.unguided_scale == 1.0
    with pytest.raises(ConfigError, match=r"^backbone.embedded_guidance: the transformer of .* has no guidance"):
        load_flux(folder, embedded_guidance=3.5)


def one_line_error(match: str, folder, **overrides):
    with pytest.raises(ConfigError) as caught:
        load_flux(folder, **overrides)
    message = str(caught.value)
    assert "\n" not in message and match in message, message
    return message


def test_bad_input_gives_one_line_errors(flux_dir, tmp_path):
    sd3 = save_tiny("sd3", tmp_path / "sd3")
    one_line_error("is a StableDiffusion3Pipeline, but backbone.name=flux expects a FluxPipeline; for it set "
                   "backbone.name=sd3", sd3)
    one_line_error("backbone.height: flux needs a multiple of 4 pixels (VAE factor x patch size), got 30", flux_dir,
                   height=30)
    missing = shutil.copytree(flux_dir, tmp_path / "no-t5")
    shutil.rmtree(missing / "text_encoder_2")
    one_line_error(f"backbone.teacher: {missing} has no text_encoder_2 (the flux pipeline encodes prompts with it",
                   missing)


def test_preset_offline_fails_naming_the_hub_id(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    code = main(["distill", "--config", PRESET, "--out", str(tmp_path / "run"), "--no-report",
                 "--set", f"backbone.prompts={prompts}", "--set", "train.mixed_precision=no"])  # CPU, as earlier tests
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tdm: error:")]
    assert code == 2 and len(errors) == 1 and "black-forest-labs/FLUX.1-dev" in errors[0], errors  # one line
