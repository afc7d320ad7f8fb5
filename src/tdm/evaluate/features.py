"""Feature extractors for Frechet distance and KID, and the optional human-preference scorers.

A `FeatureExtractor` maps images [N, C, H, W] in [0, 1] to features [N, D]; its `name` and `description`
label the report's columns and say which network measured them. Nothing here downloads weights.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from ..errors import MissingModel, TDMError
from ..optional import require

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
INCEPTION_ENV = "TDM_INCEPTION"


class FeatureExtractor(Protocol):
    name: str         # short, for column names and metrics.json, e.g. "inception"
    description: str  # one phrase for the report, e.g. "Inception-v3 pool features (FID's network)"

    def __call__(self, images: Tensor) -> Tensor:
        """images [N, C, H, W] in [0, 1] -> features [N, D] (float32, CPU)."""


def _batched(fn: Callable[[Tensor], Tensor], images: Tensor, batch_size: int, device) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(images[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)])


# ------------------------------------------------------------------------------------------- Inception

def inception_search_paths() -> list[Path]:
    """Where `InceptionFeatures` looks when no path is given, in order: $TDM_INCEPTION, then
    $XDG_CACHE_HOME/tdm (default ~/.cache/tdm), then torch's hub cache ($TORCH_HOME/hub/checkpoints)."""
    paths = [Path(os.environ[INCEPTION_ENV]).expanduser()] if os.environ.get(INCEPTION_ENV) else []
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return paths + [cache / "tdm" / INCEPTION_FILE, Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE]


def find_inception(path: str | Path | None = None) -> Path:
    """The Inception TorchScript file: `path` if given, else the first of `inception_search_paths()`.

    Never downloads; a missing file raises `MissingModel` naming every place looked at and the fetch command."""
    candidates = [Path(path).expanduser()] if path else inception_search_paths()
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise MissingModel(
        f"the FID Inception network ({INCEPTION_FILE}) is not on this machine; looked at: {looked}. "
        f"tdm never downloads it: fetch it once with `mkdir -p ~/.cache/tdm && curl -L {INCEPTION_URL} "
        f"-o ~/.cache/tdm/{INCEPTION_FILE}` (clean-fid keeps a copy at /tmp/{INCEPTION_FILE}), "
        f"or pass --inception PATH / set {INCEPTION_ENV}")


class InceptionFeatures:
    """The standard FID feature network: NVIDIA's TorchScript Inception-v3 (`inception-2015-12-05.pt`, the
    TF-FID weights that StyleGAN2-ADA, EDM and clean-fid use), called as `net(x, return_features=True)` on
    3-channel images with values 0..255 at any size (it resizes to 299 x 299 itself) -> [N, 2048] pool3.

    Images are quantised to 8-bit levels first, as if saved to PNG; grey images are repeated to 3 channels.
    """

    name = "inception"

    def __init__(self, path: str | Path | None = None, device="cpu", batch_size: int = 64):
        self.path = find_inception(path)
        try:
            with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the FID network ships as one
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(self.path), map_location=device).eval()
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise MissingModel(f"{self.path} is not a TorchScript Inception network: {first}") from None
        self.device, self.batch_size = device, batch_size
        self.description = f"Inception-v3 pool features (FID's network, {self.path.name})"

    def _features(self, images: Tensor) -> Tensor:
        x = (images.clamp(0, 1) * 255).round()  # [N, C, H, W], 8-bit levels
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x, return_features=True)

    def __call__(self, images: Tensor) -> Tensor:
        return _batched(self._features, images, self.batch_size, self.device)


# ------------------------------------------------------------------------------------------- CLIP

DEFAULT_CLIP_FEATURES = "openai/clip-vit-base-patch32"  # the end-of-run report's fallback, from the local hub cache


