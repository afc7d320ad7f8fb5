"""Export a trained student for stock diffusers pipelines (method.md Decision 10), and load it back.

An export folder holds:
  pytorch_lora_weights.safetensors   the student LoRA for `pipe.load_lora_weights` (SD1.5/2, SDXL, SD3, CogVideoX)
  student_lora.safetensors +         the student LoRA as a peft state dict and config (PixArt, whose pipeline
    adapter_config.json              has no LoRA loader; see `load_student_lora`)
  unet/ or transformer/              merged (or fully fine-tuned) student weights, `save_pretrained` format
  scheduler/scheduler_config.json    the `TDMScheduler` that replays the student's rollout
  recipe.json                        base pipeline, grid, scheduler config, guidance 1, LoRA scale, pipe kwargs
  README.md                          a model card with the loading code
The folder is written under a temporary name and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .backbones.diffusers_base import DiffusersBackbone, DiffusersDenoiser
from .backbones.diffusers_pipeline import import_diffusers
from .core.algorithm import TDMConfig, make_grid
from .errors import TDMError
from .files import write_text_atomic
from .roles import AdapterView, adapter_weights

RECIPE_FILE = "recipe.json"
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_LORA_FILE = "student_lora.safetensors"
LOADED_ADAPTER = "tdm"  # the adapter name the student gets in the loading pipeline


class ExportError(TDMError, ValueError):
    """A student or export folder that cannot be exported or loaded; the message names it."""


def student_network(student_model: nn.Module) -> nn.Module:
    """The diffusers network inside a student: that of a LoRA role's shared base (`tdm.roles.AdapterView`), a tdm
    adapter's `.model`, or the network itself."""
    if isinstance(student_model, AdapterView):
        student_model = student_model.shared.base
    return student_model.model if isinstance(student_model, DiffusersDenoiser) else student_model


def _lora_config(student_model: nn.Module, network: nn.Module, adapter_name: str):
    """The adapter's peft LoraConfig (rank, alpha, targets), held by the module peft injected it through: the
    network, the tdm adapter around it, or a LoRA role's shared base."""
    holders = [network, student_model.shared.base if isinstance(student_model, AdapterView) else student_model]
    return next(h.peft_config[adapter_name] for h in holders if adapter_name in getattr(h, "peft_config", {}))


