"""The z-image family on a tiny real ZImagePipeline (tests/tiny_z_image.py): the network call and CFG as the stock
pipeline computes them, 2 iterations of the preset with LoRA roles, resume, the export round trip, the prompt
cache, a dynamic-shift scheduler, and one-line errors for bad input."""

import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from tdm.checkpoint import checkpoint_name  # noqa: E402
from tdm.cli import main  # noqa: E402
from tdm.config import BackboneConfig, load_config  # noqa: E402
from tdm.core.sampling import guided  # noqa: E402
from tdm.errors import ConfigError  # noqa: E402
from tdm.export import read_recipe  # noqa: E402
from tdm.generate import generate  # noqa: E402
from tdm.registry import build_backbone  # noqa: E402
from tdm.trainer import Trainer  # noqa: E402
from test_lora_families import (  # noqa: E402
    ITERATIONS,
    assert_flow_schedulers_reproduce,
    checkpoint_tensors,
    frozen_state,
    tdm_latents,
    weights,
)
from test_prompt_cache import assert_identical, conditions, encoded_together, no_model_loads  # noqa: E402
from tiny_diffusers import PROMPTS, cli_sets, save_tiny, tiny_overrides  # noqa: E402
from tiny_z_image import SIZE, save_tiny_z_image  # noqa: E402

PRESET = "z-image-lora"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("z-image")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    save_tiny_z_image(root / "z-image")
    return root


def overrides(root: Path, iterations: int = ITERATIONS) -> list[str]:
    # tiny_diffusers' settings for a tiny pipeline at 16 pixels (sd3's size, which is Z-Image's here too)
    return tiny_overrides("sd3", {"sd3": root / "z-image"}, iterations)


def build(folder, **fields):
    return build_backbone(BackboneConfig(**{"name": "z-image", "teacher": str(folder), "height": SIZE, "width": SIZE,
                                            **fields}))


def test_network_call_and_cfg_equal_the_stock_pipeline(root):
    """The stock pipeline's transformer call at its second step (sigma = shift(1/2), tdm's t = 500) with CFG and a
    negative prompt: tdm's teacher gives its negated outputs, and tdm's CFG at w = g + 1 its guided prediction."""
    backbone = build(root / "z-image", negative_prompt="blurry")
    pipe = diffusers.ZImagePipeline.from_pretrained(root / "z-image")
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_hook(lambda module, args, out: calls.append((args, out)))
    seen = []
    pipe.scheduler.step = (lambda step: lambda pred, *a, **k: (seen.append(pred.clone()), step(pred, *a, **k))[1])(
        pipe.scheduler.step)
    g = 3.0
    pipe(PROMPTS[:2], negative_prompt=["blurry"] * 2, height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=g,
         output_type="latent", generator=torch.Generator().manual_seed(0))
    (latents, timestep, _), (out,) = calls[1][0], calls[1][1]
    x, cond = torch.stack(latents[:2]).squeeze(2), backbone.encode_prompts(PROMPTS[:2])
    t = torch.full((2,), 500.0)
    torch.testing.assert_close(timestep[:2], 1 - backbone.schedule.sigma(t), atol=1e-7, rtol=0)
    with torch.no_grad():
        teacher = backbone.teacher(x, t, cond)
        uncond = backbone.teacher(x, t, backbone.null_condition(2))
        cfg = guided(backbone.teacher, backbone.null_condition(2), g + 1)(x, t, cond)
    assert torch.equal(teacher, -torch.stack(out[:2]).squeeze(2))
    assert torch.equal(uncond, -torch.stack(out[2:]).squeeze(2))
    torch.testing.assert_close(cfg, seen[1], atol=1e-6, rtol=0)  # the prediction the scheduler steps with


@pytest.fixture(scope="module")
def trained(root):
    trainer = Trainer(load_config(PRESET, overrides(root)), root / "run")
    frozen, student = frozen_state(trainer.backbone), weights(trainer.student)
    trainer.train()
    yield trainer, frozen, student
    trainer.close()


def test_distillation_with_lora_roles(trained):
    trainer, frozen, student = trained
    assert trainer.state.step == ITERATIONS and trainer.config.train.roles == "lora"
    assert trainer.backbone.denoiser.is_gradient_checkpointing
    after = frozen_state(trainer.backbone)
    assert not [k for k, v in frozen.items() if not torch.equal(v, after[k])]
    now = trainer.student.state_dict()
    assert any(not torch.equal(v, now[k]) for k, v in student.items())
    patterns = ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    layers = {k.split(".lora_")[0] for k in now}  # attention and the SwiGLU feed-forward, in every block
    assert {next(p for p in patterns if layer.endswith(f".{p}")) for layer in layers} == set(patterns)
    blocks = [m for m in trainer.backbone.denoiser.modules() if type(m).__name__ == "ZImageTransformerBlock"]
    assert len(layers) == len(patterns) * len(blocks) == 7 * 4  # 1 noise + 1 context refiner + 2 main blocks


def test_resume_after_one_iteration_equals_two_iterations(trained, root, tmp_path):
    assert main(["distill", "--config", PRESET, "--out", str(tmp_path), "--no-report", "--resume",
                 str(root / "run" / "checkpoints" / checkpoint_name(1)), *cli_sets(overrides(root))]) == 0
    a = checkpoint_tensors(root / "run" / "checkpoints" / checkpoint_name(ITERATIONS))
    b = checkpoint_tensors(tmp_path / "checkpoints" / checkpoint_name(ITERATIONS))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