class CLIPFeatures:
    """A transformers CLIP model's image embeddings (projected, before normalisation), from a local folder or a
    hub id already in the local cache (never downloaded): an FD in CLIP's space (FD_CLIP), not FID."""

    name = "clip"

    def __init__(self, model: str, device="cpu", batch_size: int = 64):
        from .clip_score import clip_pixels

        transformers = require("transformers", "CLIP features")
        try:
            self.model = transformers.CLIPModel.from_pretrained(model, local_files_only=True).eval().to(device)
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise MissingModel(f"no CLIP model {model!r} on this machine (tdm never downloads it): {first}") from None
        self.pixels, self.device, self.batch_size = clip_pixels, device, batch_size
        self.description = f"CLIP image embeddings ({model}; an FD in CLIP's space, not FID)"

    def _features(self, images: Tensor) -> Tensor:
        output = self.model.get_image_features(pixel_values=self.pixels(images, self.model.config.vision_config.
                                                                        image_size))
        return getattr(output, "pooler_output", output)  # a tensor, or an output object in newer transformers

    def __call__(self, images: Tensor) -> Tensor:
        return _batched(self._features, images, self.batch_size, self.device)


# ------------------------------------------------------------------------------------------- digits

class DigitsClassifierFeatures:
    """The shipped digits classifier's penultimate layer (`DigitsBackbone.features`): a classifier FD, not FID."""

    name = "digits-classifier"
    description = "the digits classifier's penultimate layer (a classifier FD, not FID)"

    def __init__(self, backbone):
        self.backbone = backbone

    def __call__(self, images: Tensor) -> Tensor:
        return self.backbone.features(images * 2 - 1)  # [0, 1] images -> the toy's [-1, 1] samples


# --------------------------------------------------------------------------- human-preference scorers

def to_pil(images: Tensor) -> list:
    """[N, C, H, W] in [0, 1] -> PIL images (RGB)."""
    from PIL import Image

    x = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x]


PreferenceScorer = Callable[[Tensor, Sequence[str]], Tensor]  # (images [N,C,H,W] in [0,1], prompts) -> [N]


def _hpsv2(model: str | None, device) -> PreferenceScorer:
    hpsv2 = require("hpsv2", "the HPSv2 score")

    def score(images: Tensor, prompts: Sequence[str]) -> Tensor:
        pil, out = to_pil(images), torch.empty(len(prompts))
        for prompt in dict.fromkeys(prompts):  # hpsv2.score takes one prompt and a list of images
            rows = [i for i, p in enumerate(prompts) if p == prompt]
            out[rows] = torch.tensor(hpsv2.score([pil[i] for i in rows], prompt, hps_version=model or "v2.1"),
                                     dtype=torch.float32).flatten()
        return out

    return score


def _image_reward(model: str | None, device) -> PreferenceScorer:
    reward_model = require("ImageReward", "ImageReward", install="image-reward").load(model or "ImageReward-v1.0",
                                                                                      device=str(device))

    def score(images: Tensor, prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            return torch.tensor([float(reward_model.score(p, img)) for p, img in zip(prompts, to_pil(images))])

    return score


def _pickscore(model: str | None, device) -> PreferenceScorer:
    from .clip_score import CLIPScorer

    return CLIPScorer(model or "yuvalkirstain/PickScore_v1", device=device,
                      tokenizer="laion/CLIP-ViT-H-14-laion2B-s32B-b79K" if model is None else None).pickscore


PREFERENCE_SCORERS: dict[str, Callable[[str | None, object], PreferenceScorer]] = {
    "hpsv2": _hpsv2,              # model: "v2.0" | "v2.1" (default)
    "imagereward": _image_reward,  # model: "ImageReward-v1.0" (default) or a local checkpoint
    "pickscore": _pickscore,       # model: a hub id or folder holding PickScore's CLIP and tokenizer
}


def load_preference_scorer(spec: str, device="cpu") -> tuple[str, PreferenceScorer]:
    """`NAME` or `NAME=MODEL` (a version, hub id or local folder) -> (name, scorer). Imports on demand."""
    name, _, model = spec.partition("=")
    if name not in PREFERENCE_SCORERS:
        raise TDMError(f"--preference: unknown scorer {name!r}; choose from {sorted(PREFERENCE_SCORERS)}")
    return name, PREFERENCE_SCORERS[name](model or None, device)
