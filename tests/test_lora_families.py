"""Every diffusers family end to end with LoRA roles (train.roles=lora), as a user runs it: the family's preset on
a tiny pipeline, 2 iterations of distillation, resume, `tdm export` of the checkpoint, and the stock pipeline with
the exported LoRA and TDMScheduler reproducing tdm's own sampler on the trained student."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

diffusers = pytest.importorskip("diffusers")

from tdm.checkpoint import checkpoint_name, save_checkpoint  # noqa: E402
from tdm.cli import main  # noqa: E402
from tdm.config import Config, load_config, to_dict  # noqa: E402
from tdm.core.algorithm import make_grid  # noqa: E402
from tdm.core.sampling import rollout  # noqa: E402
from tdm.export import load_pipeline, load_student_lora, read_recipe, sampling_kwargs  # noqa: E402
from tdm.roles import TARGET_GROUPS  # noqa: E402
from tdm.scheduler import TDMScheduler  # noqa: E402
from tdm.trainer import Trainer  # noqa: E402
from tiny_diffusers import BUILDERS, PROMPTS, cli_sets, save_all, tiny_overrides  # noqa: E402

PRESETS = {"sd15": "sd15-lora", "sdxl": "sdxl-lora", "pixart-alpha": "pixart-alpha-1024", "sd3": "sd3-medium-lora",
           "cogvideox": "cogvideox-2b-lora"}
ITERATIONS = 2  # = tiny_diffusers.ITERATIONS, the default of tiny_overrides


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return save_all(root)


def frozen_state(backbone) -> dict[str, torch.Tensor]:
    """Every weight and buffer of the pipeline's modules (network, text encoders), LoRA weights left out."""
    return {f"{name}.{k}": v.detach().clone() for name, module in backbone.pipeline.components.items()
            if isinstance(module, torch.nn.Module) for k, v in module.state_dict().items() if ".lora_" not in k}


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class Run:
    family: str
    trainer: Trainer
    out: Path
    frozen_before: dict[str, torch.Tensor]
    adapters_before: dict[str, dict[str, torch.Tensor]]

    def checkpoint(self, step: int) -> Path:
        return self.out / "checkpoints" / checkpoint_name(step)


@pytest.fixture(scope="module", params=list(BUILDERS))
def trained(request, tiny_dirs, tmp_path_factory):
    """A 2-iteration LoRA-roles distillation of the family's preset, through the Trainer that `tdm distill` runs."""
    family = request.param
    out = tmp_path_factory.mktemp(family) / "run"
    trainer = Trainer(load_config(PRESETS[family], tiny_overrides(family, tiny_dirs)), out)
    frozen = frozen_state(trainer.backbone)
    adapters = {"student": weights(trainer.student), "fake_score": weights(trainer.fake_score),
                "student_ema": weights(trainer.ema)}
    trainer.train()
    yield Run(family, trainer, out, frozen, adapters)
    trainer.close()


def test_distillation_moves_only_the_student_and_fake_adapters(trained):
    trainer, backbone = trained.trainer, trained.trainer.backbone
    assert trainer.config.train.roles == "lora" and trainer.state.step == ITERATIONS
    after = frozen_state(backbone)
    assert after.keys() == trained.frozen_before.keys()
    changed = [k for k, v in trained.frozen_before.items() if not torch.equal(v, after[k])]
    assert not changed, f"frozen weights changed: {changed[:5]}"
    for role, module in (("student", trainer.student), ("fake_score", trainer.fake_score),
                         ("student_ema", trainer.ema)):
        now = module.state_dict()
        assert any(not torch.equal(v, now[k]) for k, v in trained.adapters_before[role].items()), role
        assert all(v.dtype == torch.float32 for v in now.values())
    trainable = {id(p) for m in backbone.pipeline.components.values() if isinstance(m, torch.nn.Module)
                 for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in [*trainer.student.parameters(), *trainer.fake_score.parameters()]}
    # the adapted layers are the family's default targets (SD3: both streams of its joint attention)...
    assert backbone.lora_targets == (("attention", "joint_attention") if trained.family == "sd3" else ("attention",))
    # ... widened by the preset: attention and feed-forward everywhere, LCM-LoRA's layer kinds on the UNets
    targets = trainer.config.train.lora_targets
    assert {"attention", "feedforward"} <= set(targets) and (
        {"conv", "projections", "time_embedding"} <= set(targets) if trained.family in ("sd15", "sdxl") else True)
    patterns = [p for group in targets for p in TARGET_GROUPS[group]]
    layers = {k.split(".lora_")[0] for k in trainer.student.state_dict()}
    assert {p for p in patterns if any(layer.endswith(f".{p}") for layer in layers)} == set(patterns)
    assert all(any(layer.endswith(f".{p}") for p in patterns) for layer in layers)


