"""Figures of a sweep, rendered to PNG bytes with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

logger = logging.getLogger(__name__)


def _field(row: Any, name: str) -> Any:
    return row.get(name) if isinstance(row, Mapping) else getattr(row, name, None)


def accuracy_heatmap_png(
    rows: Iterable[Any],
    base_accuracy: float,
    *,
    title: str | None = None,
    dpi: int = 110,
) -> bytes:
    """Validation accuracy over layer x rho, one panel per type (like the paper's Figure 2).

    ``rows`` are :class:`~laser_ops.sweeps.SweepRow` objects or dicts with ``type``, ``layer``, ``rho``
    and ``val_accuracy`` (rows without them, e.g. base or composed profiles, are ignored). The colour
    scale diverges at the base accuracy, so red cells beat the base model and blue ones lose to it;
    the base value is marked on the colour bar and the best cell of each panel is boxed.
    """
    cells: dict[str, dict[tuple[int, float], float]] = {}
    for r in rows:
        t, layer, rho, acc = (_field(r, k) for k in ("type", "layer", "rho", "val_accuracy"))
        if _field(r, "role") not in (None, "config") or len(_field(r, "interventions") or [None]) != 1:
            continue
        if t is None or layer is None or rho is None or acc is None:
            continue
        cells.setdefault(t, {})[(int(layer), float(rho))] = float(acc)
    if not cells:
        raise ValueError("no single-edit rows with type, layer, rho and val_accuracy to plot")
    values = [v for per in cells.values() for v in per.values()]
    lo, hi = min(values + [base_accuracy]), max(values + [base_accuracy])
    eps = 1e-6
    norm = TwoSlopeNorm(vcenter=base_accuracy, vmin=min(lo, base_accuracy - eps), vmax=max(hi, base_accuracy + eps))
    types = sorted(cells)
    layers = sorted({layer for per in cells.values() for layer, _ in per})
    rhos = sorted({rho for per in cells.values() for _, rho in per}, reverse=True)  # 0.9 ... 0.01, as in the paper
    fig, axes = plt.subplots(1, len(types), figsize=(1.2 + 0.7 * len(rhos) * len(types) + 1.5,
                                                     1.5 + 0.28 * len(layers)), squeeze=False)
    image = None
    for ax, t in zip(axes[0], types):
        grid = [[cells[t].get((layer, rho), math.nan) for rho in rhos] for layer in layers]
        image = ax.imshow(grid, cmap="coolwarm", norm=norm, aspect="auto", origin="lower")
        ax.set_xticks(range(len(rhos)), [f"{r:g}" for r in rhos])
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("rank fraction ρ (kept)")
        ax.set_ylabel("layer")
        ax.set_title(t)
        best = max(cells[t].items(), key=lambda kv: kv[1])
        (bl, br), bacc = best
        ax.add_patch(plt.Rectangle((rhos.index(br) - 0.5, layers.index(bl) - 0.5), 1, 1, fill=False,
                                   edgecolor="black", linewidth=2))
        ax.annotate(f"{bacc:.3f}", (rhos.index(br), layers.index(bl)), ha="center", va="center", fontsize=7)
    assert image is not None
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9)
    bar.set_label("validation accuracy")
    bar.ax.axhline(base_accuracy, color="black", linewidth=2)
    bar.ax.text(1.6, base_accuracy, f" base {base_accuracy:.3f}", transform=bar.ax.get_yaxis_transform(),
                va="center", fontsize=8)
    fig.suptitle(title or "LASER validation accuracy (base marked on the colour bar)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
