"""What a frame stage reads and writes: the metadata of a series and the context of one frame.

:class:`FrameMeta` changes per series (shape, dtype, pixel size, material, lattice scale): the frame path
calls every stage's ``prepare`` when it changes. :class:`FrameContext` is one object per frame path, reused
for every frame: the runner puts the image and its scan frame in, and stages fill the named slots
(:data:`SLOTS`) in the order of the path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.frame.stage import FrameError
from beamloop.edge.materials import GENERIC, Material

SLOTS = ("image", "scan", "smooth", "noise", "columns", "bonds", "targets", "extras")
"""Names of the per-frame slots a stage may declare in ``reads`` / ``writes``; ``image`` and ``scan`` are
written by the runner, the others by stages."""

INPUT_SLOTS = ("image", "scan")
"""Slots the runner fills before the first stage."""

PIXEL_SIZE_A = (0.001, 100.0)
"""Pixel sizes a series may state, Angstrom (smallest, largest): from sub-picometre sampling of a
diffraction-limited probe to 10 nm overview pixels. Outside, the number is taken as corrupt, not as a scale:
a pixel size drives the size of smoothing kernels and buffers."""


def check_pixel_size(value: Any, what: str = "pixel size") -> float | None:
    """A stated pixel size as a float in :data:`PIXEL_SIZE_A`, or None when none is stated (``None``).

    Parameters
    ----------
    value : object
        The stated value (e.g. a stream message's ``user_data["pixel_size_A"]``), Angstrom.
    what : str
        Names the value in the error message.

    Returns
    -------
    float or None

    Raises
    ------
    FrameError
        Not a real number (text, a list, a bool), not finite, or outside :data:`PIXEL_SIZE_A`.
    """
    if value is None:
        return None
    lo, hi = PIXEL_SIZE_A
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FrameError(f"{what} {value!r:.40} is not a number of Angstrom")
    v = float(value) if not (isinstance(value, int) and abs(value) > 1e300) else math.inf
    if not (math.isfinite(v) and lo <= v <= hi):
        raise FrameError(f"{what} {v:g} A is outside {lo:g} .. {hi:g} A")
    return v


NO_IMAGE = np.zeros((0, 0), np.float32)
"""What the array slots hold before a stage writes them (read-only, empty)."""
NO_IMAGE.flags.writeable = False


@dataclass(frozen=True)
class FrameMeta:
    """Properties of a series of frames; a change makes the frame path ``prepare`` its stages again.

    Attributes
    ----------
    shape : (rows, cols)
        Frame size, pixels.
    dtype : numpy.dtype
        Pixel type of the frames (integer counts or float32/float64 intensities).
    pixel_size_A : float or None
        Angstrom per pixel (from the stream's ``start`` message or the file); None when unknown.
    material : Material
        Decides the classes and, with the pixel size, the physical scale.
    period_px : float or None
        Lattice period in pixels when the pixel size does not give it: set by the user, or estimated
        from the first frame of the series by the runner (:func:`beamloop.edge.analysis.spacing.estimate_scale`).
    column_sigma_px : float or None
        Column standard deviation in pixels (with ``period_px``).
    channel : str
        Detector channel the image comes from (e.g. ``"haadf"``).
    """

    shape: tuple[int, int]
    dtype: np.dtype
    pixel_size_A: float | None = None
    material: Material = GENERIC
    period_px: float | None = None
    column_sigma_px: float | None = None
    channel: str = "haadf"

    @classmethod
    def of(cls, image: np.ndarray, pixel_size_A: Any = None, material: Material = GENERIC, **kw: Any
           ) -> FrameMeta:
        """Metadata of ``image`` (2-D) with the given pixel size and material.

        Parameters
        ----------
        image : ndarray (rows, cols)
        pixel_size_A : float or None
            Angstrom per pixel as stated by the stream or the file; None: not stated (the scale is then
            estimated from the frames).
        material : Material
        **kw
            ``period_px``, ``column_sigma_px`` (positive finite numbers or None), ``channel``.

        Raises
        ------
        FrameError
            A pixel size that is not a number in :data:`PIXEL_SIZE_A` (:func:`check_pixel_size`), or a
            period or sigma that is not a positive finite number.
        """
        ps = check_pixel_size(pixel_size_A)
        for key in ("period_px", "column_sigma_px"):
            v = kw.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not (math.isfinite(v) and v > 0)):
                raise FrameError(f"{key} {v!r:.40} is not a positive number of pixels")
        return cls((int(image.shape[0]), int(image.shape[1])) if image.ndim == 2 else tuple(image.shape),
                   image.dtype, ps, material, **kw)

    @property
    def nn_spacing_px(self) -> float | None:
        """Nearest-neighbour column distance in pixels from the material and pixel size, None if either
        is unknown."""
        if self.pixel_size_A and self.material.nn_spacing_A:
            return self.material.nn_spacing_A / self.pixel_size_A
        return None


@dataclass
class FrameContext:
    """The slots of one frame, reused by its frame path from frame to frame.

    Attributes
    ----------
    meta : FrameMeta or None
        The series the current frame belongs to (as resolved by the runner, with the estimated scale).
    image : ndarray (rows, cols)
        The frame: integer counts or float32/float64 intensities, often a read-only view into a receive
        ring (valid until the next frame); an empty array before the first frame.
    scan : ScanFrame or None
        The scan frame the image was acquired in (positions of targets refer to it).
    smooth : ndarray (rows, cols) float32
        The Gaussian-smoothed frame (a buffer of the preprocess stage, overwritten by the next frame); an
        empty array on paths without that stage.
    noise : float
        White-noise standard deviation of the raw frame, in its units.
    columns : ColumnTable
        Found (and classified) columns; a new table per frame, which callers may keep.
    bonds : ndarray (3, 2) float64 or None
        Metal-to-chalcogen bond vectors, pixels (MoS2); None when the frame gives none.
    targets : list of Target
        Beam targets chosen for this frame (a new list per frame).
    want_targets : bool
        Whether the policy should choose targets for this frame (False: e.g. a verification frame).
    extras : dict
        Stage-specific results, e.g. ``"segment"`` for the U-Net's heat maps and uncertainty.
    timings_ns : dict
        Duration of each stage on this frame, nanoseconds, by stage name.
    started_ns : dict
        When each stage started on this frame, ``time.monotonic_ns()`` (the clock of the receivers' ``recv_ns``).
    cpu_ns : dict
        CPU time of the path's thread in each stage, nanoseconds (``time.thread_time_ns``), when the path
        measures it (:attr:`beamloop.edge.path.FramePath.measure_cpu`); empty otherwise.
    """

    meta: FrameMeta | None = None
    image: np.ndarray = field(default_factory=lambda: NO_IMAGE)
    scan: ScanFrame | None = None
    smooth: np.ndarray = field(default_factory=lambda: NO_IMAGE)
    noise: float = math.nan
    columns: ColumnTable = field(default_factory=ColumnTable.empty)
    bonds: np.ndarray | None = None
    targets: list = field(default_factory=list)
    want_targets: bool = True
    extras: dict = field(default_factory=dict)
    timings_ns: dict = field(default_factory=dict)
    started_ns: dict = field(default_factory=dict)
    cpu_ns: dict = field(default_factory=dict)

    @property
    def segment(self):
        """The U-Net's :class:`~beamloop.edge.stages.unet.SegmentResult` of this frame (None on other paths)."""
        return self.extras.get("segment")

    def clear(self) -> None:
        """Empty the slots stages write (before the next frame); buffers stay with their stages."""
        self.smooth = NO_IMAGE
        self.noise = math.nan
        self.columns = ColumnTable.empty(self.meta.material.class_names if self.meta else ("column",))
        self.bonds = None
        self.targets = []
        self.extras.clear()