def _lora_layers(network: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in network.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


def merged_copy(network: nn.Module, adapter_name: str, scale: float = 1.0) -> nn.Module:
    """A copy of `network` with LoRA `adapter_name` (at `scale`) merged into its weights and every peft layer
    (other adapters, e.g. the fake score's, included) replaced by its base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    network = copy.deepcopy(network)
    for name, module in [(n, m) for n, m in network.named_modules() if isinstance(m, BaseTunerLayer)]:
        if adapter_name in getattr(module, "lora_A", {}):
            module.set_scale(adapter_name, scale)
            module.merge(adapter_names=[adapter_name])
        parent_name, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent_name) if parent_name else network, child, module.get_base_layer())
    network.__dict__.pop("peft_config", None)
    network._hf_peft_config_loaded = False  # a plain diffusers model again
    return network


def _save_lora(backbone: DiffusersBackbone, network: nn.Module, adapter_name: str, config, folder: Path) -> dict:
    """Write the student adapter (peft `config`: its rank and alpha go along as metadata) in the family's loadable
    format; return the recipe's `lora` entry."""
    state = {k: v.detach().cpu().contiguous() for k, v in adapter_weights(network, adapter_name).items()}
    if backbone.lora_layers_kwarg is None:  # no diffusers loader for this family: peft files
        from safetensors.torch import save_file

        save_file(state, folder / PEFT_LORA_FILE)
        config.save_pretrained(folder)  # adapter_config.json
        return {"format": "peft", "file": PEFT_LORA_FILE}
    pipeline_cls = getattr(import_diffusers(), backbone.pipeline_class)
    metadata_kwarg = backbone.lora_layers_kwarg.replace("_lora_layers", "_lora_adapter_metadata")
    pipeline_cls.save_lora_weights(folder, **{backbone.lora_layers_kwarg: state, metadata_kwarg: config.to_dict()},
                                   weight_name=DIFFUSERS_LORA_FILE)
    return {"format": "diffusers", "file": DIFFUSERS_LORA_FILE}


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def refuse_non_empty(out: Path, overwrite: bool) -> None:
    """An export replaces a non-empty folder only when asked to."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty (pass overwrite / --overwrite to replace it)")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    refuse_non_empty(out, overwrite)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def export_student(backbone: DiffusersBackbone, student_model: nn.Module, out_dir: str | Path, *,
                   tdm_config: TDMConfig | None = None, merged: bool = False, lora_scale: float = 1.0,
                   adapter_name: str | None = None, overwrite: bool = False) -> Path:
    """Export `student_model` trained on `tdm_config`'s grid against `backbone`'s teacher; returns the folder.
    `student_model`: a LoRA role (`Roles.lora`'s student or EMA view), a tdm adapter or diffusers network carrying
    the peft LoRA `adapter_name` (default: the view's adapter, else "student"), or a fully fine-tuned network.

    A LoRA student is written as a LoRA (plus merged weights if `merged`); a full student as full weights."""
    from .scheduler import TDMScheduler

    tdm_config = tdm_config or TDMConfig()
    if adapter_name is None:
        adapter_name = student_model.adapter if isinstance(student_model, AdapterView) else "student"
    network = student_network(student_model)
    is_lora = bool(_lora_layers(network, adapter_name))
    if not is_lora and getattr(network, "peft_config", None):
        raise ExportError(f"the student network has peft adapters {sorted(network.peft_config)} but none named "
                          f"{adapter_name!r}")
    grid = make_grid(tdm_config, backbone.schedule)
    scheduler = TDMScheduler.for_student(backbone.pipeline.scheduler, grid, tdm_config.total_steps)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        lora = (_save_lora(backbone, network, adapter_name, _lora_config(student_model, network, adapter_name), tmp)
                if is_lora else None)
        weights = None
        if merged or not is_lora:
            plain = merged_copy(network, adapter_name, lora_scale) if is_lora else network
            plain.save_pretrained(tmp / backbone.denoiser_name)
            weights = backbone.denoiser_name
        scheduler.save_config(tmp / "scheduler")
        recipe = {
            "tdm_export": 1,
            "family": backbone.name,
            "pipeline_class": backbone.pipeline_class,
            "base": backbone.source,
            "pipeline_load_kwargs": backbone.component_overrides(),
            "denoiser": backbone.denoiser_name,
            "denoiser_class": type(network).__name__,
            "lora": None if lora is None else {**lora, "scale": lora_scale},
            "merged_weights": weights,
            "num_inference_steps": grid.num_steps,
            "grid": list(grid.timesteps),
            "prediction_type": backbone.prediction.value,
            "guidance_scale": 1.0,
            "scheduler": dict(scheduler.config),
            "pipeline_kwargs": backbone.pipeline_kwargs(),
            "tdm": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(tdm_config).items()},
        }
        write_text_atomic(tmp / RECIPE_FILE, json.dumps(recipe, indent=2) + "\n")
        write_text_atomic(tmp / "README.md", model_card(recipe))
        _fsync_tree(tmp)
        _move_into_place(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_recipe(export_dir: str | Path) -> dict:
    path = Path(export_dir) / RECIPE_FILE
    try:
        recipe = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: not a tdm export recipe ({err})") from None
    if recipe.get("tdm_export") != 1:
        raise ExportError(f"{path}: not a tdm export recipe (no tdm_export: 1)")
    return recipe


def load_student_lora(pipe, export_dir: str | Path, recipe: dict | None = None) -> None:
    """Load an exported student LoRA into a stock pipeline of its base, as adapter 'tdm' at the recipe's scale."""
    export_dir = Path(export_dir)
    recipe = recipe or read_recipe(export_dir)
    lora = recipe["lora"]
    if lora["format"] == "diffusers":
        pipe.load_lora_weights(export_dir, weight_name=lora["file"], adapter_name=LOADED_ADAPTER)
        pipe.set_adapters([LOADED_ADAPTER], adapter_weights=[lora["scale"]])
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    network = getattr(pipe, recipe["denoiser"])
    inject_adapter_in_model(LoraConfig.from_pretrained(export_dir), network, adapter_name=LOADED_ADAPTER)
    set_peft_model_state_dict(network, load_file(export_dir / lora["file"]), adapter_name=LOADED_ADAPTER)
    for _, layer in _lora_layers(network, LOADED_ADAPTER):
        layer.set_scale(LOADED_ADAPTER, lora["scale"])


def load_pipeline(export_dir: str | Path, *, merged: bool = False, base: str | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """The stock pipeline of an export's base with the student (LoRA, or merged weights if `merged` or the
    export has no LoRA) and `TDMScheduler`; returns (pipe, recipe). `base` overrides the recipe's base."""
    from .scheduler import TDMScheduler

    diffusers = import_diffusers()
    export_dir = Path(export_dir)
    recipe = read_recipe(export_dir)
    if "pipeline_class" not in recipe:  # tdm.network_export: a network, its grid and the backbone config
        raise ExportError(f"{export_dir}: a network export of a {recipe.get('family')} teacher, without a stock "
                          f"pipeline to sample with (load {recipe.get('weights')} as its README.md says)")
    use_weights = merged or recipe["lora"] is None
    if use_weights and not recipe["merged_weights"]:
        raise ExportError(f"{export_dir}: exported without merged weights (export again with --merged)")
    kwargs = dict(recipe["pipeline_load_kwargs"])
    if use_weights:
        network_cls = getattr(diffusers, recipe["denoiser_class"])
        kwargs[recipe["denoiser"]] = network_cls.from_pretrained(export_dir / recipe["merged_weights"], dtype=dtype)
    pipe = getattr(diffusers, recipe["pipeline_class"]).from_pretrained(base or recipe["base"], dtype=dtype,
                                                                        **kwargs)
    if not use_weights:
        try:
            load_student_lora(pipe, export_dir, recipe)
        except (RuntimeError, ValueError, KeyError) as err:  # shapes or names of another architecture
            lines = str(err).strip().splitlines() or [type(err).__name__]
            detail = next((line.strip() for line in lines if "size mismatch" in line), lines[0])[:300]
            raise ExportError(f"{export_dir / recipe['lora']['file']}: this LoRA does not fit the "
                              f"{recipe['denoiser']} of {base or recipe['base']} ({recipe['pipeline_class']}); "
                              f"was it made for another model? ({detail})") from None
    pipe.scheduler = TDMScheduler.from_config(recipe["scheduler"])
    return pipe.to(device), recipe


def model_card(recipe: dict) -> str:
    """README.md of an export: what it is and the code that samples from it."""
    lora = recipe["lora"]
    if lora is None:
        load = (f"{recipe['denoiser']} = diffusers.{recipe['denoiser_class']}.from_pretrained(\"EXPORT_DIR/"
                f"{recipe['merged_weights']}\")\npipe = diffusers.{recipe['pipeline_class']}.from_pretrained("
                f"\"{recipe['base']}\", {recipe['denoiser']}={recipe['denoiser']})")
    elif lora["format"] == "diffusers":
        load = (f"pipe = diffusers.{recipe['pipeline_class']}.from_pretrained(\"{recipe['base']}\")\n"
                f"pipe.load_lora_weights(\"EXPORT_DIR\", adapter_name=\"tdm\")\n"
                f"pipe.set_adapters([\"tdm\"], adapter_weights=[{lora['scale']}])")
    else:
        load = (f"pipe = diffusers.{recipe['pipeline_class']}.from_pretrained(\"{recipe['base']}\")\n"
                f"tdm.export.load_student_lora(pipe, \"EXPORT_DIR\")  # peft: {recipe['pipeline_class']} has no "
                f"load_lora_weights")
    kwargs = ", ".join(f"{k}={v!r}" for k, v in recipe["pipeline_kwargs"].items())
    return f"""# TDM student of `{recipe['base']}`

A {recipe['num_inference_steps']}-step student distilled from `{recipe['base']}` ({recipe['family']}) with
Trajectory Distribution Matching (Luo et al., ICCV 2025, arXiv 2503.06674) with the
`tdm` toolkit. It samples without classifier-free guidance (guidance_scale = 1; guidance is distilled
in) on its training grid {recipe['grid']} ({recipe['prediction_type']} prediction), which `TDMScheduler` replays
exactly inside the stock `{recipe['pipeline_class']}`.

```python
import diffusers{", tdm.export" if lora and lora["format"] == "peft" else ""}
from tdm.scheduler import TDMScheduler

{load}
pipe.scheduler = TDMScheduler.from_pretrained("EXPORT_DIR", subfolder="scheduler")
out = pipe("a photo of a cat", num_inference_steps={recipe['num_inference_steps']}, guidance_scale=1.0, {kwargs})
```

Or: `tdm generate --model EXPORT_DIR --prompt "a photo of a cat" --out samples/`.
`recipe.json` holds everything above (`tdm.export.load_pipeline(EXPORT_DIR)` does it in one call).
"""
