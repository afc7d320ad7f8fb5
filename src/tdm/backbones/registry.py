"""The explicit map from a config's `backbone.name` to the family that builds it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..config import BackboneConfig, ConfigError
from ..core.prediction import PredictionType
from .base import Backbone


def _toy_gmm(config: BackboneConfig) -> Backbone:
    from ..toys.gmm import GMMBackbone

    if config.teacher not in ("", "exact", "mlp"):
        raise ConfigError(f"backbone.teacher: toy-gmm takes exact or mlp, got {config.teacher!r}")
    if config.prediction not in ("", *(p.value for p in PredictionType)):
        raise ConfigError(f"backbone.prediction must be one of {[p.value for p in PredictionType]}, "
                          f"got {config.prediction!r}")
    return GMMBackbone(teacher=config.teacher or "exact", prediction=config.prediction or "v_prediction")


def _digits(config: BackboneConfig) -> Backbone:
    from ..toys.digits import DigitsBackbone

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


def read_prompts(path: str) -> list[str]:
    """Training prompts: the non-empty lines of a UTF-8 text file."""
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"backbone.prompts: cannot read {path}: {err}") from None
    if not prompts:
        raise ConfigError(f"backbone.prompts: {path} has no prompts (expected one prompt per line)")
    return prompts


def _load_diffusers(cls, config: BackboneConfig, **family_kwargs) -> Backbone:
    """A diffusers teacher family's `from_pretrained` on the config's pipeline, on the current accelerator
    device (the trainer builds the backbone after accelerate's set-up has chosen it)."""
    if not config.teacher:
        raise ConfigError(f"backbone.teacher: {config.name} needs a diffusers pipeline (a hub id or a local "
                          f"folder saved with save_pretrained)")
    if config.prediction:
        raise ConfigError(f"backbone.prediction: {config.name} takes the teacher's prediction type from its "
                          f"scheduler config; leave it empty")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    prompts = read_prompts(config.prompts) if config.prompts else []
    try:
        return cls.from_pretrained(config.teacher, prompts=prompts, height=config.height, width=config.width,
                                   negative_prompt=config.negative_prompt or None,
                                   dtype=getattr(torch, config.dtype), device=device, **family_kwargs)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"backbone.teacher: cannot load the {config.name} pipeline {config.teacher}: "
                          f"{first}") from None


def _sd15(config: BackboneConfig) -> Backbone:
    from .sd_unet import SDBackbone

    return _load_diffusers(SDBackbone, config)


def _sdxl(config: BackboneConfig) -> Backbone:
    from .sdxl import SDXLBackbone

    return _load_diffusers(SDXLBackbone, config)


def _pixart_alpha(config: BackboneConfig) -> Backbone:
    from .pixart import PixArtAlphaBackbone

    return _load_diffusers(PixArtAlphaBackbone, config)


def _sd3(config: BackboneConfig) -> Backbone:
    from .sd3 import SD3Backbone

    return _load_diffusers(SD3Backbone, config, text_encoder_3=config.text_encoder_3)


def _cogvideox(config: BackboneConfig) -> Backbone:
    from .cogvideox import CogVideoXBackbone

    return _load_diffusers(CogVideoXBackbone, config, frames=config.frames)


BACKBONES: dict[str, Callable[[BackboneConfig], Backbone]] = {
    "toy-gmm": _toy_gmm,
    "digits": _digits,
    "sd15": _sd15,
    "sdxl": _sdxl,
    "pixart-alpha": _pixart_alpha,
    "sd3": _sd3,
    "cogvideox": _cogvideox,
}


def build_backbone(config: BackboneConfig) -> Backbone:
    if config.name not in BACKBONES:
        raise ConfigError(f"backbone.name must be one of {sorted(BACKBONES)}, got {config.name!r}")
    if config.gradient_checkpointing and config.name in ("toy-gmm", "digits"):
        raise ConfigError(f"backbone.gradient_checkpointing: only the diffusers families support it, not "
                          f"{config.name}")
    backbone = BACKBONES[config.name](config)
    if config.gradient_checkpointing:  # before the roles are built: LoRA roles route its recomputation (roles.py)
        backbone.denoiser.enable_gradient_checkpointing()
    return backbone
