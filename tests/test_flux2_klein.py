"""FLUX.2 [klein] (backbone.name=flux2-klein) on a tiny real Flux2KleinPipeline: the network calls of the stock
pipeline (CFG against the empty prompt), 2 iterations of LoRA-roles distillation, resume, the export round trip
through Flux2KleinPipeline.load_lora_weights, the prompt cache, and bad input."""

import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tdm.checkpoint import checkpoint_name  # noqa: E402
from tdm.cli import main  # noqa: E402
from tdm.config import ConfigError, load_config  # noqa: E402
from tdm.export import read_recipe  # noqa: E402
from tdm.trainer import Trainer  # noqa: E402
from test_lora_families import (  # noqa: E402
    Run,
    assert_checkpointing_changes_nothing,
    assert_flow_schedulers_reproduce,
    checkpoint_tensors,
    tdm_latents,
)
from test_prompt_cache import assert_identical, conditions, encoded_together, no_model_loads  # noqa: E402
from tiny_diffusers import PROMPTS, cli_sets  # noqa: E402
from tiny_flux import flux_overrides, load_flux, save_tiny_flux, save_tiny_flux2_klein  # noqa: E402

NAME, PRESET, ITERATIONS = "flux2-klein", "flux2-klein-base-lora", 2


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-klein")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return save_tiny_flux2_klein(root / "klein")


def test_adapter_matches_the_stock_pipeline_network_calls(klein_dir):
    """Both CFG branches of the pipeline's transformer calls (guidance 2, its dynamic shift at 2 steps) == the
    adapter on the same latents (the pipeline's tokens, unpacked) with encode_prompts / null_condition."""
    backbone = load_flux(klein_dir, name=NAME)
    pipe = diffusers.Flux2KleinPipeline.from_pretrained(klein_dir)
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((kwargs["hidden_states"], kwargs["timestep"], kwargs["encoder_hidden_states"], output[0]))

    pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt=PROMPTS[:2], num_inference_steps=2, guidance_scale=2.0, output_type="latent",
         generator=torch.Generator().manual_seed(0), **backbone.pipeline_kwargs())
    cond, null = backbone.encode_prompts(PROMPTS[:2]), backbone.null_condition(2)
    branches = []
    s, T = backbone.schedule.shift, backbone.schedule.num_train_timesteps
    for tokens, timestep, embeds, expected in calls:
        branch = cond if torch.equal(embeds, cond["prompt_embeds"]) else null
        assert torch.equal(embeds, branch["prompt_embeds"])
        branches.append(branch is cond)
        x = tokens.permute(0, 2, 1).reshape(len(tokens), *backbone.sample_shape)
        sigma = timestep.double()
        out = backbone.teacher(x, (T * sigma / (s - (s - 1) * sigma)).float(), branch)
        torch.testing.assert_close(out, expected.permute(0, 2, 1).reshape(out.shape), atol=2e-5, rtol=0)
    assert branches == [True, False, True, False]  # conditional and unconditional at each of the 2 steps


