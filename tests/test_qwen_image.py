"""qwen-image on a tiny real QwenImagePipeline (tests/tiny_qwen_image.py): the network call and true CFG equal the
stock pipeline's, the dynamic shift is fixed at the resolution, cached conditioning equals in-memory encoding,
2 iterations of LoRA-roles distillation resume bit for bit, and the export replays the student in the stock
pipeline; bad inputs give one-line errors."""

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tdm.cli import main  # noqa: E402
from tdm.config import BackboneConfig, load_config  # noqa: E402
from tdm.core.algorithm import TDMConfig, make_grid  # noqa: E402
from tdm.core.sampling import guided, rollout  # noqa: E402
from tdm.export import load_pipeline, read_recipe, sampling_kwargs  # noqa: E402
from tdm.registry import build_backbone  # noqa: E402
from tdm.samplers import student_samplers  # noqa: E402
from tdm.stock_scheduler import stock_sampling  # noqa: E402
from tdm.trainer import Trainer  # noqa: E402
from test_bad_input import _assert_clear  # noqa: E402
from test_export_stock import NO_TDM, _card  # noqa: E402
from test_export_stock import PROMPT as CARD_PROMPT  # noqa: E402
from test_lora_families import assert_checkpointing_changes_nothing, checkpoint_tensors  # noqa: E402
from tiny_diffusers import cli_sets, save_tiny  # noqa: E402
from tiny_qwen_image import QWEN_IMAGE_SCHEDULER, TINY_SIZE, save_tiny_qwen_image  # noqa: E402

PROMPTS = ["a red cat", "two dogs on a long hill under the stars at night"]  # unequal lengths: a padded batch
PRESET = "qwen-image-lora"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return save_tiny_qwen_image(root / "qwen-image")


def load(folder, **overrides):
    fields = {"name": "qwen-image", "teacher": str(folder), "height": TINY_SIZE, "width": TINY_SIZE,
              "negative_prompt": " ", **overrides}
    backbone = build_backbone(BackboneConfig(**fields))
    backbone.conditions.prompts = list(PROMPTS)
    return backbone


def stock(folder):
    pipe = diffusers.QwenImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_network_call_equals_the_stock_transformer_call(tiny):
    backbone, pipe = load(tiny), stock(tiny)
    assert backbone.sample_shape == (16, 16)  # (32 / 8)^2 tokens of 2x2 latents x 4 channels
    x, t = torch.randn(2, *backbone.sample_shape), torch.tensor([500.0, 900.0])
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
    assert mask is not None and not mask.all()
    sigma = backbone.schedule.sigma(t)
    expected = pipe.transformer(hidden_states=x, timestep=sigma * 1000 / 1000, encoder_hidden_states=embeds,
                                encoder_hidden_states_mask=mask, img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]
    with torch.no_grad():  # a padded batch: the encoder's rounding differs from each prompt's alone by ~1e-7
        torch.testing.assert_close(backbone.teacher(x, t, backbone.encode_prompts(PROMPTS)), expected, atol=1e-5,
                                   rtol=0)
        one, _ = pipe.encode_prompt(PROMPTS[:1], device="cpu")  # alone: no padding, no mask
        alone = pipe.transformer(hidden_states=x[:1], timestep=sigma[:1] * 1000 / 1000, encoder_hidden_states=one,
                                 img_shapes=[[(1, 4, 4)]], return_dict=False)[0]
        assert torch.equal(backbone.teacher(x[:1], t[:1], backbone.encode_prompts(PROMPTS[:1])), alone)


def test_dynamic_shift_fixed_at_the_resolution(tiny):
    backbone = load(tiny)
    config = QWEN_IMAGE_SCHEDULER
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    mu = 16 * slope + config["base_shift"] - slope * config["base_image_seq_len"]
    assert backbone.schedule.shift == pytest.approx(math.exp(mu), rel=1e-12)
    pipe = stock(tiny)  # the teacher's own scheduler, as the pipeline drives it (shift_terminal off)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    pipe.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1].double(),
                               backbone.schedule.sigma(torch.tensor(sigmas, dtype=torch.float64) * 1000).double(),
                               atol=1e-6, rtol=0)
    assert load(tiny, height=64, width=64).schedule.shift > backbone.schedule.shift  # 64 tokens: more shift


