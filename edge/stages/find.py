"""Finding atomic columns in a smoothed frame (numba): local maxima, minimum separation, sub-pixel refinement.

Method
------
1. Candidates are the local maxima (3x3) of the Gaussian-smoothed frame (a matched filter for the
   column's blurred profile).
2. Each candidate's local background is a low quantile (``background_quantile``, 5 %) of the smoothed
   frame in a square window of half-width ``background_px`` (about one column spacing): the level of the
   valleys between columns; its height above that background is its intensity, and that height divided
   by the noise of the smoothed frame is its score. (The window minimum would let the deepest noise dip
   inflate every noise peak: on pure noise, half of all local maxima then stood 3.6 sigma high.)
3. Candidates whose score is below ``threshold_snr``, or whose height is below ``relative_threshold``
   times the 95th percentile of heights, are dropped.
4. A greedy non-maximum suppression keeps the highest candidates at least ``min_distance_px`` apart.
5. Each kept peak is refined to sub-pixel precision, either by a parabola fitted to the logarithm of
   the 3x3 neighbourhood (exact for a Gaussian peak; ``refine="gauss"``) or by a Gaussian-weighted
   centre of mass within ``window_px``, iterated about the sub-pixel estimate (``refine="com"``).

The noise of the smoothed frame is the raw noise (Immerkaer's estimate) times the smoothing kernel's
noise gain ``sqrt(sum k^2)`` per axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.frame.stage import FrameError, StageBase, check_frame
from beamloop.edge.kernels.peaks import (
    REFINE_METHODS,
    PeakBuffers,
    local_background,
    local_maxima,
    refine,
    suppress,
)
from beamloop.edge.kernels.smooth import gaussian_kernel
from beamloop.edge.materials import MOS2

MOS2_SPACING_A: float = MOS2.nn_spacing_A or 1.824
from beamloop.edge.stages.preprocess import Preprocessor

if TYPE_CHECKING:
    from beamloop.edge.frame.context import FrameContext, FrameMeta


@dataclass(frozen=True)
class FinderConfig:
    """Parameters of the classical column finder, in pixels.

    Attributes
    ----------
    sigma_px : float
        Gaussian smoothing sigma (matched to the column's blurred width).
    min_distance_px : float
        Minimum distance between two columns.
    background_px : float
        Half-width of the window in which the local background is measured.
    background_quantile : float
        Quantile of the window's values taken as the background.
    threshold_snr : float
        Minimum height above background, in units of the smoothed frame's noise. The default 5.5 lets
        about one column per 256 x 256 frame of pure noise through (0.2 % of its local maxima).
    relative_threshold : float
        Minimum height as a fraction of the 95th percentile of candidate heights.
    refine : {"gauss", "com", "none"}
        Sub-pixel refinement.
    window_px : float
        Radius of the centre-of-mass window (``refine="com"``).
    border_px : int
        Peaks closer than this to the frame edge are ignored.
    """

    sigma_px: float
    min_distance_px: float
    background_px: float
    threshold_snr: float = 5.5
    background_quantile: float = 0.05
    relative_threshold: float = 0.08
    refine: str = "gauss"
    window_px: float = 3.0
    border_px: int = 2

    @classmethod
    def for_spacing(cls, spacing_px: float, column_sigma_px: float | None = None, **kw) -> "FinderConfig":
        """Parameters for columns ``spacing_px`` apart (nearest neighbours), of blurred sigma
        ``column_sigma_px`` (default: spacing / 5.5).

        Raises ``ValueError`` when the spacing is below 3 pixels (columns cannot be separated).
        """
        if not (math.isfinite(spacing_px) and spacing_px >= 3):
            raise ValueError(f"column spacing of {spacing_px} px is too small to separate columns (need >= 3 px)")
        sig = column_sigma_px if column_sigma_px else spacing_px / 5.5
        sig = min(max(sig, 0.7), spacing_px / 3.0)
        return cls(
            sigma_px=sig,
            min_distance_px=0.55 * spacing_px,
            background_px=max(0.9 * spacing_px, 2.0),
            window_px=max(0.3 * spacing_px, 1.5),
            border_px=max(int(round(0.2 * spacing_px)), 1),
            **kw,
        )

    @classmethod
    def for_lattice(cls, period_px: float, column_sigma_px: float, **kw) -> "FinderConfig":
        """Parameters for an uncalibrated image, from its lattice period and column sigma in pixels
        (:func:`beamloop.edge.analysis.spacing.estimate_scale`): columns may stand closer than the period (honeycombs,
        dumbbells, mixed sublattices), so the minimum distance is the larger of 2 column sigmas and 0.4
        periods.

        Raises ``ValueError`` for a period below 3 pixels or a non-positive sigma.
        """
        if not (math.isfinite(period_px) and period_px >= 3 and column_sigma_px > 0):
            raise ValueError(f"need a lattice period >= 3 px and a positive column sigma, got {period_px}, "
                             f"{column_sigma_px}")
        sig = min(max(column_sigma_px, 0.7), period_px / 3.0)
        return cls(
            sigma_px=sig,
            min_distance_px=max(2.0 * sig, 0.4 * period_px),
            background_px=max(0.5 * period_px, 2.0),
            window_px=max(sig, 1.5),
            border_px=max(int(round(sig)), 1),
            **kw,
        )

    @classmethod
    def for_pixel_size(cls, pixel_size_A: float, spacing_A: float = MOS2_SPACING_A,
                       column_sigma_A: float = MOS2.column_sigma_A, **kw) -> "FinderConfig":
        """Parameters from physical sizes: nearest-neighbour column distance ``spacing_A`` (default MoS2's
        Mo-S distance, :data:`beamloop.edge.materials.MOS2`) and blurred column sigma ``column_sigma_A``,
        at ``pixel_size_A`` Angstrom per pixel.

        Raises ``ValueError`` for a non-positive pixel size.
        """
        if not (math.isfinite(pixel_size_A) and pixel_size_A > 0):
            raise ValueError(f"pixel size must be a positive number of Angstrom, got {pixel_size_A}")
        return cls.for_spacing(spacing_A / pixel_size_A, column_sigma_A / pixel_size_A, **kw)

    @classmethod
    def for_meta(cls, meta: FrameMeta, **kw) -> "FinderConfig":
        """Parameters for a series: from the material's spacing and the pixel size when both are known
        (:meth:`for_pixel_size`), else from the lattice period and column sigma in ``meta``
        (:meth:`for_lattice`; the frame path estimates them from the first frame when not given).

        Raises
        ------
        FrameError
            Neither a physical scale nor a lattice period, or one too small to separate columns.
        """
        try:
            m = meta.material
            if meta.pixel_size_A and m.nn_spacing_A:
                return cls.for_pixel_size(meta.pixel_size_A, spacing_A=m.nn_spacing_A, column_sigma_A=m.column_sigma_A,
                                          **kw)
            if meta.period_px is not None:
                sigma = meta.column_sigma_px or meta.period_px / 5.5
                return cls.for_lattice(meta.period_px, sigma, **kw)
        except ValueError as exc:
            raise FrameError(str(exc)) from None
        raise FrameError("frame has no pixel size and no lattice period; give the pixel size or column spacing")

    @classmethod
    def for_image(cls, image: np.ndarray, period_px: float | None = None, **kw) -> "FinderConfig":
        """Parameters for an uncalibrated image: the lattice period (``period_px``, else estimated) and the
        column sigma estimated from its autocorrelation (:func:`beamloop.edge.analysis.spacing.estimate_scale`).

        Raises
        ------
        ValueError
            The scale cannot be estimated (flat image, no lattice period, too small).
        """
        from beamloop.edge.analysis.spacing import estimate_scale

        est = estimate_scale(np.asarray(image, np.float32))
        return cls.for_lattice(period_px or est.period_px, est.column_sigma_px, **kw)


class PeakFinder:
    """Steps 1-5 of the module docstring on an already smoothed frame, in buffers reused per shape.

    Parameters
    ----------
    config : FinderConfig
    noise_gain : float
        Factor from the raw frame's noise sigma to the smoothed frame's (``sum(k**2)`` of the 1-D kernel k).

    Raises
    ------
    ValueError
        Unknown ``config.refine``.
    """

    def __init__(self, config: FinderConfig, noise_gain: float) -> None:
        if config.refine not in REFINE_METHODS:
            raise ValueError(f"refine must be one of {sorted(REFINE_METHODS)}, got {config.refine!r}")
        self.config = config
        self.noise_gain = float(noise_gain)
        self.buffers = PeakBuffers((1, 1), config.background_px)

    def allocate(self, shape: tuple[int, ...]) -> None:
        """Buffers for frames of ``shape``."""
        self.buffers = PeakBuffers(shape, self.config.background_px)

    def find_smoothed(self, smooth: np.ndarray, noise: float) -> ColumnTable:
        """Columns of a smoothed frame (float32, rows x cols) whose raw noise sigma is ``noise``.

        Returns a new :class:`~beamloop.edge.frame.columns.ColumnTable` (unclassified: ``cls = -1``):
        ``intensity`` the height above the local background, ``score`` that height over the smoothed
        frame's noise.
        """
        cfg = self.config
        if self.buffers.shape != smooth.shape:
            self.allocate(smooth.shape)
        b = self.buffers
        n = local_maxima(smooth, cfg.border_px, b.rmax, b.ci, b.cj, b.cv)
        n = min(n, b.capacity)
        local_background(smooth, b.ci, b.cj, n, cfg.background_px, cfg.background_quantile, b.scratch, b.bg)
        height = b.cv[:n] - b.bg[:n]
        noise_s = max(noise * self.noise_gain, 1e-12)
        if n == 0:
            return ColumnTable.empty()
        floor = max(cfg.threshold_snr * noise_s, cfg.relative_threshold * float(np.percentile(height, 95)))
        good = np.flatnonzero(height > floor)
        order = good[np.argsort(-b.cv[good], kind="stable")]
        nk = suppress(b.ci, b.cj, order, len(order), cfg.min_distance_px, b.mask, b.keep)
        refine(smooth, b.ci, b.cj, b.bg, b.keep, nk, REFINE_METHODS[cfg.refine], cfg.window_px, b.x[0], b.y[0], b.h[0])
        h = b.h[0, :nk].astype(np.float32)
        return ColumnTable(
            x=b.x[0, :nk].astype(np.float32),
            y=b.y[0, :nk].astype(np.float32),
            intensity=h,
            score=(h / noise_s).astype(np.float32),
            cls=np.full(nk, -1, np.int8),
        )


def noise_gain(kernel: np.ndarray) -> float:
    """Noise gain of a separable smoothing with the 1-D ``kernel`` k: white noise of sigma n becomes
    ``n * sum(k**2)`` after the 2-D kernel k (x) k (whose squared sum is ``sum(k**2)**2``)."""
    k = kernel.astype(np.float64)
    return float(np.sum(k * k))


class ColumnFinder:
    """The classical atomic-column finder on whole frames (preprocess + find), outside a frame path.

    For notebooks and benchmarks; the service runs the same two steps as the stages :class:`Preprocess`
    and :class:`FindPeaks` of :func:`beamloop.edge.path.classical_path`.

    Parameters
    ----------
    config : FinderConfig

    Raises
    ------
    ValueError
        Unknown ``config.refine`` or a bad sigma.
    """

    def __init__(self, config: FinderConfig) -> None:
        self.config = config
        self.preprocessor = Preprocessor(config.sigma_px)
        self.noise_gain = noise_gain(self.preprocessor.kernel)
        self.peaks = PeakFinder(config, self.noise_gain)

    def find(self, frame: np.ndarray) -> ColumnTable:
        """Preprocess ``frame`` (2-D, integer or float32/float64) and find its columns (unclassified).

        Raises
        ------
        beamloop.edge.frame.stage.FrameError
            Bad frame (:func:`~beamloop.edge.frame.stage.check_frame`) or smaller than the kernel.
        """
        check_frame(frame)
        smooth, noise = self.preprocessor.run(frame)
        return self.peaks.find_smoothed(smooth, noise)

    def find_smoothed(self, smooth: np.ndarray, noise: float) -> ColumnTable:
        """Columns of an already smoothed frame (see :meth:`PeakFinder.find_smoothed`)."""
        return self.peaks.find_smoothed(smooth, noise)


class FindPeaks(StageBase):
    """Frame stage ``find``: writes ``columns`` (unclassified) from ``smooth`` and ``noise``.

    Parameters
    ----------
    config : FinderConfig, optional
        Fixed parameters; by default :meth:`FinderConfig.for_meta` of each series.
    """

    name = "find"
    reads = ("smooth", "noise")
    writes = ("columns",)

    finder: PeakFinder
    """The finder of the current series (made by :meth:`prepare`)."""

    def __init__(self, config: FinderConfig | None = None) -> None:
        self.config = config

    def prepare(self, meta: FrameMeta) -> None:
        """A :class:`PeakFinder` for the series' scale, with buffers for its shape.

        Raises
        ------
        FrameError
            No scale for the series.
        """
        cfg = self.config or FinderConfig.for_meta(meta)
        gain = noise_gain(gaussian_kernel(cfg.sigma_px))
        if getattr(self, "finder", None) is None or self.finder.config != cfg:
            self.finder = PeakFinder(cfg, gain)
        self.finder.allocate(meta.shape)

    def process(self, ctx: FrameContext) -> None:
        """``ctx.columns`` from ``ctx.smooth`` and ``ctx.noise``."""
        ctx.columns = self.finder.find_smoothed(ctx.smooth, ctx.noise)
