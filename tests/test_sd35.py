"""SD3.5 on the sd3 family: a tiny MMDiT-X transformer (dual attention, QK-norm) distilled with LoRA roles by the
SD3.5-medium preset, and its export replayed by the stock pipeline."""

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tdm.checkpoint import checkpoint_name  # noqa: E402
from tdm.cli import main  # noqa: E402
from tdm.config import load_config  # noqa: E402
from tdm.export import read_recipe  # noqa: E402
from tdm.scheduler import TDMScheduler  # noqa: E402
from tdm.trainer import Trainer  # noqa: E402
from test_lora_families import ITERATIONS, checkpoint_tensors, pipeline_latents, tdm_latents  # noqa: E402
from tiny_diffusers import PROMPTS, cli_sets, tiny_overrides  # noqa: E402
from tiny_sd35 import save_tiny_sd35  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd35")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    folder = save_tiny_sd35(root / "sd35")
    trainer = Trainer(load_config("sd35-medium-lora", tiny_overrides("sd3", {"sd3": folder})), root / "run")
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.train()
    yield trainer, root / "run", before
    trainer.close()


def test_lora_roles_adapt_the_dual_attention(trained):
    trainer, _, before = trained
    assert trainer.backbone.denoiser.config.dual_attention_layers == [0]
    after = trainer.student.state_dict()
    attn2 = [k for k in after if ".attn2." in k]
    assert {k.split(".attn2.")[1].split(".lora_")[0] for k in attn2} == {"to_q", "to_k", "to_v", "to_out.0"}
    assert any(not torch.equal(before[k], after[k]) for k in attn2 if ".lora_B." in k)  # attn2 trained


def test_export_round_trip(trained, tmp_path):
    trainer, run, _ = trained
    out = tmp_path / "export"
    checkpoint = run / "checkpoints" / checkpoint_name(ITERATIONS)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    noise = torch.randn(2, *trainer.backbone.sample_shape, generator=torch.Generator().manual_seed(0))
    expected = tdm_latents(trainer, trainer.student, noise)
    assert (expected - tdm_latents(trainer, trainer.teacher, noise)).abs().max() > 1e-3  # the student moved
    recipe = read_recipe(out)
    assert recipe["scheduler"]["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(recipe["base"])
    pipe.load_lora_weights(out, adapter_name="tdm")
    stock = pipeline_latents(pipe, recipe, noise)  # the exported stock scheduler
    pipe.scheduler = TDMScheduler.from_config(recipe["tdm_scheduler"])
    assert (pipeline_latents(pipe, recipe, noise) - expected).abs().max() <= 1e-5
    assert (stock - expected).abs().max() <= 1e-5


def test_resume_after_one_iteration_equals_two_iterations(trained, tmp_path):
    trainer, run, _ = trained
    overrides = tiny_overrides("sd3", {"sd3": Path(trainer.config.backbone.teacher)})
    assert main(["distill", "--config", "sd35-medium-lora", "--out", str(tmp_path), "--no-report", "--resume",
                 str(run / "checkpoints" / checkpoint_name(1)), *cli_sets(overrides)]) == 0
    a = checkpoint_tensors(run / "checkpoints" / checkpoint_name(ITERATIONS))
    b = checkpoint_tensors(tmp_path / "checkpoints" / checkpoint_name(ITERATIONS))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("preset", ["sd35-medium-lora", "sd35-large-lora"])
def test_presets(preset):
    config = load_config(preset)
    assert config.backbone.name == "sd3" and config.backbone.teacher.startswith("stabilityai/stable-diffusion-3.5")
    assert config.train.roles == "lora" and config.backbone.gradient_checkpointing
