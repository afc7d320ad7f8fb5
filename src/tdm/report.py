"""Pictures and tables for runs and evaluations: image grids, labelled comparisons, training curves, markdown.

matplotlib is imported only when a figure is drawn (`_pyplot`), so importing this module (the trainer does, for
`image_grid`) selects no plotting backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write


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


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    _pyplot().close(fig)


def sampler_grid_figure(rows: Sequence[tuple[str, torch.Tensor]], path: Path,
                        column_labels: Sequence[str] | None = None) -> None:
    """One row of images per sampler, labelled on the left; column j holds the same condition and seed in
    every row. `rows` are (label, images [N, C, H, W] in [0, 1]) with the same N."""
    n, _, h, w = rows[0][1].shape
    pad = max(1, h // 32)
    mosaic = image_grid(torch.cat([images for _, images in rows]), nrow=n, pad=pad)
    cell = 0.32 if h <= 16 else 0.9 if h <= 64 else 1.6  # inches per image
    fig, ax = _pyplot().subplots(figsize=(cell * n + 2.4, cell * len(rows) + 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(rows))], [label for label, _ in rows], fontsize=8)
    chars = int(cell * 18)  # characters of a line under a cell, at 6 pt
    if column_labels is not None and chars >= 10:  # wrapped to the cell's width; none under cells too narrow
        wrapped = [wrap_label(label, chars) for label in column_labels]
        ax.set_xticks([pad + c * (w + pad) + w / 2 for c in range(n)], wrapped, fontsize=6)
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    _save_figure(fig, path)


def scatter_figure(panels: Sequence[tuple[str, torch.Tensor]], reference: torch.Tensor, path: Path,
                   labels: torch.Tensor | None = None, columns: int = 4) -> None:
    """2-D samples: one panel per (title, samples [N, 2]), coloured by `labels` [N] (class ids) when given, over
    the `reference` samples [M, 2] in grey; the same axes in every panel."""
    plt = _pyplot()
    rows, cols = -(-len(panels) // columns), min(columns, len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.8 * rows), squeeze=False, sharex=True, sharey=True)
    everything = torch.cat([reference, *(x for _, x in panels)]).float()
    low, high = everything.quantile(0.005, 0).tolist(), everything.quantile(0.995, 0).tolist()
    margin = [0.05 * (h - lo) for lo, h in zip(low, high)]
    for ax, (title, x) in zip(axes.flat, panels):
        ax.scatter(*reference.float().T, s=2, c="0.8", lw=0, label="reference")
        colours = None if labels is None else labels[:len(x)].numpy()
        ax.scatter(*x.float().T, s=2, c=colours, cmap="tab10", vmin=0, vmax=9, lw=0)
        ax.set_title(title, fontsize=8)
        ax.set_xlim(low[0] - margin[0], high[0] + margin[0])
        ax.set_ylim(low[1] - margin[1], high[1] + margin[1])
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    _save_figure(fig, path)


def wrap_label(text: str, width: int, lines: int = 3) -> str:
    """`text` wrapped to `width` characters a line, at most `lines` lines, the last cut with an ellipsis."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder="…"))


def quality_cost_figure(rows: Sequence[dict], metric: str, metric_label: str, path: Path) -> None:
    """`metric` against NFE and against wall time per sample, one labelled point per sampler (log x axes)."""
    from matplotlib.ticker import FuncFormatter

    markers = {"teacher": ("s", "tab:blue"), "baseline": ("D", "tab:red"), "student": ("o", "tab:green")}
    fig, axes = _pyplot().subplots(1, 2, figsize=(9, 3.4))
    labels: dict = {}  # axes -> its (x, y, sampler name) points, labelled once the layout is final
    for ax, x_key, x_label in ((axes[0], "nfe", "network evaluations per sample (NFE)"),
                               (axes[1], "ms_per_sample", "wall time per sample (ms)")):
        for kind, (marker, color) in markers.items():
            points = [(r[x_key], r[metric], r["sampler"]) for r in rows if r.get("kind") == kind and metric in r]
            if not points:
                continue
            xs, ys, names = zip(*points)
            ax.plot(xs, ys, marker=marker, color=color, lw=1 if kind == "student" else 0, label=kind)
            labels.setdefault(ax, []).extend(points)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        if x_key == "nfe":
            ax.set_xticks(sorted({r["nfe"] for r in rows}))
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric_label)
        ax.grid(alpha=0.3, which="both")
        values = [r[metric] for r in rows if metric in r]
        if min(values) > 0 and max(values) > 20 * min(values):
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    for ax, points in labels.items():
        _label_points(ax, points)
    _save_figure(fig, path)


# where a point's label may go, in offset points from it, tried in order: right, left, above, below, further out
LABEL_SPOTS = [(5, 3, "left", "bottom"), (5, -3, "left", "top"), (-5, 3, "right", "bottom"),
               (-5, -3, "right", "top"), (0, 8, "center", "bottom"), (0, -8, "center", "top"),
               (5, 12, "left", "bottom"), (5, -12, "left", "top"), (-5, 12, "right", "bottom"),
               (-5, -12, "right", "top")]


def _label_points(ax, points: Sequence[tuple[float, float, str]]) -> list:
    """Label each (x, y, text) point at the first spot in LABEL_SPOTS whose text overlaps no marker, no label
    placed before it and stays inside the axes (the first spot if none is free). Returns the labels' boxes."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = []
    for x, y in ax.transData.transform([(x, y) for x, y, _ in points]):
        taken.append(Bbox.from_extents(x - 4, y - 4, x + 4, y + 4))  # the markers
    for x, y, text in points:
        for dx, dy, ha, va in LABEL_SPOTS:
            label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, ha=ha, va=va)
            box = label.get_window_extent(renderer)
            fits = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            if fits and not any(box.overlaps(b) for b in taken):
                break
            label.remove()
        else:  # no free spot: the first one, overlapping
            dx, dy, ha, va = LABEL_SPOTS[0]
            label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, ha=ha, va=va)
            box = label.get_window_extent(renderer)
        taken.append(box)
    return taken[len(points):]


def curves_figure(history: list[dict], panels: Sequence[str | Sequence[str]], path: Path, columns: int = 4) -> None:
    """One panel per logged scalar (or per group of scalars, overlaid with a legend) against the iteration."""
    groups = [[p] if isinstance(p, str) else list(p) for p in panels]
    groups = [[k for k in g if any(k in h for h in history)] for g in groups]
    groups = [g for g in groups if g]
    rows, cols = -(-len(groups) // columns), min(columns, len(groups))
    fig, axes = _pyplot().subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
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
