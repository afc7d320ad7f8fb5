"""The explicit map from a config's `backbone.name` to the family that builds it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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


BACKBONES: dict[str, Callable[[BackboneConfig], Backbone]] = {
    "toy-gmm": _toy_gmm,
    "digits": _digits,
}


def build_backbone(config: BackboneConfig) -> Backbone:
    if config.name not in BACKBONES:
        raise ConfigError(f"backbone.name must be one of {sorted(BACKBONES)}, got {config.name!r}")
    return BACKBONES[config.name](config)
