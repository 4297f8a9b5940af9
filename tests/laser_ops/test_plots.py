"""Tests for laser_ops.plots: the change-vs-base heatmap is readable at every grid size (no two texts overlap),
its scale is symmetric around 0, collapsed configs are hatched and the winner is framed."""

from __future__ import annotations

import random

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from laser_ops.plots import change_heatmap_figure, change_heatmap_png
from laser_ops.sweeps import PAPER_RHOS, SweepRow
from laser_ops.targets import TYPES

TITLE = "epistemic_reasoning: validation accuracy change vs base (sweep-0123456789ab, 200 validation examples)"


def grid_rows(n_layers: int, types: list[str], rhos=PAPER_RHOS, seed: int = 0) -> list[SweepRow]:
    rng = random.Random(seed)
    return [SweepRow(key=f"laser:{t}:{layer}:{rho:g}", step=0, role="config", type=t, layer=layer, rho=rho,
                     interventions=[{"target": t, "layer": layer, "rank_fraction": rho}],
                     val_accuracy=0.5 + rng.uniform(-0.3, 0.12), collapsed=rng.random() < 0.15)
            for t in types for layer in range(n_layers) for rho in rhos]


def overlapping_texts(fig) -> tuple[int, list[tuple[str, str]]]:
    """Pairs of visible texts whose rendered bounding boxes overlap (matplotlib's own extents)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    ext = np.array([t.get_window_extent(renderer).extents for t in texts])  # x0, y0, x1, y1
    x0, y0, x1, y1 = (ext[:, i] for i in range(4))
    hit = (x0[:, None] < x1[None]) & (x0[None] < x1[:, None]) & (y0[:, None] < y1[None]) & (y0[None] < y1[:, None])
    pairs = np.argwhere(np.triu(hit, k=1))
    return len(texts), [(texts[i].get_text(), texts[j].get_text()) for i, j in pairs]


@pytest.mark.parametrize(("n_layers", "types"), [
    (1, ["fc_in"]),  # the smallest grid: the title used to cover the panel title
    (32, ["fc_in", "fc_out"]),  # a 7B-size grid
    (40, list(TYPES)),  # the largest the layout promises: 40 layers x 7 types
])
def test_no_two_texts_overlap(n_layers: int, types: list[str]) -> None:
    fig = change_heatmap_figure(grid_rows(n_layers, types), 0.5, title=TITLE)
    try:
        n, bad = overlapping_texts(fig)
        annotated = len(types) * n_layers * len(PAPER_RHOS)
        assert n > annotated  # every cell annotated, plus titles, ticks and labels
        assert bad == []
    finally:
        plt.close(fig)


def test_scale_is_symmetric_change_in_points_with_hatches_and_frame() -> None:
    rows = grid_rows(3, ["fc_in", "fc_out"], seed=3)
    base = 0.5
    fig = change_heatmap_figure(rows, base, title=TITLE)
    try:
        images = [im for ax in fig.axes for im in ax.get_images()]
        assert len(images) == 2
        lo, hi = images[0].get_clim()
        changes = [100 * (r.val_accuracy - base) for r in rows]
        assert lo == pytest.approx(-hi) and hi == pytest.approx(max(abs(c) for c in changes))
        texts = {t.get_text() for ax in fig.axes for t in ax.texts}
        assert f"{changes[0]:+.1f}" in texts  # cells annotated with the change in points
        patches = [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle)]
        hatched = [p for p in patches if p.get_hatch()]
        assert len(hatched) == sum(r.collapsed for r in rows)
        framed = [p for p in patches if not p.get_hatch() and p.get_linewidth() >= 2]
        assert len(framed) == 1
        best = max((r for r in rows if not r.collapsed), key=lambda r: r.val_accuracy)
        ax = fig.axes[["fc_in", "fc_out"].index(best.type)]
        assert framed[0] in ax.patches
        rhos = sorted(PAPER_RHOS, reverse=True)
        assert framed[0].get_x() == pytest.approx(rhos.index(best.rho) - 0.46)
        assert framed[0].get_y() == pytest.approx(best.layer - 0.46)
    finally:
        plt.close(fig)


def test_small_changes_keep_a_floor_on_the_scale_and_png_renders() -> None:
    rows = [SweepRow(key="k", step=0, role="config", type="fc_in", layer=0, rho=0.1, interventions=[{}],
                     val_accuracy=0.5005, delta_accuracy=0.0005)]
    fig = change_heatmap_figure(rows, 0.5)
    try:
        assert fig.axes[0].get_images()[0].get_clim() == pytest.approx((-1.0, 1.0))  # noise is not loud
    finally:
        plt.close(fig)
    png = change_heatmap_png(rows, 0.5, title="toy")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    with pytest.raises(ValueError, match="no single-edit rows"):
        change_heatmap_png([], 0.5)
