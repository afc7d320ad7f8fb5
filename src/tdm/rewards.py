"""Rewards for reward post-training: plain callables that score generated images, gradients not needed.

A reward is `reward(images, conditions, prompts) -> scores [N]`: `images` are the backbone's `to_images` output,
[N, C, H, W] in [0, 1]; `conditions` the backbone's condition batch (class labels for digits); `prompts` the prompt
strings or None. A reward may be non-differentiable: `score` calls it under `torch.no_grad` and returns detached
float scores on the CPU, checked to be [N] and finite.

`load_reward(name, **options)` takes a built-in name (`REWARDS`, whose factories take the options and load any
network once) or an import path `module:function` naming a reward callable of the user's.
"""

from __future__ import annotations

import inspect
import io
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, TDMError
from .registry import import_target
from .toys.digits import load_classifier

Reward = Callable[[Tensor, object, Sequence[str] | None], Tensor | np.ndarray | list[float]]  # -> scores [N]


# --------------------------------------------------------------------------------------------- digits

def _digits_logits(classifier, images: Tensor) -> Tensor:
    """The classifier's logits [N, 10] of [0, 1] digit images (mapped back to the toy's [-1, 1] samples)."""
    return classifier(images.float().cpu() * 2 - 1)


def digits_class(classifier: str | None = None) -> Reward:
    """1.0 where the classifier's argmax is the requested class, else 0.0: the per-sample `class_accuracy`.

    `classifier`: a weights file or folder of a `DigitsClassifier` (default: the shipped metric classifier)."""
    model = load_classifier(classifier)

    def reward(images: Tensor, conditions: Tensor, prompts=None) -> Tensor:
        return (_digits_logits(model, images).argmax(1) == conditions.cpu()).float()

    return reward


def digits_confident(threshold: float = 0.99, classifier: str | None = None) -> Reward:
    """1.0 where the classifier's probability of the requested class exceeds `threshold` (in [0.5, 1), so never
    above `digits-class`), else 0.0: a 0/1 reward with headroom where the plain decision is saturated.

    Compared as log-odds, log p / (1 - p) > log threshold / (1 - threshold), which float32 probabilities cannot
    resolve near 1: the shipped classifier gives the teacher's samples a median log-odds near 20 (p = 1 - 2e-9),
    so thresholds that leave headroom on this toy are like 1 - 1e-9, not 0.99."""
    if not 0.5 <= threshold < 1:
        raise ConfigError(f"digits-confident: threshold must lie in [0.5, 1), got {threshold}")
    model = load_classifier(classifier)
    bound = math.log(threshold / (1 - threshold))

    def reward(images: Tensor, conditions: Tensor, prompts=None) -> Tensor:
        logits, requested = _digits_logits(model, images), conditions.cpu().long()[:, None]
        others = logits.scatter(1, requested, float("-inf")).logsumexp(1)
        return (logits.gather(1, requested)[:, 0] - others > bound).float()

    return reward


def digits_thickness(target: float | None = None) -> Reward:
    """Stroke thickness as mean ink: the mean pixel intensity in [0, 1] (the background is 0, so thicker or
    brighter strokes score higher). With `target`, -|mean ink - target| instead, to aim at a thickness."""

    def reward(images: Tensor, conditions=None, prompts=None) -> Tensor:
        ink = images.float().clamp(0, 1).flatten(1).mean(1)
        return ink if target is None else -(ink - target).abs()

    return reward


# --------------------------------------------------------------------------------------------- images

def jpeg_compressibility(quality: int = 95) -> Reward:
    """Minus the JPEG-encoded size in kB (1000 bytes) at `quality`, as DDPO's compressibility reward."""
    from .evaluate.features import to_pil

    def reward(images: Tensor, conditions=None, prompts=None) -> Tensor:
        sizes = []
        for image in to_pil(images):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            sizes.append(buffer.tell() / 1000)
        return -torch.tensor(sizes)

    return reward