def test_true_cfg_rollout_equals_the_stock_pipeline(tiny):
    """tdm's teacher rollout with the backbone's guidance rule == QwenImagePipeline with true_cfg_scale and the
    negative prompt, on the same sigmas."""
    backbone = load(tiny)
    grid = make_grid(TDMConfig(num_steps=2), backbone.schedule)
    sampling = stock_sampling(backbone.pipeline.scheduler, backbone.schedule, "flow_prediction", grid)
    pipe = stock(tiny)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(sampling.config)
    noise = torch.randn(2, *backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model = guided(backbone.teacher, backbone.null_condition(2), 4.0, backbone.guidance_rule)
        ours = rollout(model, noise, backbone.encode_prompts(PROMPTS), grid, backbone.schedule, backbone.prediction)
        linear = rollout(guided(backbone.teacher, backbone.null_condition(2), 4.0), noise,
                         backbone.encode_prompts(PROMPTS), grid, backbone.schedule, backbone.prediction)
    kwargs = {**backbone.pipeline_kwargs(), **sampling.pipeline_kwargs, "true_cfg_scale": 4.0}
    theirs = pipe(PROMPTS, negative_prompt=" ", latents=noise.clone(), output_type="latent", num_inference_steps=2,
                  **kwargs)[0]
    assert (ours - theirs).abs().max() <= 1e-5
    assert (linear - theirs).abs().max() > 1e-3  # the norm rescaling matters


def test_cached_conditioning_equals_in_memory_encoding(tiny, tmp_path):
    in_memory = load(tiny)
    cache = tmp_path / "cache"
    prompts = tiny.parent / "prompts.txt"
    assert main(["cache-prompts", "--prompts", str(prompts), "--model", str(tiny), "--family", "qwen-image",
                 "--out", str(cache), "--negative-prompt", " "]) == 0
    cached = load(tiny, prompt_cache=str(cache), prompts=str(prompts))
    assert cached.pipeline.text_encoder is None  # all cached: the Qwen2.5-VL encoder was never loaded
    for a, b in ((in_memory.encode_prompts(PROMPTS), cached.encode_prompts(PROMPTS)),
                 (in_memory.null_condition(2), cached.null_condition(2))):
        assert a.keys() == b.keys() == {"prompt_embeds", "prompt_embeds_mask"}
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_decode_unpacks_as_the_pipeline(tiny):
    """to_images = the pipeline's decoding after its loop: its own _unpack_latents, then x / (1 / std) + mean."""
    backbone, pipe = load(tiny), stock(tiny)
    latents = torch.randn(1, *backbone.sample_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = backbone.to_images(latents)
        unpacked = pipe._unpack_latents(latents, TINY_SIZE, TINY_SIZE, pipe.vae_scale_factor)
        config = pipe.vae.config
        std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        pixels = pipe.vae.decode(unpacked / std + torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1),
                                 return_dict=False)[0][:, :, 0]
    assert ours.shape == (1, 3, TINY_SIZE, TINY_SIZE)
    assert torch.equal(ours, pipe.image_processor.postprocess(pixels, output_type="pt"))


def overrides(tiny, iterations=2):
    return [f"backbone.teacher={tiny}", f"backbone.prompts={tiny.parent / 'prompts.txt'}",
            f"backbone.height={TINY_SIZE}", f"backbone.width={TINY_SIZE}", "backbone.dtype=float32",
            "train.mixed_precision=no", "train.batch_size=2", f"train.iterations={iterations}", "train.log_every=1",
            "train.checkpoint_every=1", "train.keep_checkpoints=0", "train.lora_rank=4", "train.lora_alpha=8",
            "optim.generator_lr=1e-3", "optim.fake_lr=1e-3", "optim.warmup_steps=0", "train.validation_every=0",
            "train.eval_every=0"]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    trainer = Trainer(load_config(PRESET, overrides(tiny)), out)
    assert trainer.backbone.denoiser.is_gradient_checkpointing
    trainer.train()
    yield trainer, out
    trainer.close()


def test_two_iterations_resume_and_export_round_trip(trained, tiny, tmp_path):
    trainer, out = trained
    assert trainer.state.step == 2 and trainer.config.train.roles == "lora"
    layers = {k.split(".lora_")[0] for k in trainer.student.state_dict()}
    for pattern in ("to_q", "to_out.0", "add_q_proj", "to_add_out", "img_mlp.net.0.proj", "txt_mlp.net.2"):
        assert any(layer.endswith(f".{pattern}") for layer in layers), pattern  # the preset's targets
    checkpoints = out / "checkpoints"
    first, last = sorted(checkpoints.iterdir())[:2]
    # resume from the first iteration's checkpoint ends bit for bit where the 2-iteration run did
    assert main(["distill", "--config", PRESET, "--out", str(tmp_path / "resumed"), "--no-report",
                 "--resume", str(first), *cli_sets(overrides(tiny))]) == 0
    a = checkpoint_tensors(last)
    b = checkpoint_tensors(tmp_path / "resumed" / "checkpoints" / last.name)
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    # the export: a diffusers LoRA QwenImagePipeline.load_lora_weights reads, and the stock scheduler
    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(last), "--out", str(export)]) == 0
    recipe = read_recipe(export)
    assert recipe["lora"]["format"] == "diffusers"
    assert recipe["scheduler"]["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert recipe["tdm_scheduler"]["_class_name"] == "TDMScheduler"
    backbone = trainer.backbone
    noise = torch.randn(2, *backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    grid = make_grid(trainer.config.tdm, backbone.schedule)
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS)
        expected = rollout(trainer.student, noise, cond, grid, backbone.schedule, backbone.prediction)
        teacher = rollout(trainer.teacher, noise, cond, grid, backbone.schedule, backbone.prediction)
    assert (expected - teacher).abs().max() > 1e-3  # the student moved
    for scheduler in ("scheduler", "tdm_scheduler"):  # the stock one written to scheduler/, and TDMScheduler
        pipe = stock(recipe["base"])
        pipe.load_lora_weights(export, adapter_name="tdm")
        if scheduler == "scheduler":
            pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(export, subfolder="scheduler")
        else:
            from tdm.scheduler import TDMScheduler

            pipe.scheduler = TDMScheduler.from_config(recipe["tdm_scheduler"])  # takes the pipeline's mu
        latents = pipe(PROMPTS, output_type="latent", latents=noise.clone(), **sampling_kwargs(recipe))[0]
        assert (latents - expected).abs().max() <= 1e-5, scheduler
    # tdm generate at another K: TDMScheduler on the sigmas QwenImagePipeline passes by default (its linspace is
    # tdm's uniform flow grid) and the mu it always passes
    pipe, recipe_1 = load_pipeline(export, steps=1)
    (sampler,) = student_samplers(trainer.student, trainer.config.tdm, backbone.schedule, [1])
    with torch.no_grad():
        one_step = rollout(sampler.model, noise, cond, sampler.grid, backbone.schedule, backbone.prediction)
    latents = pipe(PROMPTS, output_type="latent", latents=noise.clone(), **sampling_kwargs(recipe_1, 1))[0]
    assert type(pipe.scheduler).__name__ == "TDMScheduler" and (latents - one_step).abs().max() <= 1e-5
    # the model card's code, where tdm cannot be imported, gives the images of the stock pipeline with the export
    _, code = _card(export)
    seeded = 'generator=torch.Generator().manual_seed(0), output_type="np", '
    code = code.replace("EXPORT_DIR", str(export)).replace(f'pipe(prompt="{CARD_PROMPT}", ',
                                                               f'pipe(prompt="{CARD_PROMPT}", {seeded}')
    assert seeded in code  # the card's call was found and seeded
    script = NO_TDM + code + f"\nnumpy.save({str(tmp_path / 'images.npy')!r}, out[0])\n"
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    pipe, recipe = load_pipeline(export)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(CARD_PROMPT, generator=torch.Generator().manual_seed(0), output_type="np",
                  **sampling_kwargs(recipe))[0]
    assert np.abs(np.load(tmp_path / "images.npy") - images).max() <= 1e-5


def test_bad_inputs_give_one_line_errors(tiny, tmp_path, capsys):
    prompts = tiny.parent / "prompts.txt"
    no_text = shutil.copytree(tiny, tmp_path / "no-text-encoder", ignore=shutil.ignore_patterns("text_encoder"))
    cases = [
        (save_tiny("sd3", tmp_path / "sd3"), [], "is a StableDiffusion3Pipeline, but backbone.name=qwen-image "
                                                 "expects a QwenImagePipeline; for it set backbone.name=sd3"),
        (no_text, [], "no-text-encoder has no text_encoder/ folder (the Qwen2.5-VL text encoder"),
        # 2x2 patches of the tiny VAE's 4x latents: multiples of 8 pixels (16 for Qwen-Image's 8x VAE)
        (tiny, ["backbone.height=36"], "backbone.height: qwen-image needs a multiple of 8 pixels"),
    ]
    capsys.readouterr()
    for folder, extra, expected in cases:
        sets = [f"backbone.teacher={folder}", f"backbone.prompts={prompts}", f"backbone.width={TINY_SIZE}",
                f"backbone.height={TINY_SIZE}", "backbone.dtype=float32", "train.mixed_precision=no",
                "train.iterations=1", *extra]
        code = main(["distill", "--config", PRESET, "--out", str(tmp_path / "x"), *cli_sets(sets)])
        _assert_clear(code, capsys.readouterr().err, tmp_path / "x", expected)


def test_preset_offline_names_the_hub_id(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    sets = [f"backbone.prompts={prompts}", "train.mixed_precision=no"]  # bf16: this process's accelerator is set
    code = main(["distill", "--config", PRESET, "--out", str(tmp_path / "x"), *cli_sets(sets)])
    _assert_clear(code, capsys.readouterr().err, tmp_path / "x", "Qwen/Qwen-Image")


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny, tmp_path):
    """One iteration with and without backbone.gradient_checkpointing: the same adapter gradients and weights
    (the last block's text stream feeds no output: its adapters get no gradient)."""
    assert_checkpointing_changes_nothing(PRESET, overrides(tiny, iterations=1), tmp_path, unused_weights=True)


def test_preset_values():
    config = load_config(PRESET)
    b = config.backbone
    assert (b.name, b.teacher, b.height, b.width, b.negative_prompt) == ("qwen-image", "Qwen/Qwen-Image", 1328, 1328,
                                                                          " ")
    assert b.height % 16 == 0 and b.dtype == "bfloat16" and b.gradient_checkpointing
    assert config.tdm.num_steps == 4 and config.tdm.guidance_scale == 4.0
    assert config.train.roles == "lora" and config.train.lora_rank == 64
