"""Frame stage ``register``: sub-pixel frame-to-frame shift and the specimen-drift estimate.

Each frame is registered against the previous frame of the run by cross-correlation with a matrix-multiply DFT
upsampling of its peak (M. Guizar-Sicairos, S. T. Thurman & J. R. Fienup, "Efficient subpixel image
registration algorithms", Opt. Lett. 33, 156-158 (2008); :class:`beamloop.edge.analysis.registration.Registrar`:
each frame's spectrum computed once, the refinement over the frequencies up to :data:`BAND` cycles per pixel),
on mean-subtracted frames under a Tukey window of
:data:`TUKEY_ALPHA` (the frame's edges, where content enters and leaves, would otherwise dominate; a Hann
window weights the middle so much that the shift is biased by a few hundredths of a pixel). Unnormalised
cross-correlation is used: whitening ("phase" normalisation) weights the shot noise of a lattice image as much
as its Bragg peaks (here it misregistered frames by up to tens of pixels). A lattice image correlates almost
as well at every lattice translation of the true shift, so on paths that give the lattice (``bonds``, MoS2)
the measured shift is checked against the drift estimate's prediction for the time between the two frames (the
estimate's velocity times that time; zero before a velocity is known, so the first two frames of a run must be
scanned within half a lattice period of drift of each other): it stands within :data:`UNWRAP_SIGMAS` standard
deviations of the prediction; else, of the shift plus whole lattice vectors (up to :data:`UNWRAP_CELLS` each
way), the one nearest the prediction is taken when it is that close. The shifts add up to the specimen's
displacement since the first frame, which feeds a :class:`beamloop.edge.analysis.drift.DriftEstimator` at the
frame's middle time (the service tells the stage each frame's timing, :meth:`Register.set_timing`, from the
stream's metadata).

**Lattice-aware column matching** (``match_columns``, off by default): after the (unwrapped) correlation shift,
each of the previous frame's columns, moved by that shift, is paired with this frame's nearest column when it
lies within :data:`MATCH_FRACTION` of the material's column spacing (inferred vacancy sites and columns at the
frame edge left out); with at least :data:`MATCH_MIN` pairs the shift is refined by the median of the pairs'
residual displacements (a point-set registration of the located columns, robust to columns gained or lost;
the median over the sub-pixel column fits averages their errors, where the correlation peak carries the
shot noise of every pixel). It needs the frame's columns (``reads`` gains ``columns``) and a material with a
column spacing.

Writes ``extras["drift"]``: ``shift_px`` (this frame's content moved by, against the previous, ``(dx, dy)``
pixels), ``displacement_px`` and ``displacement_A`` (since the first frame: pixels of this frame's scan,
lab-frame Angstrom), ``t_mid_s``, ``velocity_A_per_s``, ``velocity_sigma_A_per_s``, ``error`` (the
registration's own error estimate), ``frames``, ``unwrapped`` (shifts moved by whole lattice vectors so far)
and ``rejected`` (implausible shifts replaced by the prediction, :data:`MAX_DRIFT_A_PER_S`); with
``match_columns`` also ``matched`` (column pairs of this frame; 0 when too few to refine) and ``match_px`` (the
refinement added to the correlation shift, pixels).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from beamloop.edge.analysis.drift import DriftEstimator
from beamloop.edge.analysis.registration import Registrar
from beamloop.edge.frame.stage import StageBase

if TYPE_CHECKING:
    from beamloop.edge.frame.context import FrameContext, FrameMeta

UPSAMPLE_FACTOR = 20
"""Upsampling of the cross-correlation peak: registration to 1/20 pixel."""

TUKEY_ALPHA = 0.3
"""Fraction of each frame side that the registration window tapers (F. J. Harris, "On the use of windows for
harmonic analysis with the discrete Fourier transform", Proc. IEEE 66, 51-83 (1978))."""

BAND = 0.25
"""Highest frequency the sub-pixel refinement sums, cycles per pixel: an atomic column of sigma 1 px keeps 29 % of
its contrast there (Gaussian transfer ``exp(-2 pi^2 sigma^2 f^2)``), one of 2 px under 1 %, so above it the
cross-power spectrum is mostly shot noise."""

UNWRAP_CELLS = 4
"""Lattice translations tried each way when unwrapping a shift (module docstring)."""

MAX_DRIFT_A_PER_S = 3.0
"""Fastest drift a registered shift may imply, A/s; a larger shift is a failed registration (the prediction
is carried on instead, and the estimate is not updated)."""

SLACK_PX = 2.0
"""Shift allowed on top of :data:`MAX_DRIFT_A_PER_S`, pixels (frame-to-frame scan distortion)."""

MATCH_FRACTION = 0.3
"""Largest distance of a column pair (``match_columns``), as a fraction of the material's column spacing: a pair
farther apart would be as near a neighbouring column (half a spacing)."""

MATCH_MIN = 8
"""Fewest column pairs for which ``match_columns`` refines the shift."""

FRAMES_KEPT = 64
"""Frames whose registered displacement :attr:`Register.registered` keeps."""

UNWRAP_SIGMAS = 3.0
"""A measured shift within this many standard deviations of the predicted one is taken as it is."""


class Register(StageBase):
    """Frame stage ``register`` (module docstring).

    Parameters
    ----------
    estimator : DriftEstimator, optional
        Receives each frame's displacement (a new one by default).
    upsample_factor : int
        Sub-pixel precision 1 / ``upsample_factor`` (>= 20).
    match_columns : bool
        Refine each shift by matching the previous frame's columns to this frame's (module docstring).

    Raises
    ------
    ValueError
        ``upsample_factor`` below 20.
    """

    name = "register"
    writes = ("extras",)

    @property
    def reads(self) -> tuple[str, ...]:  # type: ignore[override]
        """``image``, ``scan``, unless :meth:`use_bonds` turned it off ``bonds``, and with ``match_columns``
        ``columns``."""
        return ("image", "scan") + (("bonds",) if self._bonds else ()) + (("columns",) if self.match_columns else ())

    def use_bonds(self, on: bool) -> None:
        """Whether to unwrap shifts by the lattice (read ``bonds``; off on paths without a lattice stage)."""
        self._bonds = bool(on)

    def __init__(self, estimator: DriftEstimator | None = None, upsample_factor: int = UPSAMPLE_FACTOR,
                 match_columns: bool = False) -> None:
        if not (isinstance(upsample_factor, int) and upsample_factor >= 20):
            raise ValueError(f"upsample_factor must be a whole number >= 20, got {upsample_factor!r}")
        self.match_columns = bool(match_columns)
        self._prev_xy: np.ndarray | None = None  # the previous frame's matchable columns, (n, 2) pixels
        self.matched = 0
        self._match_px = (0.0, 0.0)
        self._bonds = True
        self.estimator = estimator if estimator is not None else DriftEstimator()
        self.upsample_factor = upsample_factor
        self._cur = np.zeros((0, 0), np.float32)
        self._window = np.zeros((0, 0), np.float32)
        self._registrar: Registrar | None = None
        self._timing: tuple[float, float] | None = None
        self._t_prev = math.nan
        n = np.arange(-UNWRAP_CELLS, UNWRAP_CELLS + 1, dtype=np.float64)
        self._cells = np.stack(np.meshgrid(n, n), -1).reshape(-1, 2)  # (k, 2) whole lattice translations
        self.unwrapped = 0
        self.rejected = 0
        self.displacement_px = np.zeros(2)
        self.displacement_A = np.zeros(2)
        self.frames = 0
        self.registered: OrderedDict[int, tuple[float, tuple[float, float]]] = OrderedDict()
        """The last :data:`FRAMES_KEPT` measured frames: frame id -> (``t_mid_s``, ``displacement_A``)."""

    def prepare(self, meta: FrameMeta) -> None:
        """Allocate the two frame buffers and the window for frames of ``meta.shape``; a new frame size
        starts a new reference (the next frame is not registered against one of another size)."""
        rows, cols = meta.shape
        if self._cur.shape != (rows, cols):
            self._cur = np.zeros((rows, cols), np.float32)
            from scipy.signal.windows import tukey

            self._window = np.outer(tukey(rows, TUKEY_ALPHA), tukey(cols, TUKEY_ALPHA)).astype(np.float32)
            self._registrar = Registrar((rows, cols), self.upsample_factor, BAND)

    def reset(self) -> None:
        """Forget the previous frame, the displacement and the estimate."""
        if self._registrar is not None:
            self._registrar.reset()
        self._timing = None
        self._t_prev = math.nan
        self.unwrapped = 0
        self.rejected = 0
        self.displacement_px[:] = 0.0
        self.displacement_A[:] = 0.0
        self.frames = 0
        self._prev_xy = None
        self.matched = 0
        self.registered.clear()
        self.estimator.reset()

    def set_timing(self, t_start_s: float, line_time_s: float) -> None:
        """The next frame's scan started at ``t_start_s`` (seconds, the clock of the frame's metadata) and
        took ``line_time_s`` per line."""
        self._timing = (float(t_start_s), float(line_time_s))

    def process(self, ctx: FrameContext) -> None:
        """Register ``ctx.image`` against the previous frame and update the estimate (module docstring); a
        frame without a scan frame is left alone (no ``extras["drift"]``)."""
        if ctx.scan is None:  # not a scan of the specimen (e.g. a warm-up frame): nothing to register
            self._timing = None
            return
        image, cur = ctx.image, self._cur
        np.subtract(image, float(image.mean()), out=cur, casting="unsafe")
        np.multiply(cur, self._window, out=cur)
        shift = np.zeros(2)
        error = math.nan
        measured = True
        t_mid = math.nan
        if self._timing is not None:
            t0, lt = self._timing
            t_mid = t0 + lt * image.shape[0] / 2
        scan = ctx.scan
        assert self._registrar is not None
        reg = self._registrar.push(cur)  # None for the first frame of a run (or of a frame size)
        if reg is not None:
            shift, error = reg  # (dx, dy): how far the content moved
            if ctx.bonds is not None and scan is not None:
                shift = self._unwrap(shift, ctx.bonds, scan, t_mid)
            if scan is not None and not self._plausible(shift, scan, t_mid):
                shift = self._prediction(scan, t_mid)[0]  # a failed registration: carry the prediction on
                self.rejected += 1
                measured = False
            elif self.match_columns:
                shift = self._match(shift, ctx)
            self.displacement_px += shift
            if scan is not None:
                x0, y0 = scan.specimen_of_fraction(*scan.fraction_of_pixel(0.0, 0.0))
                x1, y1 = scan.specimen_of_fraction(*scan.fraction_of_pixel(shift[0], shift[1]))
                self.displacement_A += (float(x1 - x0), float(y1 - y0))
            else:
                ps = ctx.meta.pixel_size_A if ctx.meta is not None and ctx.meta.pixel_size_A else 1.0
                self.displacement_A += shift * ps
        if self.match_columns:
            self._keep_columns(ctx)
        self.frames += 1
        if self._timing is not None:
            if measured:
                self.estimator.update(t_mid, self.displacement_A)
                self.registered[scan.frame_id] = (t_mid, (float(self.displacement_A[0]), float(self.displacement_A[1])))
                while len(self.registered) > FRAMES_KEPT:
                    self.registered.popitem(last=False)
            self._timing = None
            self._t_prev = t_mid
        est = self.estimator
        ctx.extras["drift"] = {"shift_px": (float(shift[0]), float(shift[1])),
                               "displacement_px": (float(self.displacement_px[0]), float(self.displacement_px[1])),
                               "displacement_A": (float(self.displacement_A[0]), float(self.displacement_A[1])),
                               "t_mid_s": t_mid, "velocity_A_per_s": est.velocity_A_per_s,
                               "velocity_sigma_A_per_s": est.velocity_sigma_A_per_s, "error": float(error),
                               "frames": self.frames, "unwrapped": self.unwrapped, "rejected": self.rejected}
        if self.match_columns:
            ctx.extras["drift"].update(matched=self.matched, match_px=self._match_px)

    def _prediction(self, scan, t_mid: float) -> tuple[np.ndarray, float]:
        """The shift (pixels, ``(dx, dy)``) the estimate predicts since the previous frame, and its standard
        deviation (pixels; before a velocity is known: about a second of the prior's drift)."""
        est = self.estimator
        if est.updates >= 2 and math.isfinite(t_mid) and math.isfinite(self._t_prev) and t_mid > self._t_prev:
            (vx, vy), sigma_A = est.shift(self._t_prev, t_mid)
            f0 = scan.fraction_of_specimen(0.0, 0.0)
            f1 = scan.fraction_of_specimen(vx, vy)
            pred = np.array([(f1[0] - f0[0]) * scan.shape[1], (f1[1] - f0[1]) * scan.shape[0]])
            return pred, sigma_A / scan.pixel_size_A
        return np.zeros(2), (est.velocity_prior / scan.pixel_size_A if est.updates < 2 else math.inf)

    def _plausible(self, shift: np.ndarray, scan, t_mid: float) -> bool:
        """Whether ``shift`` (pixels) is a drift at all: at most :data:`MAX_DRIFT_A_PER_S` over the time since
        the previous frame, plus :data:`SLACK_PX` (a failed registration jumps to a far peak)."""
        if not (math.isfinite(t_mid) and math.isfinite(self._t_prev)):
            return True
        bound = MAX_DRIFT_A_PER_S * max(t_mid - self._t_prev, 0.0) / scan.pixel_size_A + SLACK_PX
        return bool(np.hypot(*shift) <= bound)

    def _unwrap(self, shift: np.ndarray, bonds: np.ndarray, scan, t_mid: float) -> np.ndarray:
        """Of ``shift`` plus whole lattice vectors (from the bond vectors, pixels), the one nearest the
        predicted shift since the previous frame (module docstring). The measured shift stands when it is
        within :data:`UNWRAP_SIGMAS` standard deviations of the prediction, or when no translated one is."""
        pred, sigma_px = self._prediction(scan, t_mid)
        if np.hypot(*(shift - pred)) <= UNWRAP_SIGMAS * sigma_px:
            return shift
        lat = np.array([bonds[0] - bonds[1], bonds[1] - bonds[2]], np.float64)  # (2, 2): lattice vectors, px
        cand = shift + self._cells @ lat
        dist = np.hypot(*(cand - pred).T)
        k = int(np.argmin(dist))
        if dist[k] > UNWRAP_SIGMAS * sigma_px:
            return shift
        if not np.allclose(cand[k], shift):
            self.unwrapped += 1
        return cand[k]

    def _matchable(self, ctx: FrameContext) -> np.ndarray:
        """This frame's columns to match: (n, 2) float64 pixels ``(x, y)``, without inferred vacancy sites and
        columns at the frame edge."""
        cols = ctx.columns
        keep = ~cols.near_edge
        if "vacancy" in cols.class_names:
            keep &= cols.cls != cols.class_names.index("vacancy")
        return np.stack([cols.x[keep], cols.y[keep]], axis=1).astype(np.float64)

    def _keep_columns(self, ctx: FrameContext) -> None:
        """Keep this frame's matchable columns for the next frame's :meth:`_match`."""
        self._prev_xy = self._matchable(ctx) if ctx.columns is not None and len(ctx.columns) else None

    def _match(self, shift: np.ndarray, ctx: FrameContext) -> np.ndarray:
        """``shift`` refined by the median residual of the column pairs (module docstring); ``shift`` itself
        when there are fewer than :data:`MATCH_MIN` pairs or the material has no column spacing."""
        from scipy.spatial import cKDTree

        self.matched, self._match_px = 0, (0.0, 0.0)
        meta, prev = ctx.meta, self._prev_xy
        spacing = meta.material.nn_spacing_A if meta is not None else None
        px_A = ctx.scan.pixel_size_A if ctx.scan is not None else (meta.pixel_size_A if meta is not None else None)
        if prev is None or len(prev) < MATCH_MIN or ctx.columns is None or not spacing or not px_A:
            return shift
        cur = self._matchable(ctx)
        if len(cur) < MATCH_MIN:
            return shift
        radius = MATCH_FRACTION * spacing / px_A
        moved = prev + shift
        dist, j = cKDTree(cur).query(moved, distance_upper_bound=radius)
        ok = np.isfinite(dist)
        if int(ok.sum()) < MATCH_MIN:
            return shift
        res = np.median(cur[j[ok]] - moved[ok], axis=0)
        self.matched = int(ok.sum())
        self._match_px = (float(res[0]), float(res[1]))
        return shift + res
