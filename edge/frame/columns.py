"""The table of atomic columns found in one frame, and its CSV form."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CSV_HEADER = ("x_px", "y_px", "intensity", "class", "score")
"""Columns of ``<stem>_columns.csv``; ``x_A, y_A`` follow when the pixel size is known."""


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
    """

    x: np.ndarray
    y: np.ndarray
    intensity: np.ndarray
    score: np.ndarray
    cls: np.ndarray
    class_names: tuple[str, ...] = field(default=("column",))

    def __len__(self) -> int:
        return len(self.x)

    @classmethod
    def empty(cls, class_names: tuple[str, ...] = ("column",)) -> "ColumnTable":
        """A table with no rows."""
        f = np.zeros(0, np.float32)
        return cls(f, f.copy(), f.copy(), f.copy(), np.zeros(0, np.int8), class_names)

    @property
    def xy(self) -> np.ndarray:
        """Positions as an ``(n, 2)`` float64 array of ``(x, y)`` pixels."""
        return np.stack([self.x, self.y], axis=1).astype(np.float64)

    def select(self, mask: np.ndarray) -> "ColumnTable":
        """Rows where ``mask`` is true (or at the given indices)."""
        return ColumnTable(self.x[mask], self.y[mask], self.intensity[mask], self.score[mask], self.cls[mask],
                           self.class_names)

    def concat(self, other: "ColumnTable") -> "ColumnTable":
        """This table followed by ``other`` (same class names)."""
        if other.class_names != self.class_names:
            raise ValueError(f"cannot join tables with classes {self.class_names} and {other.class_names}")
        return ColumnTable(np.concatenate([self.x, other.x]), np.concatenate([self.y, other.y]),
                           np.concatenate([self.intensity, other.intensity]), np.concatenate([self.score, other.score]),
                           np.concatenate([self.cls, other.cls]), self.class_names)

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

    def write_csv(self, path: str | Path, pixel_size_A: float | None = None) -> Path:
        """Write ``x_px,y_px,intensity,class,score`` (plus ``x_A,y_A`` when the pixel size is known).

        Parameters
        ----------
        pixel_size_A : float, optional
            Angstrom per pixel; ``x_A = x_px * pixel_size_A`` (origin at the top-left pixel centre).
        """
        path = Path(path)
        header = list(CSV_HEADER) + (["x_A", "y_A"] if pixel_size_A else [])
        labels = self.class_labels()
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for k in range(len(self)):
                row = [f"{self.x[k]:.3f}", f"{self.y[k]:.3f}", f"{self.intensity[k]:.6g}", labels[k],
                       f"{self.score[k]:.3f}"]
                if pixel_size_A:
                    row += [f"{self.x[k] * pixel_size_A:.4f}", f"{self.y[k] * pixel_size_A:.4f}"]
                w.writerow(row)
        return path


def read_csv(path: str | Path) -> tuple[ColumnTable, list[str]]:
    """Read a table written by :meth:`ColumnTable.write_csv`; returns it and the header.

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
    return ColumnTable(col("x_px", float), col("y_px", float), col("intensity", float), col("score", float), cls,
                       tuple(names) or ("column",)), header
