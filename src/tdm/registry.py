"""The explicit map from a config's `backbone.name` to the family that builds it: above the families and the toys,
which know nothing of it (nor of the config)."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from .backbones.base import Backbone
from .backbones.diffusers_pipeline import OtherFamilyPipeline
from .config import BackboneConfig
from .core.prediction import PredictionType
from .data import EmbeddingCacheError, PromptSourceError, load_prompts
from .data.conditioning import prompt_encoder
from .data.text_encoders import TEXT_ENCODERS, TextEncoderError, TextEncoderFamily
from .errors import ConfigError, TDMError

if TYPE_CHECKING:
    from .backbones.diffusers_base import DiffusersBackbone


def _toy_gmm(config: BackboneConfig) -> Backbone:
    from .toys.gmm import GMMBackbone

    if config.teacher not in ("", "exact", "mlp"):
        raise ConfigError(f"backbone.teacher: toy-gmm takes exact or mlp, got {config.teacher!r}")
    if config.prediction not in ("", *(p.value for p in PredictionType)):
        raise ConfigError(f"backbone.prediction must be one of {[p.value for p in PredictionType]}, "
                          f"got {config.prediction!r}")
    return GMMBackbone(teacher=config.teacher or "exact", prediction=config.prediction or "v_prediction")


def _digits(config: BackboneConfig) -> Backbone:
    from .toys.digits import DigitsBackbone

    if config.prediction not in ("", "epsilon"):
        raise ConfigError(f"backbone.prediction: the digits teacher predicts epsilon, got {config.prediction!r}")
    if config.teacher and not Path(config.teacher).is_file():
        raise ConfigError(f"backbone.teacher: {config.teacher} is not a file (expected a digits teacher "
                          f".safetensors with its .json next to it)")
    try:
        return DigitsBackbone(teacher_path=config.teacher or None)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"backbone.teacher: cannot load {config.teacher or 'the shipped teacher'}: {first}") from None


def _diffusers_denoiser(config: BackboneConfig) -> Backbone:
    from .backbones.diffusers_denoiser import DiffusersDenoiserBackbone

    if not config.teacher:
        raise ConfigError("backbone.teacher: diffusers-denoiser needs the folder of a UNet2DModel or "
                          "DiTTransformer2DModel saved with save_pretrained (or a pipeline folder holding one)")
    for key in ("prediction", "prompts", "height", "width"):
        if getattr(config, key):
            raise ConfigError(f"backbone.{key}: diffusers-denoiser takes it from the network and its scheduler "
                              f"config; leave it unset")
    try:
        return DiffusersDenoiserBackbone.from_folder(config.teacher, config.scheduler, getattr(torch, config.dtype))
    except TDMError:
        raise
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"backbone.teacher: cannot load the diffusers network in {config.teacher}: {first}") from None


# diffusers teacher families: backbone.name -> (module of tdm.backbones, class), imported on first use
DIFFUSERS_FAMILIES: dict[str, tuple[str, str]] = {
    "sd15": ("sd_unet", "SDBackbone"),
    "sdxl": ("sdxl", "SDXLBackbone"),
    "pixart-alpha": ("pixart", "PixArtAlphaBackbone"),
    "sd3": ("sd3", "SD3Backbone"),
    "cogvideox": ("cogvideox", "CogVideoXBackbone"),
    "z-image": ("z_image", "ZImageBackbone"),
    "flux": ("flux", "FluxBackbone"),
    "flux2-klein": ("flux2_klein", "Flux2KleinBackbone"),
    "wan": ("wan", "WanBackbone"),
    "qwen-image": ("qwen_image", "QwenImageBackbone"),
}


def diffusers_family(name: str) -> type[DiffusersBackbone]:
    module, cls = DIFFUSERS_FAMILIES[name]
    return getattr(importlib.import_module(f"{__package__}.backbones.{module}"), cls)


def family_of_pipeline(pipeline_class: str | None) -> str | None:
    """The backbone.name whose stock pipeline is `pipeline_class`, if any."""
    return next((name for name in DIFFUSERS_FAMILIES if diffusers_family(name).pipeline_class == pipeline_class), None)


def _training_prompts(config: BackboneConfig) -> list[str]:
    if not config.prompts:
        return []
    try:
        return load_prompts(config.prompts, column=config.prompt_column or None,
                            keep_duplicates=config.keep_duplicate_prompts)
    except PromptSourceError as err:
        raise ConfigError(f"backbone.{err}") from None  # the message starts with "prompts: <path>"


def _load_diffusers(config: BackboneConfig) -> Backbone:
    """A diffusers teacher family's `from_pretrained` on the config's pipeline, on the current accelerator
    device (the trainer builds the backbone after accelerate's set-up has chosen it)."""
    if not config.teacher:
        raise ConfigError(f"backbone.teacher: {config.name} needs a diffusers pipeline (a hub id or a local "
                          f"folder saved with save_pretrained)")
    if config.prediction:
        raise ConfigError(f"backbone.prediction: {config.name} takes the teacher's prediction type from its "
                          f"scheduler config; leave it empty")
    if config.prompt_cache and Path(config.prompt_cache).is_file():
        raise ConfigError(f"backbone.prompt_cache: {config.prompt_cache} is a file (expected a cache folder)")
    cls = diffusers_family(config.name)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    try:
        return cls.from_pretrained(config.teacher, prompts=_training_prompts(config), height=config.height,
                                   width=config.width, negative_prompt=config.negative_prompt or None,
                                   dtype=getattr(torch, config.dtype), device=device,
                                   prompt_cache=config.prompt_cache,
                                   **{key: getattr(config, key) for key in cls.init_kwargs()})
    except EmbeddingCacheError as err:
        raise ConfigError(f"backbone.prompt_cache: {err}") from None
    except OtherFamilyPipeline as err:  # the family knows what it expects; the registry knows who loads it
        fits = family_of_pipeline(err.found)
        hint = f"for it set backbone.name={fits}" if fits else "no tdm family loads it"
        raise ConfigError(f"{err}; {hint}") from None
    except TDMError:
        raise
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"backbone.teacher: cannot load the {config.name} pipeline {config.teacher}: "
                          f"{first}") from None


