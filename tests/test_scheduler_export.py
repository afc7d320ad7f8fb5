"""TDMScheduler against tdm's own rollout, export of a student, and THE round trip: tdm's rollout of a LoRA
student equals the stock diffusers pipeline with the exported LoRA and TDMScheduler, for every family."""

import copy
import json
import shutil

import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from peft import LoraConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from tdm.backbones.diffusers_schedule import schedule_from_config  # noqa: E402
from tdm.checkpoint import save_checkpoint  # noqa: E402
from tdm.cli import main  # noqa: E402
from tdm.config import Config, to_dict  # noqa: E402
from tdm.core.algorithm import TDMConfig, make_grid  # noqa: E402
from tdm.core.sampling import rollout  # noqa: E402
from tdm.export import ExportError, export_student, load_pipeline, load_student_lora, read_recipe  # noqa: E402
from tdm.generate import generate  # noqa: E402
from tdm.scheduler import TDMScheduler  # noqa: E402
from tiny_diffusers import (  # noqa: E402
    BUILDERS,
    PROMPTS,
    TINY_FRAMES,
    TINY_SIZE,
    load_backbone,
    save_all,
    two_adapter_student,
)

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


def test_step_off_the_grid_is_a_clear_error():
    scheduler = TDMScheduler(timesteps=[899, 449])
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="not on the student grid"):
        scheduler.step(torch.zeros(1, 4), 500, torch.zeros(1, 4))


# ---------------------------------------------------------------- export and the round trip, per family

# the student's grid per family: the official VP grid, the flow grid, CogVideoX's released grid (method.md B)
TRAINED = {"sd15": TDMConfig(num_steps=4, total_steps=900), "sdxl": TDMConfig(num_steps=4, total_steps=900),
           "pixart-alpha": TDMConfig(num_steps=4, total_steps=900), "sd3": TDMConfig(num_steps=2),
           "cogvideox": TDMConfig(num_steps=4, timesteps=(999, 856, 665, 399))}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return save_all(tmp_path_factory.mktemp("tiny"))


