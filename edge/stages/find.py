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
3. Dose-adaptive threshold: the score threshold is chosen per frame so that the expected share of noise
   maxima among the accepted candidates stays below ``fdr`` -- the Benjamini-Hochberg step-up rule
   (Y. Benjamini & Y. Hochberg, J. R. Stat. Soc. B 57, 289 (1995)) applied to local maxima as in
   A. Schwartzman, Y. Gavrilov & R. J. Adler, "Multiple testing of local maxima for detection of peaks in
   1D", Ann. Stat. 39, 3290 (2011). The distribution of noise maxima's scores is measured once per
   configuration on a frame of white Gaussian noise put through the same smoothing and background
   (:func:`noise_maxima`); their number in this frame is estimated from its candidates scoring below
   :data:`NULL_FIT_SNR`, where columns are rare (an empirical null: B. Efron, "Large-scale simultaneous
   hypothesis testing: the choice of a null hypothesis", J. Am. Stat. Assoc. 99, 96 (2004)) -- columns
   cover most of a lattice frame, which then holds far fewer noise maxima than a frame of pure noise.
   The threshold lies between ``threshold_min_snr`` and ``threshold_snr``: at high dose the columns stand
   far above it, at low dose it falls to where the
   dimmest columns still outnumber the noise peaks, with no per-dose setting. Candidates whose height is
   below ``relative_threshold`` times the 95th percentile of heights are dropped as well.
4. A greedy non-maximum suppression keeps the highest candidates at least ``hard_distance_px`` apart, and
   two candidates closer than ``min_distance_px`` only where the smoothed frame dips between them by at
   least ``pair_dip_snr`` noise sigmas and ``pair_dip_fraction`` of the lower peak's height
   (:func:`beamloop.edge.kernels.peaks.suppress_dip`): dumbbells and close pairs that the image resolves
   stay two columns; a column split by noise stays one.
5. Each kept peak is refined to sub-pixel precision, either by a parabola fitted to the logarithm of
   the 3x3 neighbourhood (exact for a Gaussian peak; ``refine="gauss"``) or by a Gaussian-weighted
   centre of mass within ``window_px``, iterated about the sub-pixel estimate (``refine="com"``).
5b. Close pairs the smoothed frame does not resolve (dumbbells seen at a resolution near their spacing):
   a column whose second moments on the (background-corrected) raw frame are elongated is compared with
   a pair of round Gaussians along its major axis, and becomes two columns when the pair fits
   significantly better (an F test against one elliptical Gaussian; the method of the "two-Gaussian"
   refinement of dumbbells, cf. atomap's ``Sublattice.refine_atom_positions_using_2d_gaussian``: M. Nord et
   al., Adv. Struct. Chem. Imaging 3, 9 (2017)) -- one column where the image does not support two
   (:func:`beamloop.edge.kernels.peaks.split_pairs`).
6. Columns closer than ``edge_margin_px`` to the frame edge are flagged ``near_edge`` and refitted on the
   (background-corrected) raw frame with a fixed-width Gaussian over the part of their window inside the
   frame (:func:`beamloop.edge.kernels.peaks.fit_gaussian_fixed_width`): the smoothed frame's reflected
   border pulls such peaks towards the edge. Candidates are searched down to ``border_px`` (1) from the edge.

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
    bh_threshold,
    local_background,
    local_maxima,
    refine,
    refine_near_edge,
    split_pairs,
    suppress_dip,
)
from beamloop.edge.kernels.smooth import gaussian_kernel
from beamloop.edge.materials import MOS2
from beamloop.edge.stages.preprocess import Preprocessor

