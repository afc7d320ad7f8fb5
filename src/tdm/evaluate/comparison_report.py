"""The comparison part of every report: metrics.json, the sampler grid, the quality-vs-cost plot and the table.

Shared by the end-of-run report of `tdm distill` and by `tdm evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import write_text_atomic
from ..report import markdown_table, quality_cost_figure, sampler_grid_figure, scatter_figure

ROW_INFO = ("sampler", "label", "kind", "steps", "nfe")
TIMINGS = (("latency_ms", "latency ms (batch 1)", ".3g"), ("ms_per_sample", "ms / sample", ".3g"),
           ("samples_per_s", "samples / s", ".4g"))


def metric_columns(rows: list[dict]) -> list[str]:
    """Metric keys of the rows: distances (fd_*, kid_*) first, then the rest, in first-seen order."""
    skip = {*ROW_INFO, *(k for k, _, _ in TIMINGS)}
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in skip and not k.endswith("_std")]
    return sorted(keys, key=lambda k: not k.startswith(("fd_", "kid_")))


def _cells(row: dict) -> dict:
    """A row for the markdown table: `kid_x` shown as 'mean ± std'."""
    out = dict(row)
    for key, value in row.items():
        if f"{key}_std" in row:
            out[key] = f"{value:.3g} ± {row[f'{key}_std']:.2g}"
    return out


def comparison_table(rows: list[dict], floor: dict | None = None) -> str:
    columns = [("label", "sampler", ""), ("nfe", "NFE", "d")] + [(k, k, ".4g") for k in metric_columns(rows)]
    columns += [c for c in TIMINGS if any(c[0] in r for r in rows)]
    table_rows = [_cells(r) for r in rows]
    if floor:
        table_rows.append({"label": "real data (floor)", "nfe": "", **floor})
    return markdown_table(table_rows, columns)


def write_comparison(out_dir: Path, result: dict, backbone, grid_columns: int = 20) -> tuple[list[str], list[str]]:
    """Write metrics.json (`result` without its samples), samples.png (image backbones: one row per sampler,
    the first `grid_columns` conditions and seeds) and quality.png (FD to the reference teacher against NFE
    and time). Returns the markdown lines of the table and those of the figures."""
    out_dir = Path(out_dir)
    result = dict(result)
    samples = result.pop("samples")
    rows, reference = result["rows"], result["reference"]
    write_text_atomic(out_dir / "metrics.json", json.dumps(result, indent=1))
    lines = []
    if backbone.is_image:
        grid = [(f"{r['sampler']}, NFE {r['nfe']}", backbone.to_images(samples[r["sampler"]][:grid_columns]))
                for r in rows]
        shown = min(grid_columns, len(samples[rows[0]["sampler"]]))
        prompts = backbone.evaluation_prompts(shown)
        sampler_grid_figure(grid, out_dir / "samples.png", column_labels=prompts)
        lines += ["## Samples", "",
                  f"One row per sampler; each column is the same condition and seed in every row "
                  f"(the first {shown} evaluation conditions{', prompts under the columns' if prompts else ''}).",
                  "", "![samples](samples.png)", ""]
    elif tuple(backbone.sample_shape) == (2,):
        n = len(samples[rows[0]["sampler"]])
        cond = backbone.evaluation_conditions(n)
        labels = cond if isinstance(cond, torch.Tensor) and cond.shape == (n,) and not cond.is_floating_point() \
            else None
        panels = [(f"{r['label']} (NFE {r['nfe']})", samples[r["sampler"]]) for r in rows]
        scatter_figure(panels, samples[reference], out_dir / "samples.png", labels)
        lines += ["## Samples", "",
                  f"{n} samples per sampler{', coloured by condition' if labels is not None else ''}, over the "
                  f"reference sampler's (`{reference}`, grey).", "", "![samples](samples.png)", ""]
    fd_key = f"fd_{reference}"
    if any(fd_key in r for r in rows):
        quality_cost_figure(rows, fd_key, f"FD to {reference} samples ({result['features']['name']} features)",
                            out_dir / "quality.png")
        lines += ["## Quality against cost", "", f"`{fd_key}` against NFE and wall time per sample (log axes).", "",
                  "![quality against cost](quality.png)", ""]
    return [comparison_table(rows, result.get("floor")), ""], lines