class SDPACalls(TorchFunctionMode):
    """Counts calls of torch's fused scaled_dot_product_attention (flash / memory-efficient kernels on GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def test_attention_runs_through_torch_sdpa(trained):
    backbone = trained.trainer.backbone
    x, cond = torch.randn(1, *backbone.sample_shape), backbone.encode_prompts(PROMPTS[:1])
    with torch.no_grad(), SDPACalls() as calls:
        trained.trainer.student(x, torch.tensor([500.0]), cond)
    assert calls.count == len(backbone.denoiser.attn_processors) > 0
    assert all(type(p).__name__.endswith("AttnProcessor2_0") for p in backbone.denoiser.attn_processors.values())


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Weights and optimiser states (the global RNG state depends on what ran before in this process)."""
    return {f"{p.name}/{k}": v for p in sorted(path.glob("*.safetensors")) if p.name != "rng.safetensors"
            for k, v in load_file(p).items()}


def test_resume_after_one_iteration_equals_two_iterations(trained, tiny_dirs, tmp_path):
    """`tdm distill --resume` from the first iteration's checkpoint ends bit for bit where the 2-iteration run did."""
    family = trained.family
    code = main(["distill", "--config", PRESETS[family], "--out", str(tmp_path), "--no-report",
                 "--resume", str(trained.checkpoint(1)), *cli_sets(tiny_overrides(family, tiny_dirs))])
    assert code == 0
    a, b = checkpoint_tensors(trained.checkpoint(ITERATIONS)), checkpoint_tensors(tmp_path / "checkpoints" /
                                                                                  checkpoint_name(ITERATIONS))
    assert a.keys() == b.keys()
    assert {k.split("/")[0] for k in a} == {"student.safetensors", "fake_score.safetensors",
                                            "student_ema.safetensors", "generator.optim.safetensors",
                                            "fake_score.optim.safetensors"}
    assert all(".lora_A." in k or ".lora_B." in k for k in a if k.startswith("student.safetensors/"))
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def tdm_latents(trainer, model, noise) -> torch.Tensor:
    """tdm's own K-step sampler on the run's grid."""
    backbone = trainer.backbone
    grid = make_grid(trainer.config.tdm, backbone.schedule)
    with torch.no_grad():
        return rollout(model, noise, backbone.encode_prompts(PROMPTS[:2]), grid, backbone.schedule,
                       backbone.prediction)


def pipeline_latents(pipe, recipe, noise) -> torch.Tensor:
    """The pipeline's latents under the recipe's arguments (with its scheduler's timesteps or sigmas)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPTS[:2], output_type="latent", latents=noise.clone(), **sampling_kwargs(recipe))[0]


def assert_flow_schedulers_reproduce(pipe, export_dir, recipe, noise, expected) -> None:
    """The export's stock FlowMatchEulerDiscreteScheduler and its TDMScheduler each give the pipeline `expected`."""
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(export_dir, subfolder="scheduler")
    assert (pipeline_latents(pipe, recipe, noise) - expected).abs().max() <= 1e-5
    pipe.scheduler = TDMScheduler.from_config(recipe["tdm_scheduler"])  # tdm's arithmetic, given mu as well
    assert (pipeline_latents(pipe, recipe, noise) - expected).abs().max() <= 1e-5


