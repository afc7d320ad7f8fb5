"""The explicit map from a config's `backbone.name` to the family that builds it."""

from __future__ import annotations

from collections.abc import Callable

from ..config import BackboneConfig
from .base import Backbone


def _toy_gmm(config: BackboneConfig) -> Backbone:
    from ..toys.gmm import GMMBackbone

    return GMMBackbone(teacher=config.teacher or "exact", prediction=config.prediction or "v_prediction")


def _digits(config: BackboneConfig) -> Backbone:
    from ..toys.digits import DigitsBackbone

    if config.prediction not in ("", "epsilon"):
        raise ValueError(f"backbone.prediction: the digits teacher predicts epsilon, got {config.prediction!r}")
    return DigitsBackbone(teacher_path=config.teacher or None)


BACKBONES: dict[str, Callable[[BackboneConfig], Backbone]] = {
    "toy-gmm": _toy_gmm,
    "digits": _digits,
}


def build_backbone(config: BackboneConfig) -> Backbone:
    if config.name not in BACKBONES:
        raise ValueError(f"backbone.name must be one of {sorted(BACKBONES)}, got {config.name!r}")
    return BACKBONES[config.name](config)