def _pipeline_prompt_encoder(name: str) -> TextEncoderFamily:
    """`tdm cache-prompts --family NAME`: the family's own prompt encoding, so the cache is the one its backbone
    reads (same `TextEncoding.fingerprint`), for the family's default arguments (SD3: with T5)."""

    def on_pipeline(folder: Path, read: Callable):
        try:
            return read(diffusers_family(name).text_encoding({}))
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise TextEncoderError(f"--model {folder}: cannot read the text encoders of a {name} pipeline "
                                   f"folder: {first}") from None

    return TextEncoderFamily(
        fetch=lambda model: diffusers_family(name).text_encoding({}).fetch(model),
        fingerprint=lambda folder, dtype: on_pipeline(folder, lambda text: text.fingerprint(folder, dtype)),
        load=lambda folder, device, dtype: on_pipeline(
            folder, lambda text: prompt_encoder(text, folder, device, dtype)))


# what `tdm cache-prompts --family` accepts: the plain CLIP encoder of tdm.data and every diffusers family
PROMPT_ENCODERS: dict[str, TextEncoderFamily] = {
    **TEXT_ENCODERS, **{name: _pipeline_prompt_encoder(name) for name in DIFFUSERS_FAMILIES}}


def check_training_inputs(config: BackboneConfig) -> None:
    """What training needs beyond what loading the teacher does, checked before anything loads."""
    if config.name in DIFFUSERS_FAMILIES and not config.prompts:
        raise ConfigError(f"backbone.prompts: training the {config.name} teacher needs prompts (a .txt file, one per "
                          f"line, a .jsonl / .csv / .parquet table or a folder of them)")


BACKBONES: dict[str, Callable[[BackboneConfig], Backbone]] = {
    "toy-gmm": _toy_gmm,
    "digits": _digits,
    **dict.fromkeys(DIFFUSERS_FAMILIES, _load_diffusers),
    "diffusers-denoiser": _diffusers_denoiser,
}

ENTRY_POINT_GROUP = "tdm.backbones"  # installed packages name their Backbone classes or factories here


def import_target(path: str, field: str = "backbone.name", example: str = "mypkg.teachers:MyBackbone") -> object:
    """`module:Name` (or `module:Outer.Name`) -> the object, imported with the current folder on sys.path (as
    uvicorn resolves `module:app`), so a teachers.py next to the run's command imports. Errors name `field`."""
    module, _, attribute = path.partition(":")
    if not module or not attribute:
        raise ConfigError(f"{field}: {path!r} is not an import path (expected module:Name, e.g. {example})")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{field}: cannot import module {module!r} of {path!r}: {err}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{field}: module {module!r} has no {attribute!r} (from {path!r})")
        target = getattr(target, part)
    return target


