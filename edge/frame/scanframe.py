"""Scan frames: the named frames that beam positions refer to, and conversions between coordinates.

Conventions (../shared/notes/scan-control.md, the common denominator of Nion Swift, AutoScript and
others): a beam position is a pair of fractions ``(x, y)`` of a named scan frame, origin at the top-left
corner of the frame, x to the right along the fast scan axis, y down along the slow axis; ``(0, 0)`` is
the outer corner of the first pixel and ``(1, 1)`` the outer corner of the last. Pixel ``(row i, col j)``
is acquired with the probe at the fraction ``((j + 0.5) / cols, (i + 0.5) / rows)``. In pixel
coordinates ``x_px`` is the column index and ``y_px`` the row index, so a column found at ``(x_px,
y_px)`` lies at the fraction ``((x_px + 0.5) / cols, (y_px + 0.5) / rows)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class BeamPositionError(ValueError):
    """A beam position that must not be sent: not finite, outside the scan frame, or for a stale frame.

    ``code`` is the bridge error code: ``out_of_range`` or ``stale_frame``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ScanFrame:
    """A scan frame that beam positions refer to.

    Attributes
    ----------
    frame_id : int
        Identifier given by the scan controller when the frame was acquired.
    shape : tuple (rows, cols)
        Pixels along the slow (y) and fast (x) axes.
    fov_nm : tuple (height, width)
        Field of view in nanometres.
    center_nm : tuple (x, y)
        Position of the frame's centre in the specimen (stage) coordinate system, nanometres.
    rotation_deg : float
        Scan rotation: angle from the specimen x axis to the fast scan axis, degrees, counter-clockwise.
    dwell_us : float
        Pixel dwell time in microseconds.
    """

    frame_id: int
    shape: tuple[int, int]
    fov_nm: tuple[float, float]
    center_nm: tuple[float, float] = (0.0, 0.0)
    rotation_deg: float = 0.0
    dwell_us: float = 1.0

    @property
    def pixel_size_A(self) -> float:
        """Pixel size along the fast axis, Angstrom per pixel."""
        return self.fov_nm[1] * 10.0 / self.shape[1]

    @property
    def pixel_size_A_yx(self) -> tuple[float, float]:
        """Pixel sizes (slow axis, fast axis), Angstrom per pixel."""
        return self.fov_nm[0] * 10.0 / self.shape[0], self.fov_nm[1] * 10.0 / self.shape[1]

    def fraction_of_pixel(self, x_px, y_px):
        """Fractions ``(fx, fy)`` of pixel coordinates (column index x, row index y; arrays allowed)."""
        return (np.asarray(x_px) + 0.5) / self.shape[1], (np.asarray(y_px) + 0.5) / self.shape[0]

    def pixel_of_fraction(self, fx, fy):
        """Pixel coordinates ``(x_px, y_px)`` of fractions (inverse of :meth:`fraction_of_pixel`)."""
        return np.asarray(fx) * self.shape[1] - 0.5, np.asarray(fy) * self.shape[0] - 0.5

    def specimen_of_fraction(self, fx, fy):
        """Specimen coordinates ``(x, y)`` in Angstrom of fractions, for an undistorted scan."""
        h, w = self.fov_nm[0] * 10.0, self.fov_nm[1] * 10.0
        u = (np.asarray(fx, dtype=float) - 0.5) * w
        v = (np.asarray(fy, dtype=float) - 0.5) * h
        c, s = math.cos(math.radians(self.rotation_deg)), math.sin(math.radians(self.rotation_deg))
        return self.center_nm[0] * 10.0 + c * u - s * v, self.center_nm[1] * 10.0 + s * u + c * v

    def fraction_of_specimen(self, x_A, y_A):
        """Fractions of specimen coordinates in Angstrom (inverse of :meth:`specimen_of_fraction`)."""
        h, w = self.fov_nm[0] * 10.0, self.fov_nm[1] * 10.0
        dx = np.asarray(x_A, dtype=float) - self.center_nm[0] * 10.0
        dy = np.asarray(y_A, dtype=float) - self.center_nm[1] * 10.0
        c, s = math.cos(math.radians(self.rotation_deg)), math.sin(math.radians(self.rotation_deg))
        return (c * dx + s * dy) / w + 0.5, (-s * dx + c * dy) / h + 0.5

    def as_dict(self) -> dict:
        """Plain dict for CBOR, JSON and HDF5 attributes."""
        return {
            "frame_id": self.frame_id,
            "shape": list(self.shape),
            "fov_nm": list(self.fov_nm),
            "center_nm": list(self.center_nm),
            "rotation_deg": self.rotation_deg,
            "dwell_us": self.dwell_us,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ScanFrame:
        """Inverse of :meth:`as_dict`.

        Raises
        ------
        ValueError
            Missing keys or values of the wrong type or range.
        """
        try:
            frame = cls(
                frame_id=int(d["frame_id"]),
                shape=(int(d["shape"][0]), int(d["shape"][1])),
                fov_nm=(float(d["fov_nm"][0]), float(d["fov_nm"][1])),
                center_nm=(float(d.get("center_nm", (0, 0))[0]), float(d.get("center_nm", (0, 0))[1])),
                rotation_deg=float(d.get("rotation_deg", 0.0)),
                dwell_us=float(d.get("dwell_us", 1.0)),
            )
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"invalid scan frame description {d!r}: {exc}") from None
        if min(frame.shape) <= 0 or not all(math.isfinite(v) and v > 0 for v in frame.fov_nm):
            raise ValueError(f"invalid scan frame description {d!r}: non-positive shape or field of view")
        return frame


def check_fraction(x: float, y: float) -> tuple[float, float]:
    """Validate a beam position given as fractions of a scan frame.

    Returns the position as two Python floats.

    Raises
    ------
    BeamPositionError
        (code ``out_of_range``) when either value is not a real number, not finite (NaN, inf), or
        lies outside ``[0, 1]``.
    """
    try:
        fx, fy = float(x), float(y)
    except (TypeError, ValueError):
        raise BeamPositionError("out_of_range", f"beam position ({x!r}, {y!r}) is not a pair of numbers") from None
    if not (math.isfinite(fx) and math.isfinite(fy)):
        raise BeamPositionError("out_of_range", f"beam position ({fx}, {fy}) is not finite")
    if not (0.0 <= fx <= 1.0 and 0.0 <= fy <= 1.0):
        raise BeamPositionError("out_of_range",
                                f"beam position ({fx:.6g}, {fy:.6g}) lies outside the scan frame [0, 1]")
    return fx, fy
