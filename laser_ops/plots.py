"""Figures of a sweep, rendered to PNG bytes with matplotlib's Agg backend (no display needed).

:func:`change_heatmap_figure` draws what a reader of a LASER sweep needs (the paper's Figure 2, made
honest): the *change* in validation accuracy versus base, in accuracy points, over layer x rho, one
panel per type, on a diverging scale symmetric around 0 (a gain and a loss of the same size get the
same colour strength); each cell is annotated; configs whose answers collapsed onto one label are
hatched; the winner is framed. Figure size and font sizes follow the grid, and matplotlib's
constrained layout keeps titles, ticks and labels apart from 1 to 40 layers and 1 to 7 types.
"""

from __future__ import annotations

import io
import logging
import math
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

logger = logging.getLogger(__name__)

CELL_W_IN = 0.62  # inches per rho column
CELL_H_IN = 0.30  # inches per layer row
MIN_SCALE_POINTS = 1.0  # the colour scale spans at least +-1 point (no loud colours for noise)


def _field(row: Any, name: str) -> Any:
    return row.get(name) if isinstance(row, Mapping) else getattr(row, name, None)


@dataclass(frozen=True)
class _Cell:
    change: float  # accuracy points versus base
    collapsed: bool
    key: str


def _cells(rows: Iterable[Any], base_accuracy: float) -> dict[str, dict[tuple[int, float], _Cell]]:
    cells: dict[str, dict[tuple[int, float], _Cell]] = {}
    for r in rows:
        t, layer, rho, acc = (_field(r, k) for k in ("type", "layer", "rho", "val_accuracy"))
        if _field(r, "role") not in (None, "config") or len(_field(r, "interventions") or [None]) != 1:
            continue
        if t is None or layer is None or rho is None or acc is None:
            continue
        delta = _field(r, "delta_accuracy")
        change = 100 * (float(delta) if delta is not None else float(acc) - base_accuracy)
        cells.setdefault(str(t), {})[(int(layer), float(rho))] = _Cell(change, bool(_field(r, "collapsed")),
                                                                      str(_field(r, "key")))
    return cells


def change_heatmap_figure(
    rows: Iterable[Any],
    base_accuracy: float,
    *,
    title: str | None = None,
    best_key: str | None = None,
) -> Figure:
    """The heatmap as a matplotlib figure (see the module docstring).

    ``rows`` are :class:`~laser_ops.sweeps.SweepRow` objects or dicts with ``type``, ``layer``, ``rho``,
    ``val_accuracy`` (and ``delta_accuracy``, ``collapsed``, ``key`` when known); rows of other roles
    and composed profiles are ignored. ``best_key`` frames that config (default: the largest gain
    among configs that did not collapse).
    """
    cells = _cells(rows, base_accuracy)
    if not cells:
        raise ValueError("no single-edit rows with type, layer, rho and val_accuracy to plot")
    types = sorted(cells)
    layers = sorted({layer for per in cells.values() for layer, _ in per})
    rhos = sorted({rho for per in cells.values() for _, rho in per}, reverse=True)  # 0.9 ... 0.01, as in the paper
    if best_key is None:
        ok = [(c.change, t, k) for t, per in cells.items() for k, c in per.items() if not c.collapsed]
        best = max(ok)[1:] if ok else (None, None)
    else:
        best = next(((t, k) for t in types for k, c in cells[t].items() if c.key == best_key), (None, None))
    scale = max([MIN_SCALE_POINTS] + [abs(c.change) for per in cells.values() for c in per.values()])
    norm = Normalize(vmin=-scale, vmax=scale)
    cmap = plt.get_cmap("RdBu")

    n_r, n_l, n_t = len(rhos), len(layers), len(types)
    panel_w = max(1.6, CELL_W_IN * n_r)
    width = 1.0 + n_t * (panel_w + 0.55) + 1.3
    height = 1.9 + max(1.0, CELL_H_IN * n_l)
    font = 7.0 if n_l <= 24 else 6.0
    fig, axes = plt.subplots(1, n_t, figsize=(width, height), squeeze=False, layout="constrained")
    image = None
    for ax, t in zip(axes[0], types):
        grid = [[cells[t][(layer, rho)].change if (layer, rho) in cells[t] else math.nan for rho in rhos]
                for layer in layers]
        image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", origin="lower", interpolation="nearest")
        ax.set_xticks(range(n_r), [f"{r:g}" for r in rhos], fontsize=font, rotation=45 if n_r > 5 else 0)
        step = 1 if n_l <= 24 else 2
        ax.set_yticks(range(0, n_l, step), [str(layers[i]) for i in range(0, n_l, step)], fontsize=font)
        ax.set_xlabel("rank fraction ρ (kept)", fontsize=8)
        if ax is axes[0][0]:
            ax.set_ylabel("layer", fontsize=8)
        ax.set_title(t, fontsize=9)
        for (layer, rho), cell in cells[t].items():
            x, y = rhos.index(rho), layers.index(layer)
            strength = abs(norm(cell.change) - 0.5) * 2
            ax.text(x, y, f"{cell.change:+.1f}", ha="center", va="center", fontsize=font - 1,
                    color="white" if strength > 0.6 else "black")
            if cell.collapsed:  # hatch lines light on dark cells, dark on light ones
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="////", linewidth=0,
                                       edgecolor="0.85" if strength > 0.6 else "0.35"))
        if best[0] == t and best[1] is not None:
            (bl, br) = best[1]
            ax.add_patch(Rectangle((rhos.index(br) - 0.46, layers.index(bl) - 0.46), 0.92, 0.92, fill=False,
                                   edgecolor="black", linewidth=2.2))
    assert image is not None
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=min(1.0, 0.4 + 0.05 * n_l), aspect=25, pad=0.02)
    bar.set_label("change vs base (accuracy points)", fontsize=8)
    bar.ax.tick_params(labelsize=font)
    chars = max(30, int(width * 72 / 6.5))  # characters of ~9 pt text that fit the figure's width
    text = title or "LASER sweep: validation accuracy change vs base"
    legend = f"base = {100 * base_accuracy:.1f}% (0 on the scale); hatched: collapsed onto one answer; framed: best"
    fig.suptitle("\n".join(textwrap.wrap(text, chars) + textwrap.wrap(legend, int(chars * 1.2))), fontsize=9)
    return fig


def change_heatmap_png(rows: Iterable[Any], base_accuracy: float, *, title: str | None = None,
                       best_key: str | None = None, dpi: int = 110) -> bytes:
    """:func:`change_heatmap_figure` as PNG bytes."""
    fig = change_heatmap_figure(rows, base_accuracy, title=title, best_key=best_key)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()
