"""A folder of reference images (png, jpg, webp, bmp; searched recursively) as one tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import TDMError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image_folder(folder: str | Path, channels: int, size: tuple[int, int]) -> Tensor:
    """Every image under `folder`, sorted by path, as [N, channels, H, W] in [0, 1]: converted to grey
    (channels = 1) or RGB and resized to `size` = (H, W) with bicubic filtering when it differs."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise TDMError(f"--reference-dir: {folder} is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise TDMError(f"--reference-dir: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if img.size != (size[1], size[0]):
                    img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
                array = np.asarray(img, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as err:
            raise TDMError(f"--reference-dir: cannot read {path}: {err}") from None
        images.append(torch.from_numpy(array).reshape(size[0], size[1], channels).permute(2, 0, 1))
    return torch.stack(images)