def _entry_point(name: str) -> object | None:
    """The object an installed package registers as `name` in the `tdm.backbones` entry-point group, if any."""
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        return None
    point = next(iter(found))
    try:
        return point.load()
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"backbone.name: the {ENTRY_POINT_GROUP} entry point {name!r} ({point.value}) does not "
                          f"load: {err}") from None


def own_backbone_target(name: str) -> object | None:
    """What a `backbone.name` outside the built-in families names: an import path `module:Name` or an entry
    point of the `tdm.backbones` group (a `Backbone` subclass or a factory returning one); None if neither."""
    return import_target(name) if ":" in name else _entry_point(name)


def _build_own(name: str, target: object, config: BackboneConfig) -> Backbone:
    """Call `target` with the run's BackboneConfig (or with nothing, if it takes no argument) and check that it
    made a Backbone."""
    if not callable(target):
        raise ConfigError(f"backbone.name: {name!r} names a {type(target).__name__}, not a Backbone subclass or a "
                          f"function returning one")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        signature = None
    args = (config,)
    if signature is not None:
        try:
            signature.bind(config)
        except TypeError:
            try:
                signature.bind()
                args = ()
            except TypeError:
                raise ConfigError(f"backbone.name: {name!r} must take the BackboneConfig as its only argument, "
                                  f"or no argument; its signature is {signature}") from None
    backbone = target(*args)
    if not isinstance(backbone, Backbone):
        raise ConfigError(f"backbone.name: {name!r} made a {type(backbone).__name__}, not a tdm Backbone "
                          f"(subclass tdm.backbones.base.Backbone)")
    return backbone


def check_backbone_matches(config: BackboneConfig, backbone: Backbone) -> None:
    """Refuse a backbone built outside the registry that `config` would not rebuild (the run saves `config`, and
    resume, export and evaluate rebuild the teacher from it)."""
    if config.name in BACKBONES:
        if backbone.name == config.name:
            return
        owner = type(backbone)
        path = f"{owner.__module__}:{owner.__qualname__}"
        if backbone.name in BACKBONES:
            fix = f"set backbone.name={backbone.name}"
        else:
            fix = "set backbone.name to the import path of its class or factory" + (
                f" (e.g. {path})" if owner.__module__ != "__main__" and "<" not in path else "")
        raise ConfigError(f"backbone.name: the run's config names {config.name!r} but the backbone given is a "
                          f"{backbone.name!r}; {fix}, so that resume, export and evaluate rebuild this teacher")
    target = own_backbone_target(config.name)
    if inspect.isclass(target) and not isinstance(backbone, target):
        raise ConfigError(f"backbone.name: the run's config names {config.name!r} but the backbone given is a "
                          f"{type(backbone).__name__}")


def builds_on_meta(name: str) -> bool:
    """Whether backbone `name`'s loader honours tdm.meta_init (a denoising network built on the meta device)."""
    return name == "digits" or name in DIFFUSERS_FAMILIES


def build_backbone(config: BackboneConfig) -> Backbone:
    if config.name not in BACKBONES:
        target = own_backbone_target(config.name)
        if target is None:
            raise ConfigError(f"backbone.name must be one of {sorted(BACKBONES)}, an import path module:Name of "
                              f"a Backbone subclass or factory, or an installed {ENTRY_POINT_GROUP} entry point; got "
                              f"{config.name!r}")
        if config.gradient_checkpointing:
            raise ConfigError("backbone.gradient_checkpointing: only the diffusers families support it, not "
                              f"{config.name}")
        return _build_own(config.name, target, config)
    if config.gradient_checkpointing and config.name in ("toy-gmm", "digits"):
        raise ConfigError(f"backbone.gradient_checkpointing: only the diffusers families support it, not "
                          f"{config.name}")
    backbone = BACKBONES[config.name](config)
    if config.gradient_checkpointing:  # before the roles are built: LoRA roles route its recomputation (roles.py)
        for network in getattr(backbone, "experts", (backbone.denoiser,)):  # Wan 2.2: both expert transformers
            network.enable_gradient_checkpointing()
    return backbone
