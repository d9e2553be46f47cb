"""Overlay figures: a frame with its columns marked by class (PNG, matplotlib).

Figures are made as :class:`matplotlib.figure.Figure` objects, never through pyplot's global state, so that
importing or calling this module does not switch the backend of a Jupyter session.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from beamloop.edge.frame.columns import ColumnTable

CLASS_STYLE = {
    "Mo": ("tab:red", "o"),
    "S2": ("tab:green", "o"),
    "S1": ("tab:cyan", "o"),
    "vacancy": ("yellow", "x"),
    "column": ("tab:red", "o"),
}


def scale_bar_nm(width_px: int, pixel_size_A: float) -> float | None:
    """A round scale-bar length (1, 2 or 5 x 10^k nm) at most a quarter of the frame's width, or None when the
    pixel size is not a usable positive number."""
    if not (math.isfinite(pixel_size_A) and pixel_size_A > 0):
        return None
    width_nm = width_px * pixel_size_A / 10.0
    if not (math.isfinite(width_nm) and width_nm > 0):
        return None
    target = width_nm / 4.0
    k = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10.0**k <= target:
            return m * 10.0**k
    return 10.0**k


def overlay_figure(image: np.ndarray, columns: ColumnTable, *, targets=None, marks=None, title: str = "",
                   pixel_size_A: float | None = None) -> Figure:
    """A figure of ``image`` with every column marked by its class.

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
        Adds a scale bar (:func:`scale_bar_nm`).

    Returns
    -------
    matplotlib.figure.Figure (not registered with pyplot; show it in a notebook by evaluating it).
    """
    fig = Figure()
    img = np.asarray(image, float)
    lo, hi = np.percentile(img, [0.5, 99.8])
    rows, cols = img.shape
    size = 7.0 * max(cols / rows, 0.5)
    fig.set_size_inches(size + 1.5, 7.0)
    ax = fig.subplots()
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
    bar_nm = scale_bar_nm(cols, pixel_size_A) if pixel_size_A else None
    if bar_nm:
        bar = bar_nm * 10.0 / pixel_size_A
        x0, y0 = cols * 0.04, rows * 0.95
        ax.plot([x0, x0 + bar], [y0, y0], color="white", lw=3)
        ax.text(x0 + bar / 2, y0 - rows * 0.015, f"{bar_nm:g} nm", color="white", ha="center", va="bottom",
                fontsize=9)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return fig


def save_overlay(path: str | Path, image: np.ndarray, columns: ColumnTable, *, targets=None, marks=None,
                 title: str = "", pixel_size_A: float | None = None, dpi: int = 110) -> Path:
    """Write :func:`overlay_figure` of ``image`` and ``columns`` as a PNG at ``path`` (``dpi`` dots per inch);
    returns the path.

    Raises
    ------
    OSError
        The file cannot be written.
    """
    path = Path(path)
    overlay_figure(image, columns, targets=targets, marks=marks, title=title, pixel_size_A=pixel_size_A
                   ).savefig(path, dpi=dpi)
    return path
