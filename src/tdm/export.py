"""Export a trained student for stock diffusers pipelines (method.md Decision 10), and load it back.

An export folder holds:
  the student LoRA, in the formats `lora_format` names (default all that apply; `tdm.lora_files` has the table):
    pytorch_lora_weights.safetensors   diffusers: `pipe.load_lora_weights` (SD1.5/2, SDXL, SD3, CogVideoX)
    adapter_model.safetensors +        peft: `PeftModel.from_pretrained(network, EXPORT_DIR)` (every family; tdm
      adapter_config.json              loads it into PixArt, whose pipeline has no LoRA loader)
    lora_kohya.safetensors             kohya keys with `.alpha` tensors: ComfyUI, A1111 (SD1.5, SDXL, SD3)
  unet/ or transformer/              merged (or fully fine-tuned) student weights, `save_pretrained` format
  scheduler/scheduler_config.json    the scheduler that replays the student's rollout: by default a stock diffusers
                                     one (`tdm.stock_scheduler`), so sampling needs diffusers alone; or `TDMScheduler`
  recipe.json                        base pipeline, grid, both scheduler configs, the `pipe(...)` arguments
                                     (steps, timesteps or sigmas, guidance off), LoRA scale
  README.md                          a Hugging Face model card with the loading code (`tdm.model_card`)
The folder is written under a temporary name and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
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
from .lora_files import KOHYA_IN_DIFFUSERS, StudentLora, formats_for, read_peft_weights, write_lora
from .model_card import model_card
from .roles import AdapterView
from .stock_scheduler import stock_sampling

RECIPE_FILE = "recipe.json"
LOADED_ADAPTER = "tdm"  # the adapter name the student gets in the loading pipeline
SCHEDULERS = ("stock", "tdm")  # what scheduler/ holds: a stock diffusers scheduler where one is exact, or TDMScheduler


class ExportError(TDMError, ValueError):
    """A student or export folder that cannot be exported or loaded; the message names it."""


def student_network(student_model: nn.Module) -> nn.Module:
    """The diffusers network inside a student: that of a LoRA role's shared base (`tdm.roles.AdapterView`), a tdm
    adapter's `.model`, or the network itself."""
    if isinstance(student_model, AdapterView):
        student_model = student_model.shared.base
    return student_model.model if isinstance(student_model, DiffusersDenoiser) else student_model


def other_experts(student_model: nn.Module) -> dict[str, nn.Module]:
    """The networks a multi-expert student routes to besides `student_network`'s, by pipeline component
    (Wan 2.2 A14B: {"transformer_2": ...}); {} for one network."""
    base = student_model.shared.base if isinstance(student_model, AdapterView) else student_model
    return dict(getattr(base, "other_experts", {}))


def _accepts(pipeline, kwargs: dict) -> bool:
    """Whether the pipeline's `__call__` takes every argument in `kwargs` (WanPipeline takes no `sigmas`)."""
    parameters = inspect.signature(type(pipeline).__call__).parameters
    return all(key in parameters for key in kwargs)