def _needs_prompts(name: str, prompts: Sequence[str] | None, n: int) -> Sequence[str]:
    if prompts is None or len(prompts) != n:
        raise TDMError(f"reward {name}: needs one prompt per image, got "
                       f"{'none' if prompts is None else len(prompts)} for {n} images")
    return prompts


def clip_score(model: str = "openai/clip-vit-large-patch14", device="cpu", tokenizer: str | None = None) -> Reward:
    """100 * max(cos(image, prompt), 0) per image with a transformers CLIP model (`tdm.evaluate.clip_score`)."""
    from .evaluate.clip_score import CLIPScorer

    scorer = CLIPScorer(model, device=device, tokenizer=tokenizer)

    def reward(images: Tensor, conditions=None, prompts=None) -> Tensor:
        return scorer.clip_score(images, _needs_prompts("clip-score", prompts, len(images)))

    return reward


def _preference(name: str) -> Callable[..., Reward]:
    """The evaluation's human-preference scorer `name` (`tdm.evaluate.features`) as a reward factory; a missing
    package raises `MissingPackage` with its pip line."""

    def factory(model: str | None = None, device="cpu") -> Reward:
        from .evaluate.features import PREFERENCE_SCORERS

        scorer = PREFERENCE_SCORERS[name](model, device)

        def reward(images: Tensor, conditions=None, prompts=None) -> Tensor:
            return scorer(images, _needs_prompts(name, prompts, len(images)))

        return reward

    factory.__doc__ = f"The {name} score per (image, prompt); options: model (a version, id or folder), device."
    return factory


# ------------------------------------------------------------------------------------------ registry

REWARDS: dict[str, Callable[..., Reward]] = {
    "digits-class": digits_class,
    "digits-confident": digits_confident,
    "digits-thickness": digits_thickness,
    "jpeg-compressibility": jpeg_compressibility,
    "clip-score": clip_score,
    "pickscore": _preference("pickscore"),
    "imagereward": _preference("imagereward"),
    "hpsv2": _preference("hpsv2"),
}


def load_reward(name: str, **options) -> Reward:
    """A built-in reward by name, built with `options`, or the callable an import path `module:function` names
    (which takes no options)."""
    if ":" in name:
        if options:
            raise ConfigError(f"reward {name}: options {sorted(options)} apply to built-in rewards only")
        target = import_target(name, field="reward", example="mypkg.rewards:my_reward")
        if not callable(target):
            raise ConfigError(f"reward: {name!r} names a {type(target).__name__}, not a callable "
                              f"(images, conditions, prompts) -> scores")
        return target
    if name not in REWARDS:
        raise ConfigError(f"reward: unknown reward {name!r}; choose from {sorted(REWARDS)} or give module:function")
    factory = REWARDS[name]
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as err:
        raise ConfigError(f"reward {name}: bad options {sorted(options)} ({err}); it takes "
                          f"{inspect.signature(factory)}") from None
    return factory(**options)


def score(reward: Reward, images: Tensor, conditions=None, prompts: Sequence[str] | None = None,
          name: str = "reward") -> Tensor:
    """`reward(images, conditions, prompts)` under no_grad, as detached float32 scores [N] on the CPU; a wrong
    shape or a non-finite score raises a one-line `TDMError` naming the reward."""
    with torch.no_grad():
        out = reward(images, conditions, prompts)
    try:
        scores = out.detach().float().cpu() if isinstance(out, Tensor) else \
            torch.as_tensor(np.asarray(out, dtype=np.float32))
    except (TypeError, ValueError) as err:
        raise TDMError(f"reward {name}: returned {type(out).__name__}, not numbers ({err})") from None
    if scores.shape != (len(images),):
        raise TDMError(f"reward {name}: returned shape {tuple(scores.shape)}, expected ({len(images)},)")
    if not torch.isfinite(scores).all():
        raise TDMError(f"reward {name}: returned {int((~torch.isfinite(scores)).sum())} non-finite scores")
    return scores