def test_exported_lora_in_the_stock_pipeline_reproduces_the_trained_student(trained, tmp_path):
    """THE round trip: `tdm export` of the checkpoint, the stock pipeline with the LoRA loaded as documented and
    TDMScheduler, guidance 1, the same initial latents == tdm's rollout of the trained student, in fp32."""
    trainer, out = trained.trainer, tmp_path / "export"
    assert main(["export", "--checkpoint", str(trained.checkpoint(ITERATIONS)), "--out", str(out)]) == 0
    noise = torch.randn(2, *trainer.backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    expected = tdm_latents(trainer, trainer.student, noise)
    assert (expected - tdm_latents(trainer, trainer.teacher, noise)).abs().max() > 1e-3  # the student moved

    recipe = read_recipe(out)
    pipe = diffusers.DiffusionPipeline.from_pretrained(recipe["base"], **recipe["pipeline_load_kwargs"])
    if trained.family == "pixart-alpha":  # PixArtAlphaPipeline has no LoRA loader: peft files
        assert recipe["lora"]["format"] == "peft"
        load_student_lora(pipe, out)
    else:
        assert recipe["lora"]["format"] == "diffusers"
        pipe.load_lora_weights(out, adapter_name="tdm")
    pipe.scheduler = TDMScheduler.from_config(recipe["tdm_scheduler"])  # tdm's arithmetic: exact
    assert (pipeline_latents(pipe, recipe, noise) - expected).abs().max() <= 1e-5
    assert recipe["grid"] == list(make_grid(trainer.config.tdm, trainer.backbone.schedule).timesteps)


@pytest.mark.parametrize("trained", ["sd3"], indirect=True)
def test_merged_ema_export_reproduces_the_ema_student(trained, tmp_path):
    trainer, out = trained.trainer, tmp_path / "export"
    assert main(["export", "--checkpoint", str(trained.checkpoint(ITERATIONS)), "--out", str(out), "--ema",
                 "--merged"]) == 0
    noise = torch.randn(2, *trainer.backbone.sample_shape, generator=torch.Generator().manual_seed(1))
    expected = tdm_latents(trainer, trainer.ema, noise)
    assert (expected - tdm_latents(trainer, trainer.student, noise)).abs().max() > 1e-4  # EMA != student
    pipe, recipe = load_pipeline(out, merged=True)
    assert (pipeline_latents(pipe, recipe, noise) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("trained", ["sd15", "pixart-alpha"], indirect=True)
def test_cli_lora_format(trained, tmp_path, capsys):
    """`--lora-format` writes the named format alone, and refuses one the family has no reader for, writing
    nothing."""
    checkpoint, out = str(trained.checkpoint(ITERATIONS)), tmp_path / "export"
    if trained.family == "sd15":
        assert main(["export", "--checkpoint", checkpoint, "--out", str(out), "--lora-format", "kohya"]) == 0
        assert read_recipe(out)["lora"]["files"] == {"kohya": "lora_kohya.safetensors"}
        assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora_kohya.safetensors"]
    else:
        assert main(["export", "--checkpoint", checkpoint, "--out", str(out), "--lora-format", "diffusers"]) == 2
        assert ("--lora-format diffusers: PixArtAlphaPipeline has no load_lora_weights; use peft or all"
                in capsys.readouterr().err) and not out.exists()


@pytest.mark.parametrize("trained", ["sd15"], indirect=True)
def test_export_refuses_another_base(trained, tmp_path, capsys):
    other = diffusers.DiffusionPipeline.from_pretrained(trained.trainer.backbone.source)
    with torch.no_grad():
        other.unet.conv_in.weight.mul_(1.01)  # a fine-tune of the base: same architecture, other weights
    other.save_pretrained(tmp_path / "other")
    code = main(["export", "--checkpoint", str(trained.checkpoint(ITERATIONS)), "--out", str(tmp_path / "x"),
                 "--set", f"backbone.teacher={tmp_path / 'other'}"])
    assert code == 2 and "was trained on another base model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_errors_before_loading_anything(tmp_path, capsys):
    config = to_dict(Config())
    config["backbone"].update(name="sd15", teacher=str(tmp_path / "never-loaded"))
    path = save_checkpoint(tmp_path / "checkpoints", 1, {}, {}, {"torch_rank0": torch.get_rng_state()}, config)
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "x"), "--ema"]) == 2
    assert "--ema" in (err := capsys.readouterr().err) and "train.ema_decay = 0" in err
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "x"),
                 "--set", "tdm.num_steps_set=[1, 2, 4]"]) == 2
    assert "tdm.num_steps_set" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_gradient_checkpointing_gives_the_same_lora_gradients(family, tiny_dirs, tmp_path):
    assert_checkpointing_changes_nothing(PRESETS[family], tiny_overrides(family, tiny_dirs, iterations=1), tmp_path)


def assert_checkpointing_changes_nothing(preset, overrides, tmp_path, unused_weights: bool = False):
    """One training iteration with and without backbone.gradient_checkpointing: the same gradients of both
    adapters and the same updated weights (roles.py recomputes each checkpointed block under its adapter).
    `unused_weights`: some adapter weights feed no output and get no gradient (else every one must have one)."""
    results = []
    for checkpointing in (False, True):
        config = load_config(preset, [*overrides, f"backbone.gradient_checkpointing={str(checkpointing).lower()}"])
        trainer = Trainer(config, tmp_path / str(checkpointing))
        assert trainer.backbone.denoiser.is_gradient_checkpointing is checkpointing
        trainer.train_step()
        params = [(f"{role}/{name}", p) for role, module in (("student", trainer.student), ("fake", trainer.fake_score))
                  for name, p in module.named_parameters()]
        assert unused_weights or all(p.grad is not None for _, p in params)
        results.append({f"{name}/{what}": t.detach().clone() for name, p in params
                        for what, t in (("grad", p.grad), ("weight", p)) if t is not None})
        trainer.close()
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys()
    assert any(v.abs().sum() > 0 for k, v in plain.items() if k.startswith("student/") and k.endswith("/grad"))
    assert not [k for k in plain if not torch.equal(plain[k], checkpointed[k])]


def test_presets_train_lora_roles_with_gradient_checkpointing():
    for family, preset in PRESETS.items():
        config = load_config(preset)
        assert config.backbone.name == family and config.backbone.gradient_checkpointing
        assert config.train.roles == "lora" and config.train.lora_rank >= 1
    full = load_config("pixart-alpha-512")  # the official demo: full fine-tune of float32 copies
    assert full.train.roles == "separate" and full.backbone.dtype == "float32" and full.backbone.gradient_checkpointing
