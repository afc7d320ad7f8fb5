"""Exports that sample with diffusers alone: the stock scheduler `tdm export` writes replays tdm's rollout, the
model card's own code runs in a process where `import tdm` fails, and `--push-to-hub` uploads the folder."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
yaml = pytest.importorskip("yaml")

from tdm.core.algorithm import TDMConfig, make_grid  # noqa: E402
from tdm.export import export_student, load_pipeline, read_recipe, sampling_kwargs  # noqa: E402
from tdm.generate import generate  # noqa: E402
from tdm.model_card import model_card  # noqa: E402
from tdm.scheduler import TDMScheduler  # noqa: E402
from tdm.stock_scheduler import stock_sampling  # noqa: E402
from test_scheduler_export import TRAINED, lora_student  # noqa: E402
from tiny_diffusers import load_backbone  # noqa: E402

PROMPT = "a photo of a cat"


def tdm_images(export_dir, steps=None):
    """Images of tdm's own rollout in the stock pipeline (TDMScheduler, the reference `tdm generate` used before
    stock schedulers), seed 0."""
    pipe, recipe = load_pipeline(export_dir)
    pipe.scheduler = TDMScheduler.from_config(recipe["tdm_scheduler"])
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in sampling_kwargs(recipe, steps).items() if k not in recipe["scheduler_kwargs"]}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)[0]


def exported_images(export_dir, steps=None):
    """Images of the export as `tdm generate` samples it: its own scheduler and recipe, seed 0."""
    pipe, recipe = load_pipeline(export_dir, steps=steps)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np",
                **sampling_kwargs(recipe, steps))[0]


# the scheduler each family's trained grid exports with (tiny teachers' configs, TRAINED grids)
EXPECTED = {"sd15": "DDIMScheduler", "sdxl": "DDIMScheduler", "pixart-alpha": "DDIMScheduler",
            "sd3": "FlowMatchEulerDiscreteScheduler",
            "cogvideox": "TDMScheduler"}  # 999 has alpha = 0 (zero SNR) on a grid DDIM does not space


@pytest.fixture(scope="module")
def exports(tiny_dirs, tmp_path_factory):
    """export(family, **options): a LoRA-student export (default options: a stock scheduler), built once."""
    built = {}

    def export(family, config=None, **options):
        key = (family, config, tuple(sorted(options.items())))
        if key not in built:
            backbone = load_backbone(family, tiny_dirs[family])
            out = tmp_path_factory.mktemp(family) / "export"
            built[key] = export_student(backbone, lora_student(backbone), out, tdm_config=config or TRAINED[family],
                                        **options)
        return built[key]
    return export


@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart-alpha", "sd3"])
def test_stock_scheduler_replays_the_rollout(family, exports, tmp_path):
    out = exports(family)
    recipe = read_recipe(out)
    assert recipe["scheduler"]["_class_name"] == EXPECTED[family]
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == EXPECTED[family]
    expected, images = tdm_images(out), exported_images(out)
    assert np.abs(images - expected).max() <= 1e-5
    (png,) = generate(out, [PROMPT], tmp_path, device="cpu")  # tdm generate: the same arguments, as PNG
    assert np.array_equal(np.asarray(Image.open(png)), (images[0] * 255).round().astype(np.uint8))
    # another K: the exported timesteps are the trained grid's, so tdm generate falls back to TDMScheduler
    assert np.abs(exported_images(out, steps=1) - tdm_images(out, steps=1)).max() == 0


def test_explicit_vp_grid_exports_euler_with_timesteps(exports):
    """A VP grid DDIM does not space (levels 999, 700, 300) replays through EulerDiscreteScheduler's timesteps."""
    out = exports("sd15", config=TDMConfig(num_steps=3, timesteps=(999, 700, 300)))
    recipe = read_recipe(out)
    assert recipe["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
    assert recipe["scheduler_kwargs"] == {"timesteps": [999, 700, 300]}
    assert np.abs(exported_images(out) - tdm_images(out)).max() <= 1e-5


def test_which_grids_have_a_stock_scheduler(tiny_dirs):
    backbone = load_backbone("cogvideox", tiny_dirs["cogvideox"])  # zero terminal SNR, v-prediction

    def stock(config):
        grid = make_grid(config, backbone.schedule)
        return stock_sampling(backbone.pipeline.scheduler, backbone.schedule, "v_prediction", grid)

    uniform = stock(TDMConfig(num_steps=4, total_steps=1000))  # 999, 749, 499, 249: DDIM on the whole table
    assert uniform.class_name == "DDIMScheduler" and uniform.config["num_train_timesteps"] == 1000
    ddim = diffusers.DDIMScheduler.from_config(uniform.config)
    ddim.set_timesteps(4)
    assert ddim.timesteps.tolist() == [999, 749, 499, 249]
    torch.testing.assert_close(ddim.alphas_cumprod, backbone.schedule.alphas_cumprod, atol=1e-6, rtol=0)
    cut = stock(TDMConfig(num_steps=3, total_steps=1000))  # 998, 665, 332: DDIM on the table's first 999 entries
    ddim = diffusers.DDIMScheduler.from_config(cut.config)
    ddim.set_timesteps(3)
    assert ddim.timesteps.tolist() == [998, 665, 332] and ddim.config.num_train_timesteps == 999
    torch.testing.assert_close(ddim.alphas_cumprod, backbone.schedule.alphas_cumprod[:999], atol=1e-6, rtol=0)
    assert stock(TDMConfig(num_steps=3, timesteps=(999, 700, 300))) is None  # alpha(999) = 0 off DDIM's spacing
    assert stock(TDMConfig(num_steps=4, timesteps=(999, 856, 665, 399))) is None  # the released grid
    assert stock(TDMConfig(num_steps=3, timesteps=(998, 700, 300))).class_name == "EulerDiscreteScheduler"


def test_tdm_scheduler_export_on_request(exports):
    out = exports("sd15", scheduler="tdm")
    recipe = read_recipe(out)
    assert recipe["scheduler"]["_class_name"] == "TDMScheduler" and recipe["scheduler_kwargs"] == {}
    assert "--scheduler tdm" in recipe["stock_scheduler"]
    assert TDMScheduler.from_pretrained(out, subfolder="scheduler").config.timesteps == recipe["grid"]


def test_recipe_of_an_older_export_still_loads(exports, tmp_path):
    """An export written before stock schedulers: recipe.json's scheduler is TDMScheduler's config, no class name."""
    import shutil

    out = shutil.copytree(exports("sd15", scheduler="tdm"), tmp_path / "old")
    recipe = json.loads((out / "recipe.json").read_text())
    old = {k: v for k, v in recipe.items() if k not in ("tdm_scheduler", "scheduler_kwargs", "stock_scheduler")}
    old["scheduler"] = {k: v for k, v in recipe["scheduler"].items() if k != "_class_name"}
    (out / "recipe.json").write_text(json.dumps(old))
    assert np.abs(exported_images(out) - tdm_images(exports("sd15"))).max() == 0


def _card(out):
    """(YAML header, python snippet) of an export's README.md."""
    text = (out / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    return header, code


def test_model_card_header_and_recipe(exports):
    out = exports("sd3", license="openrail++")
    recipe = read_recipe(out)
    header, code = _card(out)
    assert "base_model" not in header  # a local folder: a comment to fill in before pushing
    assert f"# base_model: the hub id of {recipe['base']}" in (out / "README.md").read_text()
    assert header["library_name"] == "diffusers"
    assert header["license"] == "openrail++" and header["pipeline_tag"] == "text-to-image"
    assert {"tdm", "lora", "sd3"} <= set(header["tags"])
    assert header["inference"]["parameters"] == {"num_inference_steps": 2, "guidance_scale": 1.0}
    assert "import tdm" not in code and "from tdm" not in code
    assert f"sigmas={recipe['scheduler_kwargs']['sigmas']!r}" in code
    header, _ = _card(exports("sd15"))
    assert header["license"] == "other"  # the placeholder the user sets
    hub_base = {**recipe, "base": "stabilityai/stable-diffusion-3-medium-diffusers"}
    assert yaml.safe_load(model_card(hub_base).split("---\n")[1])["base_model"] == hub_base["base"]


# the model card's own code, run where tdm cannot be imported: a finder that refuses it, ahead of all others
NO_TDM = textwrap.dedent("""
    import importlib.abc, sys
    class NoTDM(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tdm" or name.startswith("tdm."):
                raise ImportError("tdm is blocked in this process")
    sys.meta_path.insert(0, NoTDM())
    try:
        import tdm
    except ImportError:
        pass
    else:
        raise SystemExit("tdm is importable")
    import numpy, torch
    """)


@pytest.mark.parametrize("family", ["sd15", "sd3", "pixart-alpha"])  # VP, flow, the peft LoRA files
def test_model_card_code_runs_with_diffusers_alone(family, exports, tmp_path):
    out = exports(family)
    _, code = _card(out)
    code = code.replace("EXPORT_DIR", str(out)).replace(
        f'pipe(prompt="{PROMPT}", ',
        f'pipe(prompt="{PROMPT}", generator=torch.Generator().manual_seed(0), output_type="np", ')
    assert "generator=" in code
    script = NO_TDM + code + f"\nnumpy.save({str(tmp_path / 'images.npy')!r}, out[0])\n"
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.abs(np.load(tmp_path / "images.npy") - tdm_images(out)).max() <= 1e-5


def test_cli_export_pushes_to_the_hub(tiny_dirs, tmp_path, monkeypatch):
    """`tdm export --push-to-hub REPO` creates the repo and uploads the finished folder (the calls into
    huggingface_hub are recorded at its network boundary: nothing leaves the machine)."""
    import copy

    import huggingface_hub

    from tdm.checkpoint import save_checkpoint
    from tdm.cli import main
    from tdm.config import Config, to_dict

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in folder_path.rglob("*") if p.is_file())
        calls.append(("upload_folder", repo_id, {**kwargs, "files": files}))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    backbone = load_backbone("sd15", tiny_dirs["sd15"])
    config = to_dict(Config())
    config["backbone"].update(name="sd15", teacher=str(tiny_dirs["sd15"]), height=16, width=16)
    checkpoint = save_checkpoint(tmp_path / "checkpoints", 7, {"student": copy.deepcopy(backbone.teacher)}, {},
                                 {"torch_rank0": torch.get_rng_state()}, config)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--scheduler", "tdm",
                 "--license", "creativeml-openrail-m", "--push-to-hub", "me/tdm-sd15", "--private"]) == 0
    assert calls[0] == ("create_repo", "me/tdm-sd15", {"repo_type": "model", "private": True, "exist_ok": True})
    name, repo, kwargs = calls[1]
    assert (name, repo, kwargs["repo_type"]) == ("upload_folder", "me/tdm-sd15", "model") and len(calls) == 2
    assert kwargs["files"] == ["README.md", "recipe.json", "scheduler/scheduler_config.json",
                               "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert _card(out)[0]["license"] == "creativeml-openrail-m"
    assert read_recipe(out)["scheduler"]["_class_name"] == "TDMScheduler"


def test_private_needs_push_to_hub(tmp_path, capsys):
    from tdm.cli import main

    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x"), "--private"]) == 2
    assert "--private: only with --push-to-hub REPO" in capsys.readouterr().err