def lora_student(backbone):
    """A copy of the teacher carrying a random-init LoRA 'student' (a trained student stand-in) and a
    'fake' one, with 'student' active, as the one-base-two-adapters role strategy leaves it."""
    return two_adapter_student(backbone, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


def tdm_rollout(backbone, model, tdm_config, noise):
    """tdm's own sampler: adapter + encode_prompts + rollout on make_grid."""
    grid = make_grid(tdm_config, backbone.schedule)
    with torch.no_grad():
        return rollout(model, noise, backbone.encode_prompts(PROMPTS[:2]), grid, backbone.schedule,
                       backbone.prediction)


def pipeline_latents(pipe, recipe, noise, steps=None):
    """Latents of the pipeline with TDMScheduler (the stock schedulers: tests/test_export_stock.py)."""
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TDMScheduler.from_config(recipe["tdm_scheduler"])
    return pipe(PROMPTS[:2], num_inference_steps=steps or recipe["num_inference_steps"], guidance_scale=1.0,
                output_type="latent", latents=noise.clone(), **recipe["pipeline_kwargs"])[0]


def noise_for(backbone):
    return torch.randn(2, *backbone.sample_shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", list(BUILDERS))
def test_round_trip_lora_student_in_the_stock_pipeline(family, tiny_dirs, tmp_path):
    """THE round trip: tdm's rollout of a LoRA student == the stock pipeline after export, the family's LoRA
    loading path and TDMScheduler.from_config(recipe), on the same initial latents, guidance 1, fp32."""
    backbone = load_backbone(family, tiny_dirs[family])
    student, noise = lora_student(backbone), noise_for(backbone)
    expected = tdm_rollout(backbone, student, TRAINED[family], noise)
    assert (expected - tdm_rollout(backbone, backbone.teacher, TRAINED[family], noise)).abs().max() > 1e-2

    out = export_student(backbone, student, tmp_path / "export", tdm_config=TRAINED[family])
    recipe = read_recipe(out)
    pipe = diffusers.DiffusionPipeline.from_pretrained(recipe["base"])
    if recipe["lora"]["format"] == "diffusers":  # the documented loading code
        assert family != "pixart-alpha"
        pipe.load_lora_weights(out, adapter_name="tdm")
    else:
        assert family == "pixart-alpha"
        load_student_lora(pipe, out)
    pipe.scheduler = TDMScheduler.from_config(recipe["tdm_scheduler"])
    assert (pipeline_latents(pipe, recipe, noise) - expected).abs().max() <= 1e-5
    assert recipe["grid"] == list(make_grid(TRAINED[family], backbone.schedule).timesteps)
    assert recipe["guidance_scale"] == 1.0 and recipe["prediction_type"] == backbone.prediction.value


@pytest.mark.parametrize("family", ["sd15", "pixart-alpha"])
def test_merged_weights_match_the_lora(family, tiny_dirs, tmp_path):
    backbone = load_backbone(family, tiny_dirs[family])
    student, noise = lora_student(backbone), noise_for(backbone)
    expected = tdm_rollout(backbone, student, TRAINED[family], noise)
    out = export_student(backbone, student, tmp_path / "export", tdm_config=TRAINED[family], merged=True)
    pipe, recipe = load_pipeline(out, merged=True)
    assert not any(isinstance(m, BaseTunerLayer) for m in getattr(pipe, recipe["denoiser"]).modules())
    torch.testing.assert_close(pipeline_latents(pipe, recipe, noise), expected, atol=1e-4, rtol=1e-5)


def test_full_student_exports_weights(tiny_dirs, tmp_path):
    """A fully fine-tuned student (no LoRA) exports as full weights and replays exactly."""
    backbone = load_backbone("sd15", tiny_dirs["sd15"])
    student = copy.deepcopy(backbone.teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    noise = noise_for(backbone)
    out = export_student(backbone, student, tmp_path / "export", tdm_config=TRAINED["sd15"])
    pipe, recipe = load_pipeline(out)
    assert recipe["lora"] is None and recipe["merged_weights"] == "unet"
    assert (pipeline_latents(pipe, recipe, noise) - tdm_rollout(backbone, student, TRAINED["sd15"], noise)).abs(
    ).max() <= 1e-5


def test_export_errors(tiny_dirs, tmp_path):
    backbone = load_backbone("sd15", tiny_dirs["sd15"])
    student = lora_student(backbone)
    with pytest.raises(ExportError, match="none named 'other'"):
        export_student(backbone, student, tmp_path / "a", adapter_name="other")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_student(backbone, student, tmp_path / "b")
    assert [p.name for p in tmp_path.iterdir()] == ["b"] and (tmp_path / "b" / "keep.txt").exists()
    with pytest.raises(ExportError, match="recipe"):
        read_recipe(tmp_path / "b")
    export_student(backbone, student, tmp_path / "b", overwrite=True)
    assert not (tmp_path / "b" / "keep.txt").exists() and read_recipe(tmp_path / "b")["family"] == "sd15"
    with pytest.raises(ExportError, match="--merged"):
        load_pipeline(tmp_path / "b", merged=True)


def test_cli_export_from_checkpoint_then_generate(tiny_dirs, tmp_path):
    """`tdm export` rebuilds the teacher from the checkpoint's config and exports its (full) student;
    `tdm generate` samples PNGs with the stock pipeline."""
    backbone = load_backbone("sd15", tiny_dirs["sd15"])
    student = copy.deepcopy(backbone.teacher)
    with torch.no_grad():
        next(student.parameters()).add_(0.5)
    config = to_dict(Config())
    config["backbone"].update(name="sd15", teacher=str(tiny_dirs["sd15"]), height=16, width=16)
    checkpoint = save_checkpoint(tmp_path / "checkpoints", 7, {"student": student}, {},
                                 {"torch_rank0": torch.get_rng_state()}, config)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    recipe = json.loads((tmp_path / "export" / "recipe.json").read_text())
    assert recipe["grid"] == [899.0, 674.0, 449.0, 224.0] and recipe["merged_weights"] == "unet"
    exported = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet")
    torch.testing.assert_close(next(exported.parameters()), next(student.parameters()), atol=0, rtol=0)
    assert main(["generate", "--model", str(tmp_path / "export"), "--prompt", "a cat", "--prompt", "a dog",
                 "--steps", "2", "--out", str(tmp_path / "samples")]) == 0
    index = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert [(s["file"], s["prompt"], s["seed"], s["steps"]) for s in index] == [("0000.png", "a cat", 0, 2),
                                                                                ("0001.png", "a dog", 1, 2)]
    assert Image.open(tmp_path / "samples" / "0000.png").size == (16, 16)
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # not a checkpoint


def test_generate_video_as_gif(tiny_dirs, tmp_path):
    backbone = load_backbone("cogvideox", tiny_dirs["cogvideox"])
    out = export_student(backbone, lora_student(backbone), tmp_path / "export", tdm_config=TRAINED["cogvideox"])
    (path,) = generate(out, ["a cat"], tmp_path / "samples", device="cpu")
    gif = Image.open(path)
    assert path.suffix == ".gif" and gif.n_frames == TINY_FRAMES and gif.size == (TINY_SIZE["cogvideox"],) * 2


@pytest.fixture(scope="module")
def sd15_export(tiny_dirs, tmp_path_factory):
    backbone = load_backbone("sd15", tiny_dirs["sd15"])
    return export_student(backbone, lora_student(backbone), tmp_path_factory.mktemp("sd15") / "export",
                          tdm_config=TRAINED["sd15"])


@pytest.mark.parametrize("steps", ["-1", "0"])
def test_generate_refuses_fewer_than_one_step(sd15_export, tmp_path, capsys, steps):
    from test_bad_input import _assert_clear

    out = tmp_path / "samples"
    code = main(["generate", "--model", str(sd15_export), "--prompt", "a cat", "--steps", steps, "--out", str(out)])
    _assert_clear(code, capsys.readouterr().err, out, f"--steps must be >= 1, got {steps}")


@pytest.mark.parametrize("other", ["sdxl", "sd3"])  # sdxl: its LoRA's shapes differ; sd3: none of its layers exist
def test_generate_names_a_lora_made_for_another_model(sd15_export, tiny_dirs, tmp_path, capsys, other):
    from test_bad_input import _assert_clear

    backbone = load_backbone(other, tiny_dirs[other])
    foreign = export_student(backbone, lora_student(backbone), tmp_path / other, tdm_config=TRAINED[other])
    mixed = shutil.copytree(sd15_export, tmp_path / "mixed")  # an sd15 export holding the other model's LoRA
    shutil.copy(foreign / "pytorch_lora_weights.safetensors", mixed)
    out = tmp_path / "samples"
    code = main(["generate", "--model", str(mixed), "--prompt", "a cat", "--out", str(out)])
    _assert_clear(code, capsys.readouterr().err, out, "pytorch_lora_weights.safetensors: this LoRA does not fit the "
                  "unet of")