def test_schedule_is_the_empirical_shift_at_the_sample_size(klein_dir):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    backbone = load_flux(klein_dir, name=NAME)
    assert backbone.sample_shape == (16, 8, 8)  # 4 latent channels patchified 2x2, 32 px / (2 x 2)
    stock = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(klein_dir, subfolder="scheduler")
    stock.set_timesteps(sigmas=[1.0, 0.5], mu=compute_empirical_mu(64, 50))  # 64 tokens, 50 teacher steps
    torch.testing.assert_close(stock.sigmas[:-1], backbone.schedule.sigma(torch.tensor([1000.0, 500.0])).float(),
                               atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def trained(klein_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("klein") / "run"
    trainer = Trainer(load_config(PRESET, flux_overrides(klein_dir)), out)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.train()
    yield Run(NAME, trainer, out, {}, {"student": before})
    trainer.close()


def test_distillation_resume_and_export_round_trip(trained, klein_dir, tmp_path):
    """2 iterations move the student; resume from the first equals them; `tdm export` + load_lora_weights + the
    exported scheduler (given sigmas and mu) or TDMScheduler == tdm's rollout, the pipeline's latents being the
    VAE latents of tdm's samples."""
    trainer = trained.trainer
    assert trainer.state.step == ITERATIONS and trainer.config.tdm.guidance_scale == 4.0
    now = trainer.student.state_dict()
    assert any(not torch.equal(v, now[k]) for k, v in trained.adapters_before["student"].items())
    layers = {k.split(".lora_")[0] for k in now}
    assert {"model.single_transformer_blocks.0.attn.to_qkv_mlp_proj", "model.transformer_blocks.0.attn.add_q_proj",
            "model.transformer_blocks.0.attn.to_out.0", "model.transformer_blocks.0.ff.linear_in"} <= layers

    resumed = tmp_path / "resumed"
    assert main(["distill", "--config", PRESET, "--out", str(resumed), "--no-report", "--resume",
                 str(trained.checkpoint(1)), *cli_sets(flux_overrides(klein_dir))]) == 0
    a = checkpoint_tensors(trained.checkpoint(ITERATIONS))
    b = checkpoint_tensors(resumed / "checkpoints" / checkpoint_name(ITERATIONS))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(trained.checkpoint(ITERATIONS)), "--out", str(out)]) == 0
    backbone = trainer.backbone
    noise = torch.randn(2, *backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone.vae_latents(tdm_latents(trainer, trainer.student, noise))
        teacher = backbone.vae_latents(tdm_latents(trainer, trainer.teacher, noise))
    assert (expected - teacher).abs().max() > 1e-3  # the student moved
    recipe = read_recipe(out)
    assert recipe["lora"]["format"] == "diffusers" and recipe["scheduler"]["shift"] == backbone.schedule.shift
    pipe = diffusers.Flux2KleinPipeline.from_pretrained(recipe["base"])
    pipe.load_lora_weights(out, adapter_name="tdm")
    assert_flow_schedulers_reproduce(pipe, out, recipe, noise, expected)


def test_gradient_checkpointing_gives_the_same_lora_gradients(klein_dir, tmp_path):
    assert_checkpointing_changes_nothing(PRESET, flux_overrides(klein_dir, iterations=1), tmp_path)


def test_cached_conditioning_is_bit_identical_to_encoding_in_memory(klein_dir, tmp_path, monkeypatch):
    prompts, cache = klein_dir.parent / "prompts.txt", tmp_path / "cache"
    memory = load_flux(klein_dir, name=NAME, prompts=str(prompts))
    expected = encoded_together(memory, [*PROMPTS, ""])
    cold = load_flux(klein_dir, name=NAME, prompts=str(prompts), prompt_cache=str(cache))
    assert cold.pipeline.text_encoder is None
    assert_identical(conditions(cold), expected)
    filled = tmp_path / "filled"
    assert main(["cache-prompts", "--family", NAME, "--model", str(klein_dir), "--prompts", str(prompts),
                 "--out", str(filled)]) == 0
    with no_model_loads(monkeypatch):
        warm = load_flux(klein_dir, name=NAME, prompts=str(prompts), prompt_cache=str(filled))
        assert_identical(conditions(warm), expected)


def test_bad_input_gives_one_line_errors(klein_dir, tmp_path):
    def error(folder, **overrides):
        with pytest.raises(ConfigError) as caught:
            load_flux(folder, name=NAME, **overrides)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    flux = save_tiny_flux(tmp_path / "flux")
    assert "is a FluxPipeline, but backbone.name=flux2-klein expects a Flux2KleinPipeline; for it set " \
           "backbone.name=flux" in error(flux)
    assert "backbone.width: flux2-klein needs a multiple of 4 pixels (VAE factor x patch size), got 34" in \
        error(klein_dir, width=34)
    distilled = save_tiny_flux2_klein(tmp_path / "distilled", is_distilled=True)
    assert "is a step-distilled FLUX.2 [klein]" in error(distilled) and "FLUX.2-klein-base-4B" in error(distilled)
    missing = shutil.copytree(klein_dir, tmp_path / "no-text")
    shutil.rmtree(missing / "text_encoder")
    assert f"backbone.teacher: {missing} has no text_encoder (the flux2-klein pipeline encodes prompts" in \
        error(missing)


def test_preset_offline_fails_naming_the_hub_id(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    code = main(["distill", "--config", PRESET, "--out", str(tmp_path / "run"), "--no-report",
                 "--set", f"backbone.prompts={prompts}", "--set", "train.mixed_precision=no"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tdm: error:")]
    assert code == 2 and len(errors) == 1 and "black-forest-labs/FLUX.2-klein-base-4B" in errors[0], errors  # one line
