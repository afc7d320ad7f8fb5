"""The explicit map from a config's `backbone.name` to the family that builds it."""

from __future__ import annotations

from collections.abc import Callable

from .base import Backbone


def _toy_gmm(teacher: str) -> Backbone:
    from ..toys.gmm import GMMBackbone

    return GMMBackbone(teacher=teacher or "exact")


def _digits(teacher: str) -> Backbone:
    from ..toys.digits import DigitsBackbone

    return DigitsBackbone(teacher_path=teacher or None)


BACKBONES: dict[str, Callable[[str], Backbone]] = {
    "toy-gmm": _toy_gmm,
    "digits": _digits,
}


def build_backbone(name: str, teacher: str = "") -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"backbone.name must be one of {sorted(BACKBONES)}, got {name!r}")
    return BACKBONES[name](teacher)
