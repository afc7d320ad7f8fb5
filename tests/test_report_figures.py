"""Readable report figures: quality-plot labels that do not overlap, prompts wrapped under grid columns."""

from __future__ import annotations

import itertools

from tdm.report import _label_points, _pyplot, wrap_label


def test_crowded_quality_labels_do_not_overlap():
    # the crowding a real evaluation produced: student4 and student8 side by side, student2 just below
    points = [(1, 18.0, "student1"), (2, 0.0063, "student2"), (4, 0.0098, "student4"), (8, 0.0093, "student8"),
              (8, 0.078, "teacher4"), (100, 0.00026, "teacher50"), (8, 0.0101, "baseline4")]
    fig, ax = _pyplot().subplots(figsize=(4.5, 3.4))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o")
    ax.set_xscale("log")
    ax.set_yscale("log")
    fig.tight_layout()
    boxes = _label_points(ax, points)
    inside = ax.get_window_extent(fig.canvas.get_renderer())
    assert len(boxes) == len(points)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert all(inside.contains(b.x0, b.y0) and inside.contains(b.x1, b.y1) for b in boxes)
    _pyplot().close(fig)


def test_prompts_are_wrapped_and_cut_with_an_ellipsis():
    text = "a photo of a cat sitting on a red sofa in a sunny living room, highly detailed"
    wrapped = wrap_label(text, 16)
    assert all(len(line) <= 16 for line in wrapped.splitlines()) and len(wrapped.splitlines()) == 3
    assert wrapped.endswith("…") and wrap_label("a dog", 16) == "a dog"