def expert_lora_folder(component: str) -> str:
    """The export subfolder holding the LoRA of expert `component` (same file names as the main LoRA)."""
    return f"lora_{component}"


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
                   adapter_name: str | None = None, overwrite: bool = False, lora_format: str = "all",
                   scheduler: str = "stock", license: str | None = None) -> Path:
    """Export `student_model` trained on `tdm_config`'s grid against `backbone`'s teacher; returns the folder.
    `student_model`: a LoRA role (`Roles.lora`'s student or EMA view), a tdm adapter or diffusers network carrying
    the peft LoRA `adapter_name` (default: the view's adapter, else "student"), or a fully fine-tuned network.

    A LoRA student is written as a LoRA in `lora_format` (diffusers | peft | kohya | all: every format a tool reads
    for the family), plus merged weights if `merged`; a full student as full weights.
    `scheduler`: "stock" writes the stock diffusers scheduler that replays the grid (TDMScheduler where none is
    exact; the recipe says why), "tdm" writes TDMScheduler. `license`: the model card's license id."""
    from .scheduler import TDMScheduler

    if scheduler not in SCHEDULERS:
        raise ExportError(f"scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
    tdm_config = tdm_config or TDMConfig()
    if adapter_name is None:
        adapter_name = student_model.adapter if isinstance(student_model, AdapterView) else "student"
    network = student_network(student_model)
    experts = other_experts(student_model)
    is_lora = bool(_lora_layers(network, adapter_name))
    if not is_lora and getattr(network, "peft_config", None):
        raise ExportError(f"the student network has peft adapters {sorted(network.peft_config)} but none named "
                          f"{adapter_name!r}")
    if is_lora:
        formats = formats_for(lora_format, backbone.pipeline_class, backbone.lora_layers_kwarg)
    grid = make_grid(tdm_config, backbone.schedule)
    tdm_scheduler = TDMScheduler.for_student(backbone.pipeline.scheduler, grid, tdm_config.total_steps)
    stock = stock_sampling(backbone.pipeline.scheduler, backbone.schedule, backbone.prediction.value, grid) \
        if scheduler == "stock" else None
    refused = stock is not None and not _accepts(backbone.pipeline, stock.pipeline_kwargs)
    if refused:  # the stock scheduler needs arguments the pipeline cannot pass: TDMScheduler alone replays the grid
        stock = None
    if stock is None:
        written, scheduler_kwargs = tdm_scheduler, {}
    else:
        written = getattr(import_diffusers(), stock.class_name).from_config(stock.config)
        scheduler_kwargs = stock.pipeline_kwargs
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        lora = (write_lora(StudentLora.of(network, adapter_name, _lora_config(student_model, network, adapter_name)),
                           tmp, formats, backbone.pipeline_class, backbone.lora_layers_kwarg) if is_lora else None)
        for component, expert in experts.items() if is_lora else ():  # each expert's LoRA, files alike
            (tmp / expert_lora_folder(component)).mkdir()
            write_lora(StudentLora.of(expert, adapter_name, _lora_config(student_model, network, adapter_name)),
                       tmp / expert_lora_folder(component), formats, backbone.pipeline_class,
                       backbone.lora_layers_kwarg)
        weights = None
        if merged or not is_lora:
            plain = merged_copy(network, adapter_name, lora_scale) if is_lora else network
            plain.save_pretrained(tmp / backbone.denoiser_name)
            weights = backbone.denoiser_name
            for component, expert in experts.items():  # every expert's weights under its component's name
                (merged_copy(expert, adapter_name, lora_scale) if is_lora else expert).save_pretrained(tmp / component)
        written.save_config(tmp / "scheduler")
        recipe = {
            "tdm_export": 1,
            "family": backbone.name,
            "pipeline_class": backbone.pipeline_class,
            "base": backbone.source,
            "pipeline_load_kwargs": backbone.component_overrides(),
            "denoiser": backbone.denoiser_name,
            "denoiser_class": type(network).__name__,
            "lora": None if lora is None else {**lora, "scale": lora_scale},
            "expert_loras": {component: expert_lora_folder(component) for component in experts} if is_lora else {},
            "merged_weights": weights,
            "merged_experts": list(experts) if weights else [],
            "num_inference_steps": grid.num_steps,
            "grid": list(grid.timesteps),
            "prediction_type": backbone.prediction.value,
            "guidance_scale": backbone.unguided_scale,
            "scheduler": _config_of(written),
            "scheduler_kwargs": scheduler_kwargs,
            "stock_scheduler": None if stock is not None else (
                "not asked for (--scheduler tdm)" if scheduler == "tdm" else
                f"{backbone.pipeline_class} cannot pass the timesteps or sigmas a stock scheduler needs for this "
                f"grid" if refused else
                "none replays this grid exactly: a level with alpha = 0 (zero terminal SNR) outside a grid DDIM "
                "spaces itself"),
            "tdm_scheduler": _config_of(tdm_scheduler),
            "pipeline_kwargs": backbone.pipeline_kwargs(),
            "tdm": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(tdm_config).items()},
        }
        write_text_atomic(tmp / RECIPE_FILE, json.dumps(recipe, indent=2) + "\n")
        write_text_atomic(tmp / "README.md", model_card(recipe, license))
        _fsync_tree(tmp)
        _move_into_place(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _config_of(scheduler) -> dict:
    return {"_class_name": type(scheduler).__name__,
            **{k: v for k, v in scheduler.config.items() if k != "_use_default_values"}}


def read_recipe(export_dir: str | Path) -> dict:
    path = Path(export_dir) / RECIPE_FILE
    try:
        recipe = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: not a tdm export recipe ({err})") from None
    if recipe.get("tdm_export") != 1:
        raise ExportError(f"{path}: not a tdm export recipe (no tdm_export: 1)")
    if "tdm_scheduler" not in recipe:  # written before stock schedulers: its scheduler is TDMScheduler's
        recipe["tdm_scheduler"] = {"_class_name": "TDMScheduler", **recipe["scheduler"]}
        recipe.update(scheduler=recipe["tdm_scheduler"], scheduler_kwargs={})
    return recipe


def sampling_kwargs(recipe: dict, steps: int | None = None) -> dict:
    """The `pipe(...)` arguments of the export's sampling recipe at `steps` (default: the trained K): steps,
    guidance 1, the pipeline's size and text arguments, and the exported scheduler's timesteps or sigmas (at the
    trained K only; `load_pipeline` gives another K TDMScheduler)."""
    steps = steps or recipe["num_inference_steps"]
    own = recipe["scheduler_kwargs"] if steps == recipe["num_inference_steps"] else {}
    return {"num_inference_steps": steps, "guidance_scale": recipe["guidance_scale"], **recipe["pipeline_kwargs"],
            **own}


def load_student_lora(pipe, export_dir: str | Path, recipe: dict | None = None) -> None:
    """Load an exported student LoRA into a stock pipeline of its base, as adapter 'tdm' at the recipe's scale."""
    export_dir = Path(export_dir)
    recipe = recipe or read_recipe(export_dir)
    lora = recipe["lora"]
    if lora["format"] == "kohya" and recipe["pipeline_class"] not in KOHYA_IN_DIFFUSERS:
        raise ExportError(f"{export_dir}: holds the LoRA only in kohya format, which {recipe['pipeline_class']}."
                          f"load_lora_weights does not read (export with --lora-format diffusers, peft or all)")
    experts = recipe.get("expert_loras", {})  # Wan 2.2 A14B: transformer_2's LoRA, loaded with load_into_...
    if lora["format"] in ("diffusers", "kohya"):
        pipe.load_lora_weights(export_dir, weight_name=lora["file"], adapter_name=LOADED_ADAPTER)
        for component, folder in experts.items():
            pipe.load_lora_weights(export_dir / folder, weight_name=lora["file"], adapter_name=LOADED_ADAPTER,
                                   **{f"load_into_{component}": True})
        pipe.set_adapters([LOADED_ADAPTER], adapter_weights=[lora["scale"]])
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    for component, folder in [(recipe["denoiser"], export_dir), *((c, export_dir / f) for c, f in experts.items())]:
        network = getattr(pipe, component)
        inject_adapter_in_model(LoraConfig.from_pretrained(folder), network, adapter_name=LOADED_ADAPTER)
        set_peft_model_state_dict(network, read_peft_weights(folder / lora["file"]), adapter_name=LOADED_ADAPTER)
        for _, layer in _lora_layers(network, LOADED_ADAPTER):
            layer.set_scale(LOADED_ADAPTER, lora["scale"])


def load_pipeline(export_dir: str | Path, *, merged: bool = False, base: str | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", steps: int | None = None):
    """The stock pipeline of an export's base with the student (LoRA, or merged weights if `merged` or the
    export has no LoRA) and the export's scheduler; returns (pipe, recipe). `base` overrides the recipe's base.
    `steps` other than the trained K gives `TDMScheduler` (a stock scheduler's timesteps are the trained grid's;
    TDMScheduler samples tdm's grid for any K). Sample with `pipe(prompt, **sampling_kwargs(recipe,
    steps))`."""
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
        for component in recipe.get("merged_experts", []):
            kwargs[component] = network_cls.from_pretrained(export_dir / component, dtype=dtype)
    pipe = getattr(diffusers, recipe["pipeline_class"]).from_pretrained(base or recipe["base"], dtype=dtype,
                                                                        **kwargs)
    if not use_weights:
        try:
            load_student_lora(pipe, export_dir, recipe)
        except ExportError:
            raise
        except (RuntimeError, ValueError, KeyError) as err:  # shapes or names of another architecture
            lines = str(err).strip().splitlines() or [type(err).__name__]
            detail = next((line.strip() for line in lines if "size mismatch" in line), lines[0])[:300]
            raise ExportError(f"{export_dir / recipe['lora']['file']}: this LoRA does not fit the "
                              f"{recipe['denoiser']} of {base or recipe['base']} ({recipe['pipeline_class']}); "
                              f"was it made for another model? ({detail})") from None
    own_grid = steps in (None, recipe["num_inference_steps"])
    config = recipe["scheduler"] if own_grid else recipe["tdm_scheduler"]
    cls = TDMScheduler if config["_class_name"] == "TDMScheduler" else getattr(diffusers, config["_class_name"])
    pipe.scheduler = cls.from_config(config)
    return pipe.to(device), recipe
