"""Overlay figures: a frame with its columns marked by class (PNG, matplotlib)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from beamloop.edge.frame.columns import ColumnTable  # noqa: E402

CLASS_STYLE = {
    "Mo": ("tab:red", "o"),
    "S2": ("tab:green", "o"),
    "S1": ("tab:cyan", "o"),
    "vacancy": ("yellow", "x"),
    "column": ("tab:red", "o"),
}


def save_overlay(path: str | Path, image: np.ndarray, columns: ColumnTable, *, targets=None, marks=None,
                 title: str = "", pixel_size_A: float | None = None, dpi: int = 110) -> Path:
    """Write a PNG of ``image`` with every column marked by its class.

    Parameters
    ----------
    image : ndarray (rows, cols)
    columns : ColumnTable
    targets : list of (x_px, y_px), optional
        Beam targets, drawn as white squares.
    marks : dict label -> (n, 2) array of (x_px, y_px), optional
        Extra labelled point sets (e.g. atoms removed), drawn as magenta diamonds.
    title : str
    pixel_size_A : float, optional
        Adds a 1 nm scale bar.
    """
    path = Path(path)
    img = np.asarray(image, float)
    lo, hi = np.percentile(img, [0.5, 99.8])
    rows, cols = img.shape
    size = 7.0 * max(cols / rows, 0.5)
    fig, ax = plt.subplots(figsize=(size + 1.5, 7.0))
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
    ms = float(np.clip(2200.0 / max(rows, cols), 2.0, 9.0))
    labels = np.asarray(columns.class_labels()) if len(columns) else np.array([], str)
    for name in dict.fromkeys(labels):
        sel = labels == name
        color, marker = CLASS_STYLE.get(name, ("tab:orange", "o"))
        colours = {"facecolors": "none", "edgecolors": color} if marker == "o" else {"color": color}
        ax.scatter(columns.x[sel], columns.y[sel], s=ms**2, marker=marker, linewidths=0.9,
                   label=f"{name} ({int(sel.sum())})", **colours)
    if targets:
        t = np.asarray(targets, float).reshape(-1, 2)
        ax.scatter(t[:, 0], t[:, 1], s=(1.8 * ms) ** 2, facecolors="none", edgecolors="white", marker="s",
                   linewidths=1.2, label=f"beam targets ({len(t)})")
    for label, pts in (marks or {}).items():
        p = np.asarray(pts, float).reshape(-1, 2)
        if len(p):
            ax.scatter(p[:, 0], p[:, 1], s=(1.4 * ms) ** 2, facecolors="none", edgecolors="magenta", marker="D",
                       linewidths=1.2, label=f"{label} ({len(p)})")
    if pixel_size_A:
        bar = 10.0 / pixel_size_A
        x0, y0 = cols * 0.04, rows * 0.95
        ax.plot([x0, x0 + bar], [y0, y0], color="white", lw=3)
        ax.text(x0 + bar / 2, y0 - rows * 0.015, "1 nm", color="white", ha="center", va="bottom", fontsize=9)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