MOS2_SPACING_A: float = MOS2.nn_spacing_A or 1.824

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
        Highest score threshold, in units of the smoothed frame's noise (the frame's threshold never exceeds
        it). 5.5 lets about one column per 256 x 256 frame of pure noise through (0.2 % of its local maxima).
    threshold_min_snr : float
        Lowest score threshold the dose-adaptive rule may choose.
    fdr : float
        Expected share of noise maxima among the accepted columns (step 3); 0 switches the adaptive rule
        off (the threshold is then ``threshold_snr``).
    hard_distance_px : float
        Two columns closer than this are always one (0: ``min_distance_px``, no pair test).
    pair_dip_snr, pair_dip_fraction : float
        Dip a pair closer than ``min_distance_px`` must show to stay two columns (step 4).
    edge_margin_px : float
        Columns closer to the frame edge are flagged ``near_edge`` and refitted (step 6); 0 disables.
    split_pairs : bool
        Two-Gaussian refinement of elongated columns (step 5b).
    pair_ratio, pair_f : float
        A column is tested as a pair when the ratio of its major to minor variance exceeds ``pair_ratio``, and
        split when the pair model's F statistic exceeds ``pair_f``.
    pair_sep_sigmas : float
        Smallest separation of a split pair, in the pair's minor-axis sigmas.
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
    threshold_min_snr: float = 3.0
    fdr: float = 0.05
    hard_distance_px: float = 0.0
    pair_dip_snr: float = 4.0
    pair_dip_fraction: float = 0.15
    edge_margin_px: float = 0.0
    split_pairs: bool = True
    pair_ratio: float = 1.5
    pair_f: float = 20.0
    pair_sep_sigmas: float = 2.5

    @classmethod
    def for_spacing(cls, spacing_px: float, column_sigma_px: float | None = None, **kw) -> FinderConfig:
        """Parameters for columns ``spacing_px`` apart (nearest neighbours), of blurred sigma
        ``column_sigma_px`` (default: spacing / 5.5).

        Raises ``ValueError`` when the spacing is below 3 pixels (columns cannot be separated).
        """
        if not (math.isfinite(spacing_px) and spacing_px >= 3):
            raise ValueError(f"column spacing of {spacing_px} px is too small to separate columns (need >= 3 px)")
        sig = column_sigma_px if column_sigma_px else spacing_px / 5.5
        sig = min(max(sig, 0.7), spacing_px / 3.0)
        kw = {"hard_distance_px": min(2.0 * sig, 0.55 * spacing_px), "edge_margin_px": 2.355 * sig, **kw}
        return cls(
            sigma_px=sig,
            min_distance_px=0.55 * spacing_px,
            background_px=max(0.9 * spacing_px, 2.0),
            window_px=max(0.3 * spacing_px, 1.5),
            border_px=1,
            **kw,
        )

    @classmethod
    def for_lattice(cls, period_px: float, column_sigma_px: float, **kw) -> FinderConfig:
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
        md = max(2.0 * sig, 0.4 * period_px)
        kw = {"hard_distance_px": min(2.0 * sig, md), "edge_margin_px": 2.355 * sig, **kw}
        return cls(
            sigma_px=sig,
            min_distance_px=md,
            background_px=max(0.5 * period_px, 2.0),
            window_px=max(sig, 1.5),
            border_px=1,
            **kw,
        )

    @classmethod
    def for_pixel_size(cls, pixel_size_A: float, spacing_A: float = MOS2_SPACING_A,
                       column_sigma_A: float = MOS2.column_sigma_A, **kw) -> FinderConfig:
        """Parameters from physical sizes: nearest-neighbour column distance ``spacing_A`` (default MoS2's
        Mo-S distance, :data:`beamloop.edge.materials.MOS2`) and blurred column sigma ``column_sigma_A``,
        at ``pixel_size_A`` Angstrom per pixel. The two-Gaussian pair test is off (``split_pairs=False``): the
        material's spacing is the closest two columns come.

        Raises ``ValueError`` for a non-positive pixel size.
        """
        if not (math.isfinite(pixel_size_A) and pixel_size_A > 0):
            raise ValueError(f"pixel size must be a positive number of Angstrom, got {pixel_size_A}")
        # a material of known nearest-neighbour spacing has no columns closer than it: no pair test
        kw = {"split_pairs": False, **kw}
        return cls.for_spacing(spacing_A / pixel_size_A, column_sigma_A / pixel_size_A, **kw)

    @classmethod
    def for_meta(cls, meta: FrameMeta, **kw) -> FinderConfig:
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
    def for_image(cls, image: np.ndarray, period_px: float | None = None, **kw) -> FinderConfig:
        """Parameters for an uncalibrated image: the lattice period (``period_px``, else estimated) and the
        column sigma estimated from its autocorrelation (:func:`beamloop.edge.analysis.spacing.estimate_scale`).

        Raises
        ------
        ValueError
            The scale cannot be estimated (flat image, no lattice period, too small).
        """
        from beamloop.edge.analysis.spacing import estimate_scale

        est = estimate_scale(np.asarray(image), period_px)
        return cls.for_lattice(est.period_px, est.column_sigma_px, **kw)


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
        self.noise_scores: np.ndarray
        self.noise_density: float
        self.noise_scores, self.noise_density = noise_maxima(config) if config.fdr > 0 else (np.zeros(0), 0.0)
        self._below = float(np.searchsorted(self.noise_scores, NULL_FIT_SNR)) / max(len(self.noise_scores), 1)
        self.threshold = math.nan
        """Score threshold applied to the last frame (noise sigmas of the smoothed frame)."""

    def allocate(self, shape: tuple[int, ...]) -> None:
        """Buffers for frames of ``shape``."""
        self.buffers = PeakBuffers(shape, self.config.background_px)
        cell = max(int(math.ceil(self.config.min_distance_px)), 1)
        self._cell = cell
        self._head = np.empty(((shape[0] + cell - 1) // cell) * ((shape[1] + cell - 1) // cell), np.int64)
        self._next = np.empty(self.buffers.capacity, np.int64)
        self._flags = np.zeros(self.buffers.capacity, np.uint8)
        cap = self.buffers.capacity
        self._sx, self._sy, self._sh = (np.empty(cap, np.float64) for _ in range(3))
        self._pair = np.zeros(cap, np.uint8)
        self._scratch = np.empty(cap, np.float64)

    def score_threshold(self, scores: np.ndarray, area_px: float) -> float:
        """The frame's score threshold (step 3 of the module docstring) for candidate ``scores`` (the
        reference implementation of the kernel :func:`beamloop.edge.kernels.peaks.bh_threshold` the finder
        runs)."""
        cfg = self.config
        if cfg.fdr <= 0 or len(scores) == 0 or len(self.noise_scores) == 0:
            return cfg.threshold_snr
        desc = np.sort(scores)[::-1]
        # empirical null: the number of noise maxima in this frame, from its candidates below NULL_FIT_SNR
        # (mostly noise) over the share of pure-noise maxima that lie there; at most the pure-noise count
        n0 = min(float(np.count_nonzero(scores < NULL_FIT_SNR)) / max(self._below, 1e-6), self.noise_density * area_px)
        expected = n0 * noise_survival(self.noise_scores, desc)
        ok = np.flatnonzero(expected <= cfg.fdr * np.arange(1, len(desc) + 1))
        t = float(desc[ok[-1]]) if len(ok) else cfg.threshold_snr
        return min(cfg.threshold_snr, max(cfg.threshold_min_snr, t))

    def find_smoothed(self, smooth: np.ndarray, noise: float, raw: np.ndarray | None = None) -> ColumnTable:
        """Columns of a smoothed frame (float32, rows x cols) whose raw noise sigma is ``noise``.

        ``raw`` (the unsmoothed frame, same shape) is used to refit the columns near the frame edge (step 6).
        Returns a new :class:`~beamloop.edge.frame.columns.ColumnTable` (unclassified: ``cls = -1``):
        ``intensity`` the height above the local background, ``score`` that height over the smoothed
        frame's noise, ``near_edge`` the step-6 flag.
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
            self.threshold = cfg.threshold_snr
            return ColumnTable.empty()
        if cfg.fdr > 0 and len(self.noise_scores):
            area = float(smooth.shape[0] * smooth.shape[1])
            self.threshold = bh_threshold(height, n, noise_s, self.noise_scores, self.noise_density * area,
                                          self._below, NULL_FIT_SNR, cfg.fdr, cfg.threshold_min_snr,
                                          cfg.threshold_snr, self._scratch)
        else:
            self.threshold = cfg.threshold_snr
        floor = max(self.threshold * noise_s, cfg.relative_threshold * float(np.percentile(height, 95)))
        good = np.flatnonzero(height > floor)
        order = good[np.argsort(-b.cv[good], kind="stable")]
        hard = cfg.hard_distance_px if cfg.hard_distance_px > 0 else cfg.min_distance_px
        nk = suppress_dip(smooth, b.ci, b.cj, b.bg, order, len(order), hard, cfg.min_distance_px,
                          cfg.pair_dip_snr * noise_s, cfg.pair_dip_fraction, self._head, self._next, self._cell, b.keep)
        refine(smooth, b.ci, b.cj, b.bg, b.keep, nk, REFINE_METHODS[cfg.refine], cfg.window_px, b.x[0], b.y[0], b.h[0])
        img = raw if raw is not None else smooth
        bgk = b.bg[b.keep[:nk]].astype(np.float64)
        flags = self._flags
        if cfg.edge_margin_px > 0:
            refine_near_edge(img, b.x[0], b.y[0], bgk, nk, cfg.sigma_px, 2.0 * cfg.sigma_px, cfg.edge_margin_px, 4,
                             flags)
        else:
            flags[:nk] = 0
        x, y, h = b.x[0], b.y[0], b.h[0]
        if cfg.split_pairs and 0 < nk <= len(self._sx) // 2:
            radius = max(cfg.min_distance_px, 2.0 * cfg.sigma_px)
            hard = cfg.hard_distance_px if cfg.hard_distance_px > 0 else 2.0
            no = split_pairs(img, x, y, h, bgk, nk, radius, cfg.pair_ratio, cfg.pair_f, hard, cfg.pair_sep_sigmas,
                             self._sx, self._sy, self._sh, self._pair)
            if no != nk:  # some columns became pairs: carry the edge flags over to their members
                src = np.repeat(np.arange(nk), 1 + self._pair_count(no, nk))
                flags[:no] = flags[src]
                nk = no
            x, y, h = self._sx, self._sy, self._sh
        h32 = h[:nk].astype(np.float32)
        return ColumnTable(
            x=x[:nk].astype(np.float32),
            y=y[:nk].astype(np.float32),
            intensity=h32,
            score=(h32 / noise_s).astype(np.float32),
            cls=np.full(nk, -1, np.int8),
            near_edge=flags[:nk].astype(bool),
        )

    def _pair_count(self, no: int, n: int) -> np.ndarray:
        """For each of the ``n`` input columns of :func:`split_pairs`, 1 when it became a pair, else 0."""
        out = np.zeros(n, np.int64)
        k = t = 0
        while t < no and k < n:
            if self._pair[t]:
                out[k] = 1
                t += 2
            else:
                t += 1
            k += 1
        return out


NULL_FIT_SNR = 2.5
"""Candidates scoring below this (noise sigmas) count the frame's noise maxima (the empirical null of step 3)."""

_NOISE_CACHE: dict[tuple, tuple[np.ndarray, float]] = {}
NOISE_FRAME_PX = 1024
"""Side of the white-noise frame :func:`noise_maxima` measures on."""


def noise_maxima(config: FinderConfig) -> tuple[np.ndarray, float]:
    """Scores of the local maxima of white Gaussian noise under ``config``'s smoothing and background
    (sorted ascending), and their number per pixel: the null distribution of step 3 of the module docstring.

    Measured once per (sigma, background window, quantile) on a seeded :data:`NOISE_FRAME_PX`-square frame of
    unit-variance noise (about 30 ms) and cached.
    """
    key = (round(config.sigma_px, 3), round(config.background_px, 3), round(config.background_quantile, 4))
    if key in _NOISE_CACHE:
        return _NOISE_CACHE[key]
    n = NOISE_FRAME_PX
    frame = np.random.default_rng(20_240_601).standard_normal((n, n)).astype(np.float32)
    pre = Preprocessor(config.sigma_px)
    smooth, noise = pre.run(frame)
    b = PeakBuffers((n, n), config.background_px)
    edge = gaussian_kernel(config.sigma_px).shape[0] // 2 + 1
    m = min(local_maxima(smooth, edge, b.rmax, b.ci, b.cj, b.cv), b.capacity)
    local_background(smooth, b.ci, b.cj, m, config.background_px, config.background_quantile, b.scratch, b.bg)
    scores = np.sort((b.cv[:m] - b.bg[:m]) / max(noise * noise_gain(pre.kernel), 1e-12)).astype(np.float64)
    out = (scores, m / float((n - 2 * edge) ** 2))
    _NOISE_CACHE[key] = out
    return out


def noise_survival(noise_scores: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Fraction of noise maxima with a score of at least ``t`` (array), from the sorted ``noise_scores``;
    beyond the top 1 % the measured tail is continued as a Gaussian tail ``exp(-(t^2 - t_0^2) / 2)``."""
    m = len(noise_scores)
    sf = (m - np.searchsorted(noise_scores, t, side="left")) / m
    k0 = int(0.99 * m)
    t0 = noise_scores[k0]
    tail = (m - k0) / m * np.exp(-0.5 * (np.maximum(t, t0) ** 2 - t0 * t0))
    return np.where(t > t0, tail, sf)


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
        return self.peaks.find_smoothed(smooth, noise, frame)

    def find_smoothed(self, smooth: np.ndarray, noise: float) -> ColumnTable:
        """Columns of an already smoothed frame (see :meth:`PeakFinder.find_smoothed`)."""
        return self.peaks.find_smoothed(smooth, noise)


class FindPeaks(StageBase):
    """Frame stage ``find``: writes ``columns`` (unclassified) from ``smooth`` and ``noise`` (and the raw frame
    for the columns near the edge).

    Parameters
    ----------
    config : FinderConfig, optional
        Fixed parameters; by default :meth:`FinderConfig.for_meta` of each series.
    from_background : bool
        A background stage runs before: edge refits use its ``extras["frame"]``.
    """

    name = "find"
    reads: tuple[str, ...] = ("image", "smooth", "noise")
    writes = ("columns", "extras")

    finder: PeakFinder
    """The finder of the current series (made by :meth:`prepare`)."""

    def __init__(self, config: FinderConfig | None = None, from_background: bool = False) -> None:
        self.config = config
        self.from_background = bool(from_background)
        if from_background:
            self.reads = ("image", "smooth", "noise", "extras")

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
        """``ctx.columns`` from ``ctx.smooth`` and ``ctx.noise`` (edge refits on ``extras["frame"]`` when a
        background stage wrote it, else on ``ctx.image``); the frame's score threshold goes to
        ``extras["threshold_snr"]``."""
        raw = ctx.extras["frame"] if self.from_background else ctx.image
        ctx.columns = self.finder.find_smoothed(ctx.smooth, ctx.noise, raw)
        ctx.extras["threshold_snr"] = self.finder.threshold
