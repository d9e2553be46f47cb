"""The table of atomic columns found in one frame, and its CSV form."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CSV_HEADER = ("x_px", "y_px", "intensity", "class", "score")
"""Columns of ``<stem>_columns.csv`` that every reader can rely on; ``x_A, y_A`` follow when the pixel size
is known, then the optional columns :data:`CSV_OPTIONAL` (appended, so readers of the first columns by
position keep working)."""

CSV_OPTIONAL = ("near_edge", "uncertainty")
"""Optional CSV columns: ``near_edge`` (1 for a column closer than about one column width to the frame edge,
whose window the edge cuts), ``uncertainty`` (per-column uncertainty, when the finder gives one)."""


@dataclass
class ColumnTable:
    """Atomic columns found in one frame.

    Attributes
    ----------
    x, y : ndarray, shape (n,), float32
        Sub-pixel position: ``x`` is the column index, ``y`` the row index (pixels, origin at the
        centre of the top-left pixel).
    intensity : ndarray, shape (n,), float32
        Column intensity: peak height above the local background of the smoothed frame, in the
        frame's units (detector counts for raw frames).
    score : ndarray, shape (n,), float32
        Detection confidence: that height divided by the noise of the smoothed frame (a signal-to-noise
        ratio); for inferred vacancy sites, how many neighbours predicted the site.
    cls : ndarray, shape (n,), int8
        Class index into ``class_names``; -1 before classification.
    class_names : tuple of str
        ``("Mo", "S2", "S1", "vacancy")`` for MoS2, ``("column",)`` otherwise.
    near_edge : ndarray, shape (n,), bool
        Column closer than about one column width to the frame edge (its fit window is clipped); all
        False when the finder does not say.
    """

    x: np.ndarray
    y: np.ndarray
    intensity: np.ndarray
    score: np.ndarray
    cls: np.ndarray
    class_names: tuple[str, ...] = field(default=("column",))
    near_edge: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __post_init__(self) -> None:
        if self.near_edge is None or len(self.near_edge) != len(self.x):
            self.near_edge = np.zeros(len(self.x), bool)

    def __len__(self) -> int:
        return len(self.x)

    @classmethod
    def empty(cls, class_names: tuple[str, ...] = ("column",)) -> ColumnTable:
        """A table with no rows."""
        f = np.zeros(0, np.float32)
        return cls(f, f.copy(), f.copy(), f.copy(), np.zeros(0, np.int8), class_names)

    @property
    def xy(self) -> np.ndarray:
        """Positions as an ``(n, 2)`` float64 array of ``(x, y)`` pixels."""
        return np.stack([self.x, self.y], axis=1).astype(np.float64)

    def select(self, mask: np.ndarray) -> ColumnTable:
        """Rows where ``mask`` is true (or at the given indices)."""
        return ColumnTable(self.x[mask], self.y[mask], self.intensity[mask], self.score[mask], self.cls[mask],
                           self.class_names, self.near_edge[mask])

    def concat(self, other: ColumnTable) -> ColumnTable:
        """This table followed by ``other`` (same class names)."""
        if other.class_names != self.class_names:
            raise ValueError(f"cannot join tables with classes {self.class_names} and {other.class_names}")
        return ColumnTable(np.concatenate([self.x, other.x]), np.concatenate([self.y, other.y]),
                           np.concatenate([self.intensity, other.intensity]), np.concatenate([self.score, other.score]),
                           np.concatenate([self.cls, other.cls]), self.class_names,
                           np.concatenate([self.near_edge, other.near_edge]))

    def class_labels(self) -> list[str]:
        """Class name of each row (``"unclassified"`` for -1)."""
        return [self.class_names[c] if c >= 0 else "unclassified" for c in self.cls]

    def to_records(self) -> np.ndarray:
        """Structured array with fields ``x_px, y_px, intensity, score, class`` (for HDF5)."""
        rec = np.zeros(len(self), dtype=[("x_px", "f4"), ("y_px", "f4"), ("intensity", "f4"), ("score", "f4"),
                                         ("class", "i1")])
        rec["x_px"], rec["y_px"], rec["intensity"], rec["score"], rec["class"] = (
            self.x, self.y, self.intensity, self.score, self.cls)
        return rec

    def write_csv(self, path: str | Path, pixel_size_A: float | None = None,
                  uncertainty: np.ndarray | None = None) -> Path:
        """Write ``x_px,y_px,intensity,class,score`` (plus ``x_A,y_A`` when the pixel size is known), then
        ``near_edge`` (0/1) and, when given, ``uncertainty``.

        Parameters
        ----------
        pixel_size_A : float, optional
            Angstrom per pixel; ``x_A = x_px * pixel_size_A`` (origin at the top-left pixel centre).
        uncertainty : ndarray (n,), optional
            Per-column uncertainty (NaN written as ``nan``).
        """
        path = Path(path)
        header = list(CSV_HEADER) + (["x_A", "y_A"] if pixel_size_A else []) + ["near_edge"]
        if uncertainty is not None:
            header.append("uncertainty")
        labels = self.class_labels()
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for k in range(len(self)):
                row = [f"{self.x[k]:.3f}", f"{self.y[k]:.3f}", f"{self.intensity[k]:.6g}", labels[k],
                       f"{self.score[k]:.3f}"]
                if pixel_size_A:
                    row += [f"{self.x[k] * pixel_size_A:.4f}", f"{self.y[k] * pixel_size_A:.4f}"]
                row.append("1" if self.near_edge[k] else "0")
                if uncertainty is not None:
                    row.append(f"{float(uncertainty[k]):.4f}")
                w.writerow(row)
        return path


def read_csv(path: str | Path) -> tuple[ColumnTable, list[str]]:
    """Read a table written by :meth:`ColumnTable.write_csv` (by this or an earlier version, with or without
    the optional columns); returns it and the header.

    Class names are taken in order of first appearance. Raises ``ValueError`` when the header lacks
    one of :data:`CSV_HEADER`.
    """
    with Path(path).open() as f:
        rows = list(csv.reader(f))
    header = rows[0]
    missing = [h for h in CSV_HEADER if h not in header]
    if missing:
        raise ValueError(f"{path}: header lacks {missing}")
    idx = {h: header.index(h) for h in CSV_HEADER}
    names: list[str] = []
    for r in rows[1:]:
        if r[idx["class"]] not in names:
            names.append(r[idx["class"]])
    col = lambda h, t: np.array([t(r[idx[h]]) for r in rows[1:]], dtype=np.float32)  # noqa: E731
    cls = np.array([names.index(r[idx["class"]]) for r in rows[1:]], np.int8)
    edge = (np.array([r[header.index("near_edge")] == "1" for r in rows[1:]], bool) if "near_edge" in header
            else np.zeros(len(rows) - 1, bool))
    return ColumnTable(col("x_px", float), col("y_px", float), col("intensity", float), col("score", float), cls,
                       tuple(names) or ("column",), edge), header
