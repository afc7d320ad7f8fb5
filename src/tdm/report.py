"""Pictures and tables for runs and evaluations: image grids, labelled comparisons, training curves, markdown."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .files import atomic_write  # noqa: E402


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> one uint8 HWC mosaic, `nrow` images per row."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    canvas = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images.clamp(0, 1)):
        r, col = divmod(i, nrow)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    hwc = canvas.permute(1, 2, 0).expand(-1, -1, 3) if c == 1 else canvas.permute(1, 2, 0)
    return (hwc.numpy() * 255).round().astype(np.uint8)


def _save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    plt.close(fig)


def comparison_figure(panels: Sequence[tuple[str, torch.Tensor]], path: Path, nrow: int) -> None:
    """Side-by-side grids, one per sampler, each titled (same seeds and classes in every panel)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6), squeeze=False)
    for ax, (title, images) in zip(axes[0], panels):
        ax.imshow(image_grid(images, nrow), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    _save_figure(fig, path)


def curves_figure(history: list[dict], panels: Sequence[str | Sequence[str]], path: Path, columns: int = 4) -> None:
    """One panel per logged scalar (or per group of scalars, overlaid with a legend) against the iteration."""
    groups = [[p] if isinstance(p, str) else list(p) for p in panels]
    groups = [[k for k in g if any(k in h for h in history)] for g in groups]
    groups = [g for g in groups if g]
    rows = -(-len(groups) // columns)
    fig, axes = plt.subplots(rows, min(columns, len(groups)), figsize=(3.4 * min(columns, len(groups)), 2.8 * rows),
                             squeeze=False)
    for ax, group in zip(axes.flat, groups):
        for key in group:
            points = [(h["step"], h[key]) for h in history if key in h]
            ax.plot(*zip(*points), lw=1.2, label=key)
        ax.set_xlabel("iteration")
        ax.set_title(group[0] if len(group) == 1 else ", ".join(group), fontsize=8)
        if len(group) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.tight_layout()
    _save_figure(fig, path)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """rows of dicts -> markdown; columns are (key, header, format spec)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(row[k], f) if isinstance(row.get(k), (int, float)) else str(row.get(k, ""))
                 for k, _, f in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