def test_export_round_trip(trained, root, tmp_path):
    """`tdm export`; ZImagePipeline.load_lora_weights with the stock scheduler, and with TDMScheduler, at the
    recipe's guidance_scale 0 (one unguided branch) == tdm's rollout of the trained student."""
    trainer, out = trained[0], tmp_path / "export"
    assert main(["export", "--checkpoint", str(root / "run" / "checkpoints" / checkpoint_name(ITERATIONS)),
                 "--out", str(out)]) == 0
    noise = torch.randn(2, *trainer.backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    expected = tdm_latents(trainer, trainer.student, noise)
    assert (expected - tdm_latents(trainer, trainer.teacher, noise)).abs().max() > 1e-3  # the student moved
    recipe = read_recipe(out)
    assert recipe["guidance_scale"] == 0.0 and recipe["lora"]["format"] == "diffusers"
    assert recipe["scheduler"]["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    pipe = diffusers.ZImagePipeline.from_pretrained(recipe["base"])
    pipe.load_lora_weights(out, adapter_name="tdm")
    assert_flow_schedulers_reproduce(pipe, out, recipe, noise, expected)
    (png,) = generate(out, PROMPTS[:1], tmp_path / "samples", device="cpu")  # tdm generate on the export
    assert Image.open(png).size == (SIZE, SIZE)


def test_cached_conditioning_equals_encoding_in_memory(root, tmp_path, monkeypatch, capsys):
    prompts, cache = root / "prompts.txt", tmp_path / "cache"
    memory = build(root / "z-image", prompts=str(prompts))
    expected = encoded_together(memory, [*PROMPTS, ""])
    args = ["cache-prompts", "--family", "z-image", "--model", str(root / "z-image"), "--prompts", str(prompts),
            "--out", str(cache)]
    assert main(args) == 0 and "4 encoded" in capsys.readouterr().out
    with no_model_loads(monkeypatch):  # all cached: the Qwen3 encoder is never loaded
        cached = build(root / "z-image", prompts=str(prompts), prompt_cache=str(cache))
        assert_identical(conditions(cached), expected)
    assert expected["sample"]["prompt_mask"].dtype == torch.bool


def test_dynamic_shift_is_resolved_at_the_resolution(tmp_path):
    """A use_dynamic_shifting config: tdm's schedule at 16 pixels (4 x 4 latent patches) is the stock scheduler
    given the pipeline's mu for that size."""
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    backbone = build(save_tiny_z_image(tmp_path / "dynamic", dynamic=True))
    mu = calculate_shift(16)
    assert math.isclose(backbone.schedule.shift, math.exp(mu))
    stock = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    stock.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)
    t = torch.tensor([1000.0, 750.0, 500.0, 250.0])
    torch.testing.assert_close(backbone.schedule.sigma(t), stock.sigmas[:-1], atol=1e-6, rtol=0)


def one_line_error(folder, match, **fields):
    with pytest.raises(ConfigError, match=match) as err:
        build(folder, **fields)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_input(root, tmp_path):
    sd3 = save_tiny("sd3", tmp_path / "sd3")
    one_line_error(sd3, "is a StableDiffusion3Pipeline, but backbone.name=z-image expects a ZImagePipeline; for it "
                        "set backbone.name=sd3")
    shutil.copytree(root / "z-image", tmp_path / "no-encoder")
    shutil.rmtree(tmp_path / "no-encoder" / "text_encoder")
    one_line_error(tmp_path / "no-encoder", "no-encoder has no text_encoder/", prompts=str(root / "prompts.txt"))
    one_line_error(root / "z-image", r"backbone.height: z-image needs a multiple of 4 pixels .* got 18",
                   height=18)
    shutil.copytree(root / "z-image", tmp_path / "Z-Image-Turbo")
    one_line_error(tmp_path / "Z-Image-Turbo", "already an 8-step distilled student")


def test_preset_offline_names_the_hub_id(root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["distill", "--config", PRESET, "--out", str(tmp_path / "run"),
                 "--set", f"backbone.prompts={root / 'prompts.txt'}", "--set", "train.mixed_precision=no"])
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # beside hub warnings
    assert code == 2 and error.startswith("tdm: error: backbone.teacher: ") and "Tongyi-MAI/Z-Image:" in error


def test_gradient_checkpointing_gives_the_same_lora_gradients(root, tmp_path):
    """One iteration with and without backbone.gradient_checkpointing: the same gradients of both adapters."""
    grads = []
    for checkpointing in (False, True):
        config = load_config(PRESET, [*overrides(root, iterations=1),
                                      f"backbone.gradient_checkpointing={str(checkpointing).lower()}"])
        trainer = Trainer(config, tmp_path / str(checkpointing))
        assert trainer.backbone.denoiser.is_gradient_checkpointing is checkpointing
        trainer.train_step()
        grads.append({f"{role}/{name}": p.grad.clone() for role, module in (("student", trainer.student),
                                                                            ("fake", trainer.fake_score))
                      for name, p in module.named_parameters()})
        trainer.close()
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and any(v.abs().sum() > 0 for v in plain.values())
    assert not [k for k in plain if not torch.equal(plain[k], checkpointed[k])]
