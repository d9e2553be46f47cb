"""Active learning at the edge: deep kernel learning (DKL) chooses where to measure a property next.

An image (a HAADF frame) shows the local structure everywhere; a property (a scalar of an EELS spectrum or
a diffraction pattern, :mod:`beamloop.edge.analysis.scalarize`) costs a point measurement, dose and time.
DKL learns the relation between the two from the points measured so far and chooses the next ones where
the property is likely extreme, or uncertain (Wilson et al., AISTATS 2016; for STEM: Roccapriore, Kalinin,
Ziatdinov et al., ACS Nano 16, 7605 (2022), and Kalinin et al., "Deep learning for automated
experimentation in scanning transmission electron microscopy", npj Comput. Mater. 9, 227 (2023)):

1. candidates: probe positions in the frame (the found columns, :func:`column_candidates`, or a grid,
   :func:`grid_candidates`), each with the image patch around it (:func:`extract_patches`);
2. a few seed points (``initial``, chosen at random) are measured;
3. each step fits the DKL model on the (patch, scalar) pairs so far
   (:class:`beamloop.edge.experiments.dkl_model.DKLModel`), predicts every candidate, and picks a batch by
   an acquisition function (:func:`beamloop.edge.experiments.dkl_gp.select_batch`);
4. the batch is measured, and so on until ``budget`` points are measured.

Measurements go through a :class:`PointMeasurer`, the small interface "measure these points, give me their
scalars": :class:`SimulatedPoints` measures offline on the simulator's specimen (and knows the true
property map); :class:`ScalarizedPoints` wraps any source of raw signals at points (the bridge's point
queue with its ``detectors``: :class:`beamloop.edge.experiments.dkl_bridge.BridgeAcquire`) with a scalarizer.
:func:`run_dkl` returns the path, the values, the decision time of each step and the predictions at the
checkpoint budgets; :func:`evaluate` scores them against a true map (share of the top 5 % candidates found;
reconstruction error), beside random and raster sampling of the same budget (:func:`baseline_order`,
:func:`fit_predict`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from beamloop.edge.analysis.scalarize import BoundScalarizer, make_scalarizer
from beamloop.edge.experiments.dkl_gp import reconstruction_error, select_batch, top_share_found
from beamloop.edge.experiments.dkl_model import DKLConfig, DKLModel
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.sim import distortion as dist
from beamloop.edge.sim import lattice, structures
from beamloop.edge.sim.eels import DEFAULT_ELECTRONS, EELSModel
from beamloop.edge.sim.fourd import FourDConfig, FourDMicroscope
from beamloop.edge.sim.frames import FrameSimulator, SimulatedFrame

GOALS = ("max", "min")


@runtime_checkable
class PointMeasurer(Protocol):
    """Measures a scalar at probe positions of the current frame: the one seam between the DKL loop and a
    microscope.

    Implementations: :class:`SimulatedPoints` (offline, the simulator's specimen) and
    :class:`ScalarizedPoints` (any function returning the raw signals at points, reduced by a scalarizer),
    which is how a bridge-backed measurer is built: ``acquire(points_px)`` converts the frame pixels to
    scan-field positions with the frame's :class:`~beamloop.edge.frame.scanframe.ScanFrame`, sends them in one
    point queue with a dwell time per point, and returns per point what the detector chosen gives there
    (an EELS spectrum ``(channels,)`` with its calibration, a diffraction pattern ``(det_rows, det_cols)``
    or ADF counts).

    Attributes
    ----------
    units : str
        Unit of the values.
    """

    units: str

    def measure(self, points_px: np.ndarray) -> np.ndarray:
        """Values at ``points_px`` ((k, 2) float, ``(x, y)`` pixels of the frame), (k,) float64; nan where a
        point gave no value (it is not measured again). Errors of the instrument (a lost bridge, a refused
        position) propagate and end the loop."""
        ...


class ScalarizedPoints:
    """A :class:`PointMeasurer` from a signal source and a scalarizer.

    Parameters
    ----------
    acquire : callable
        ``acquire(points_px) -> signals``: ``points_px`` (k, 2) float ``(x, y)`` pixels of the frame;
        ``signals`` a sequence of k raw measurements (spectra ``(channels,)``, patterns ``(rows, cols)`` or ADF
        sample arrays) in the order of the points.
    scalarizer : BoundScalarizer
        Reduces one signal to a float (bound to the spectrometer's calibration or the detector's geometry).

    Attributes
    ----------
    units : str
    measured : int
        Points measured so far.

    Raises
    ------
    ValueError
        (from :meth:`measure`) ``acquire`` returned another number of signals than points.
    """

    def __init__(self, acquire: Callable[[np.ndarray], object], scalarizer: BoundScalarizer) -> None:
        self.acquire = acquire
        self.scalarizer = scalarizer
        self.units = scalarizer.units
        self.measured = 0

    def measure(self, points_px: np.ndarray) -> np.ndarray:
        """Scalars at ``points_px`` ((k, 2) pixels), (k,) float64; nan where the scalarizer refused a signal."""
        pts = np.asarray(points_px, np.float64).reshape(-1, 2)
        signals = list(self.acquire(pts))  # type: ignore[call-overload]
        if len(signals) != len(pts):
            raise ValueError(f"acquire returned {len(signals)} signals for {len(pts)} points")
        self.measured += len(pts)
        return scalarize_all(self.scalarizer, signals)


def scalarize_all(scalarizer: BoundScalarizer, signals) -> np.ndarray:
    """``scalarizer`` on each signal, (k,) float64; nan where it raised ``ValueError`` or gave a non-finite value."""
    out = np.full(len(signals), np.nan)
    for i, sig in enumerate(signals):
        try:
            out[i] = scalarizer(sig)
        except (ValueError, FloatingPointError, ZeroDivisionError):
            continue
    out[~np.isfinite(out)] = np.nan
    return out


@dataclass(frozen=True)
class DKLSettings:
    """Settings of the active-learning loop.

    Attributes
    ----------
    budget : int
        Points to measure in all (seed points included).
    initial : int
        Random seed points measured before the first fit (>= 2).
    batch_size : int
        Points chosen per step.
    acquisition : {"ei", "ucb", "maxvar"}
        :data:`beamloop.edge.experiments.dkl_gp.ACQUISITIONS`.
    batch : {"fantasy", "exclusion"}
        How a batch of more than one point is chosen.
    exclusion_px : float
        Least distance between the points of one ``exclusion`` batch, pixels.
    beta, xi : float
        UCB's ``beta``; EI's margin (standardised units).
    patch_px : int
        Side of the image patch around each candidate, frame pixels.
    patch_bin : int
        Patches are sum-binned by this factor (``patch_px`` must be a multiple).
    goal : {"max", "min"}
        Look for the largest or the smallest values.
    seed : int
        Seed of the seed points (and the network's weights, through ``model``).
    model : DKLConfig
    checkpoints : tuple of int
        Budgets at which the full prediction is kept (:attr:`DKLResult.snapshots`).

    Raises
    ------
    ValueError
        A setting outside its range.
    """

    budget: int = 50
    initial: int = 5
    batch_size: int = 1
    acquisition: str = "ei"
    batch: str = "fantasy"
    exclusion_px: float = 8.0
    beta: float = 4.0
    xi: float = 0.01
    patch_px: int = 32
    patch_bin: int = 2
    goal: str = "max"
    seed: int = 0
    model: DKLConfig = field(default_factory=DKLConfig)
    checkpoints: tuple[int, ...] = (25, 50, 100)

    def __post_init__(self) -> None:
        if not (isinstance(self.budget, int) and self.budget >= 2):
            raise ValueError(f"budget must be a whole number >= 2, got {self.budget!r}")
        if not (isinstance(self.initial, int) and 2 <= self.initial <= self.budget):
            raise ValueError(f"initial must be a whole number in [2, budget], got {self.initial!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}")
        if self.acquisition not in ("ei", "ucb", "maxvar"):
            raise ValueError(f"acquisition must be ei, ucb or maxvar, got {self.acquisition!r}")
        if self.batch not in ("fantasy", "exclusion"):
            raise ValueError(f"batch must be fantasy or exclusion, got {self.batch!r}")
        if self.goal not in GOALS:
            raise ValueError(f"goal must be max or min, got {self.goal!r}")
        if not (self.patch_bin >= 1 and self.patch_px >= 4 and self.patch_px % self.patch_bin == 0):
            raise ValueError(f"patch_px ({self.patch_px}) must be >= 4 and a multiple of patch_bin ({self.patch_bin})")

    def as_dict(self) -> dict:
        """Plain values (JSON)."""
        d = asdict(self)
        d["model"]["hidden"] = list(self.model.hidden)
        d["checkpoints"] = list(self.checkpoints)
        return d


def extract_patches(image: np.ndarray, xy_px: np.ndarray, patch_px: int, patch_bin: int = 1) -> np.ndarray:
    """Square patches of ``image`` centred on ``xy_px`` (nearest pixel), reflected at the frame's edges.

    Parameters
    ----------
    image : ndarray, shape (rows, cols), real
    xy_px : ndarray, shape (m, 2)
        Centres ``(x, y)``: column and row, pixels.
    patch_px : int
        Side, pixels.
    patch_bin : int
        Sum-binning factor (must divide ``patch_px``).

    Returns
    -------
    ndarray, shape (m, patch_px // patch_bin, patch_px // patch_bin), float32
    """
    img = np.asarray(image, np.float32)
    half = patch_px // 2
    pad = np.pad(img, half + 1, mode="reflect")
    xy = np.rint(np.asarray(xy_px, np.float64)).astype(np.int64)
    cx = np.clip(xy[:, 0], 0, img.shape[1] - 1) + half + 1
    cy = np.clip(xy[:, 1], 0, img.shape[0] - 1) + half + 1
    off = np.arange(patch_px) - half
    rows = (cy[:, None] + off[None, :])[:, :, None]
    cols = (cx[:, None] + off[None, :])[:, None, :]
    out = pad[rows, cols]
    if patch_bin > 1:
        b = patch_bin
        out = out.reshape(len(xy), patch_px // b, b, patch_px // b, b).sum(axis=(2, 4))
    return np.ascontiguousarray(out, np.float32)


def column_candidates(image: np.ndarray, pixel_size_A: float | None = None, material: str = "MoS2",
                      margin_px: float = 0.0) -> np.ndarray:
    """Candidate probe positions on the atomic columns of a frame, found by the classical frame path.

    Parameters
    ----------
    image : ndarray, shape (rows, cols)
        HAADF counts.
    pixel_size_A : float, optional
        Angstrom per pixel (sets the MoS2 finder's scale; else estimated from the image).
    material : str
        ``"MoS2"`` or anything else for the generic finder.
    margin_px : float
        Columns closer than this to the frame's edge are left out (a patch there would be reflected
        padding, unlike any other patch, and would attract an uncertainty-driven acquisition).

    Returns
    -------
    ndarray, shape (m, 2), float64
        ``(x, y)`` pixels, in the finder's order.

    Raises
    ------
    beamloop.edge.frame.stage.FrameError
        The frame cannot be read (see :func:`beamloop.edge.batch_find.find_columns`).
    """
    from beamloop.edge.batch_find import find_columns

    cols = find_columns(image, pixel_size_A, "MoS2" if material == "MoS2" else "generic")[0]
    xy = np.stack([np.asarray(cols.x, np.float64), np.asarray(cols.y, np.float64)], axis=1)
    rows, ncols = np.shape(image)
    keep = ((xy[:, 0] >= margin_px) & (xy[:, 0] <= ncols - 1 - margin_px)
            & (xy[:, 1] >= margin_px) & (xy[:, 1] <= rows - 1 - margin_px))
    return xy[keep]


def grid_candidates(shape: tuple[int, int], step_px: float, margin_px: float = 0.0) -> np.ndarray:
    """A square grid of candidate positions over a frame: (m, 2) float64 ``(x, y)`` pixels."""
    rows, cols = shape
    xs = np.arange(margin_px, cols - margin_px, step_px)
    ys = np.arange(margin_px, rows - margin_px, step_px)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


# --- the loop ---------------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """One decision of :func:`run_dkl`.

    Attributes
    ----------
    measured_before : int
        Points measured when the step began.
    chosen : list of int
        Candidate indices chosen (in order).
    values : list of float
        Their measured values.
    decision_s : float
        Fit, prediction and acquisition, seconds (what a step costs besides the measurement).
    fit_s : float
        The fit alone, seconds.
    loss : float
        Negative marginal log likelihood per point after the fit.
    """

    measured_before: int
    chosen: list[int]
    values: list[float]
    decision_s: float
    fit_s: float
    loss: float


@dataclass
class DKLResult:
    """What :func:`run_dkl` did.

    Attributes
    ----------
    candidates_px : ndarray, shape (m, 2)
    order : ndarray, shape (n,), int64
        Candidate indices in the order measured (the exploration path).
    values : ndarray, shape (n,), float64
        Measured values, in that order (original sign).
    steps : list of StepRecord
    mean, std : ndarray, shape (m,), float64
        Final prediction of every candidate (original units and sign).
    snapshots : dict int -> (mean, std)
        Predictions fitted on exactly the first ``N`` measurements, for each checkpoint ``N`` reached: the
        posterior of the step that began with ``N`` measured (no extra fit, so checkpoints do not change the
        path); where batches stepped over ``N``, a separate fit after the run.
    settings : DKLSettings
    units : str
    model : DKLModel or None
        The fitted model (its :meth:`~beamloop.edge.experiments.dkl_model.DKLModel.export` writes the
        embedding as ONNX).
    """

    candidates_px: np.ndarray
    order: np.ndarray
    values: np.ndarray
    steps: list[StepRecord]
    mean: np.ndarray
    std: np.ndarray
    snapshots: dict[int, tuple[np.ndarray, np.ndarray]]
    settings: DKLSettings
    units: str = ""
    model: DKLModel | None = None

    @property
    def decision_s(self) -> np.ndarray:
        """Decision time of every step, seconds."""
        return np.array([s.decision_s for s in self.steps], np.float64)


def run_dkl(image: np.ndarray, candidates_px: np.ndarray, measurer: PointMeasurer,
            settings: DKLSettings = DKLSettings(), *, on_step: Callable[[StepRecord, DKLModel], None] | None = None,
            patches: np.ndarray | None = None) -> DKLResult:
    """Measure ``settings.budget`` candidates chosen by deep kernel learning (module docstring).

    Parameters
    ----------
    image : ndarray, shape (rows, cols)
        The frame the candidates are in (patches are cut from it).
    candidates_px : ndarray, shape (m, 2)
        Candidate positions ``(x, y)``, pixels (m > budget).
    measurer : PointMeasurer
    settings : DKLSettings
    on_step : callable(StepRecord, DKLModel), optional
        Called after each step's measurement (progress, logging).
    patches : ndarray, shape (m, r, c), optional
        The candidates' patches, if already cut.

    Returns
    -------
    DKLResult

    Raises
    ------
    beamloop.edge.experiments.dkl_model.DKLUnavailable
        The ``dkl`` extra is not installed.
    ValueError
        Not more candidates than the budget, or fewer than two finite values among the whole budget's seed
        points.
    """
    cand = np.asarray(candidates_px, np.float64)
    m = len(cand)
    s = settings
    if m <= s.budget:
        raise ValueError(f"{m} candidates for a budget of {s.budget}: need more candidates than measurements")
    if patches is None:
        patches = extract_patches(image, cand, s.patch_px, s.patch_bin)
    sign = 1.0 if s.goal == "max" else -1.0
    rng = np.random.default_rng(s.seed)
    model = DKLModel(patches, s.model)
    seeds = rng.permutation(m)
    order = [int(i) for i in seeds[:s.initial]]
    values = [float(v) for v in measurer.measure(cand[order])]
    # a model needs two finite values: more random seed points while the first gave none (e.g. no edge there)
    while np.isfinite(values).sum() < 2 and len(order) < min(s.budget, m):
        i = int(seeds[len(order)])
        order.append(i)
        values.extend(float(v) for v in measurer.measure(cand[[i]]))
    if np.isfinite(values).sum() < 2:
        raise ValueError(f"only {int(np.isfinite(values).sum())} of {len(order)} measurements gave a value")
    available = np.ones(m, bool)
    available[order] = False
    steps: list[StepRecord] = []
    snapshots: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    while len(order) < s.budget:
        t0 = time.perf_counter()
        state = model.fit(np.array(order), sign * np.array(values))
        t_fit = time.perf_counter() - t0
        z = model.embed()
        k = min(s.batch_size, s.budget - len(order))
        chosen = select_batch(state, z, available, k, acquisition=s.acquisition, batch=s.batch, positions=cand,
                              exclusion=s.exclusion_px, beta=s.beta, xi=s.xi)
        dt = time.perf_counter() - t0
        if len(order) in s.checkpoints:  # the fit of this step saw exactly the first N measurements
            mu, sd = state.predict(z)
            snapshots[len(order)] = (sign * mu, sd)
        new = [float(v) for v in measurer.measure(cand[chosen])]
        rec = StepRecord(len(order), chosen.tolist(), new, dt, t_fit, model.last_loss)
        steps.append(rec)
        order.extend(chosen.tolist())
        values.extend(new)
        available[chosen] = False
        if on_step is not None:
            on_step(rec, model)
    skipped = [n for n in s.checkpoints if n not in snapshots and n < s.budget and n <= len(order)]
    for n_cp in skipped:  # batches stepped over it: a separate fit on the first N (after the path is complete)
        mu, sd = fit_predict(patches, np.array(order[:n_cp]), np.array(values[:n_cp]), s.model, s.goal)
        snapshots[n_cp] = (mu, sd)
    model.fit(np.array(order), sign * np.array(values))
    mu, sd = model.predict()
    if s.budget in s.checkpoints:
        snapshots[s.budget] = (sign * mu, sd)
    return DKLResult(cand, np.array(order, np.int64), np.array(values, np.float64), steps, sign * mu, sd, snapshots,
                     s, getattr(measurer, "units", ""), model)


def baseline_order(kind: str, candidates_px: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Candidate indices a non-adaptive scheme measures with ``budget`` points.

    ``random``: uniformly without replacement. ``raster``: a coarse raster scan of the same number of points
    (the candidates nearest to a square grid over their bounding box, rows top to bottom, each row left to
    right), as a sparse scan at the same dose would visit them.

    Returns ndarray (budget,) int64. Raises ``ValueError`` for another ``kind``.
    """
    cand = np.asarray(candidates_px, np.float64)
    m = len(cand)
    if kind == "random":
        return rng.choice(m, budget, replace=False).astype(np.int64)
    if kind != "raster":
        raise ValueError(f"baseline must be random or raster, got {kind!r}")
    lo, hi = cand.min(0), cand.max(0)
    side = int(math.ceil(math.sqrt(budget)))
    chosen: list[int] = []
    while len(chosen) < budget:
        gx = lo[0] + (np.arange(side) + 0.5) * (hi[0] - lo[0]) / side
        gy = lo[1] + (np.arange(side) + 0.5) * (hi[1] - lo[1]) / side
        free = np.setdiff1d(np.arange(m), chosen)
        for y in gy:
            for x in gx:
                if len(chosen) >= budget or not len(free):
                    break
                j = free[np.argmin(np.hypot(cand[free, 0] - x, cand[free, 1] - y))]
                chosen.append(int(j))
                free = free[free != j]
        side += 1
    return np.array(chosen[:budget], np.int64)


def fit_predict(patches: np.ndarray, index: np.ndarray, values: np.ndarray, config: DKLConfig | None = None,
                goal: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """The DKL model fitted once on given measurements; predicted mean and std of every candidate (for the
    reconstruction error of non-adaptive sampling)."""
    sign = 1.0 if goal == "max" else -1.0
    model = DKLModel(patches, config or DKLConfig())
    model.fit(np.asarray(index), sign * np.asarray(values, np.float64))
    mu, sd = model.predict()
    return sign * mu, sd


def evaluate(truth: np.ndarray, order: np.ndarray, budgets: tuple[int, ...], *, goal: str = "max",
             fraction: float = 0.05) -> dict[int, float]:
    """Share of the top ``fraction`` of candidates (by ``truth`` and ``goal``) among the first ``N`` of
    ``order``, for each ``N`` of ``budgets`` (those not longer than ``order``)."""
    return {n: top_share_found(truth, order[:n], fraction, maximize=goal == "max") for n in budgets if n <= len(order)}


__all__ = ["DKLResult", "DKLSettings", "PointMeasurer", "ScalarizedPoints", "SimulatedPoints", "StepRecord",
           "baseline_order", "scalarize_all",
           "column_candidates", "evaluate", "extract_patches", "fit_predict", "grid_candidates",
           "reconstruction_error", "run_dkl", "simulated_scene"]


# --- offline: the simulator's specimen ----------------------------------------------------------------------


def simulated_scene(material: str = "MoS2", shape: tuple[int, int] = (512, 512), pixel_size_A: float = 0.15,
                    dose_e_per_A2: float = 1e5, seed: int = 0, *, defects: float = 1.0,
                    grain_boundary: bool = False, distortion_scale: float = 0.0
                    ) -> tuple[SimulatedFrame, lattice.Specimen]:
    """A HAADF frame of a defective specimen, and the specimen (for :class:`SimulatedPoints`).

    Parameters
    ----------
    material : {"MoS2", "SrTiO3"}
        MoS2 monolayer with S mono-/di-vacancies and Mo vacancies (fractions 0.02, 0.005, 0.003 times
        ``defects``); SrTiO3 [001], 10 cells thick, with O-deficient O columns (4 % times ``defects`` of
        them lose 3-7 of their 10 O atoms) and, with ``grain_boundary``, a 24 degree tilt boundary.
    shape, pixel_size_A, dose_e_per_A2 :
        The frame: pixels, Angstrom per pixel, electrons per square Angstrom.
    seed : int
    distortion_scale : float
        Scan distortion (0: none).

    Raises
    ------
    ValueError
        Unknown material.
    """
    rng = np.random.default_rng(seed)
    rows, cols = shape
    h, w = rows * pixel_size_A, cols * pixel_size_A
    ext = (-w / 2 - 8, w / 2 + 8, -h / 2 - 8, h / 2 + 8)
    if material == "MoS2":
        if grain_boundary:
            spec = structures.bicrystal(structures.STRUCTURES["MoS2"], ext, rng, misorientation_deg=21.8)
        else:
            spec = lattice.mos2(ext, rotation_deg=float(rng.uniform(0, 60)), origin_A=tuple(rng.uniform(-2, 2, 2)))
        lattice.add_point_defects(spec, rng, s_mono=0.02 * defects, s_di=0.005 * defects, mo_vacancy=0.003 * defects)
    elif material == "SrTiO3":
        if grain_boundary:
            spec = structures.bicrystal(structures.STRUCTURES["SrTiO3[001]"], ext, rng, misorientation_deg=24.0)
        else:
            spec = structures.srtio3_001(ext, rotation_deg=float(rng.uniform(0, 90)),
                                         origin_A=tuple(rng.uniform(-2, 2, 2)))
        o = spec.elements.index("O")
        o_cols = np.flatnonzero(spec.site == 2)
        hit = o_cols[rng.random(len(o_cols)) < 0.04 * defects]
        spec.counts[hit, o] -= rng.integers(3, 8, len(hit)).astype(spec.counts.dtype)
    else:
        raise ValueError(f"material must be MoS2 or SrTiO3, got {material!r}")
    sim = FrameSimulator(spec, rng, distortion_scale=distortion_scale)
    scan = ScanFrame(0, (rows, cols), (h / 10, w / 10), dwell_us=10.0)
    return sim.acquire(scan, dose_e_per_A2 * pixel_size_A**2), spec


class SimulatedPoints:
    """Point measurements on a simulated specimen (a :class:`PointMeasurer`), with the true property map.

    The signal follows the scalarizer's kind: an EELS spectrum (:class:`beamloop.edge.sim.eels.EELSModel`),
    a diffraction pattern (:class:`beamloop.edge.sim.fourd.FourDMicroscope`) or ADF counts (the frame
    renderer), each with Poisson noise of ``electrons`` probe electrons per point.

    Parameters
    ----------
    frame : SimulatedFrame
        The frame whose pixels the points are given in (its scan and distortion map them to the specimen).
    specimen : Specimen
    scalarizer : BoundScalarizer or str
        A bound scalarizer, or a registered name (bound with its defaults; EELS ones to the material's
        spectrometer).
    material : {"MoS2", "SrTiO3"}
        EELS settings (:data:`beamloop.edge.sim.eels.MATERIALS`).
    electrons : float, optional
        Probe electrons per point (e.g. 1e7: 32 ms at 50 pA); default
        :data:`beamloop.edge.sim.eels.DEFAULT_ELECTRONS` of the material.
    seed : int
        Seed of the noise.

    Attributes
    ----------
    units : str
    measured : int
        Points measured so far.
    """

    def __init__(self, frame: SimulatedFrame, specimen: lattice.Specimen, scalarizer: BoundScalarizer | str,
                 *, material: str = "MoS2", electrons: float | None = None, seed: int = 0,
                 fourd: FourDConfig | None = None) -> None:
        self.frame = frame
        self.specimen = specimen
        self.electrons = float(DEFAULT_ELECTRONS[material] if electrons is None else electrons)
        self.rng = np.random.default_rng(seed)
        if isinstance(scalarizer, str):
            scalarizer = bind_for_material(scalarizer, material)
        self.scalarizer = scalarizer
        self.eels = EELSModel(specimen, material) if scalarizer.kind == "spectrum" else None
        self.units = scalarizer.units
        self._fourd = FourDMicroscope(specimen, fourd or FourDConfig()) if scalarizer.kind == "pattern" else None
        self.measured = 0

    def positions_A(self, points_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Specimen positions (Angstrom) under frame pixels ``(x, y)`` (through the frame's distortion)."""
        p = np.asarray(points_px, np.float64).reshape(-1, 2)
        return dist.specimen_of_pixel(self.frame.scan, self.frame.distortion, p[:, 0], p[:, 1])

    def signals(self, points_px: np.ndarray, noise: bool = True) -> np.ndarray:
        """The raw measurements: spectra (k, channels), patterns (k, rows, cols) or ADF counts (k,);
        expected counts (float64) without noise."""
        x, y = self.positions_A(points_px)
        kind = self.scalarizer.kind
        if kind == "spectrum":
            assert self.eels is not None
            lam = self.eels.expected(x, y) * self.electrons
        elif kind == "pattern":
            assert self._fourd is not None
            lam = self._fourd.expected(x, y) * self.electrons
        else:
            lam = (self.frame_renderer_expected(x, y)) * self.electrons
        return self.rng.poisson(lam).astype(np.float64) if noise else lam

    def frame_renderer_expected(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Expected ADF fraction at specimen positions (the frame simulator's linear incoherent model)."""
        from beamloop.edge.sim import profiles
        from beamloop.edge.sim.render import ColumnRenderer

        if not hasattr(self, "_renderer"):
            self._renderer = ColumnRenderer(self.specimen, profiles.profile_table(self.specimen.elements))
        return self._renderer.expected(np.asarray(x)[None], np.asarray(y)[None])[0]

    def measure(self, points_px: np.ndarray) -> np.ndarray:
        """Scalars of noisy measurements at ``points_px`` ((k, 2) pixels), (k,) float64."""
        sig = self.signals(points_px, noise=True)
        self.measured += len(sig)
        return self._scalars(sig)

    def truth(self, points_px: np.ndarray) -> np.ndarray:
        """The true property map: the scalarizer on the expected (noise-free) signal, (k,) float64."""
        return self._scalars(self.signals(points_px, noise=False))

    def _scalars(self, sig: np.ndarray) -> np.ndarray:
        if self.scalarizer.kind == "adf":
            return np.asarray(sig, np.float64)
        return scalarize_all(self.scalarizer, sig)


def bind_for_material(name: str, material: str = "MoS2", calibration: dict | None = None) -> BoundScalarizer:
    """Scalarizer ``name`` bound to the simulated spectrometer and the main edge of ``material``.

    MoS2: S L2,3 (onset, integral), S L2,3 / Mo M4,5 (ratio); SrTiO3: Ti L2,3 (onset, integral, white-line
    ratio), O K / Ti L2,3 (ratio). Pattern and ADF scalarizers take their defaults. ``calibration``
    (``offset_eV``, ``dispersion_eV``; e.g. a controller's ``point_detectors["eels"]``) replaces the
    simulated spectrometer's energy axis.
    """
    from beamloop.edge.analysis.scalarize import SCALARIZERS
    from beamloop.edge.sim.eels import MATERIALS

    sc = SCALARIZERS[name] if name in SCALARIZERS else None
    if sc is None or sc.kind != "spectrum":
        return make_scalarizer(name)
    sp = MATERIALS[material].spectrometer
    cal = {"offset_eV": sp.offset_eV, "dispersion_eV": sp.dispersion_eV}
    if calibration is not None:
        cal = {"offset_eV": float(calibration["offset_eV"]), "dispersion_eV": float(calibration["dispersion_eV"])}
    main = {"MoS2": "S_L2,3", "SrTiO3": "Ti_L2,3"}[material]
    if name == "eels_edge_ratio":
        num, den = {"MoS2": ("S_L2,3", "Mo_M4,5"), "SrTiO3": ("O_K", "Ti_L2,3")}[material]
        return make_scalarizer(name, numerator=num, denominator=den, **cal)
    return make_scalarizer(name, edge=main, **cal)


DEFAULT_GOAL = {"eels_onset": "min", "eels_edge_ratio": "min", "eels_white_line_ratio": "max",
                "eels_edge_integral": "min", "com_magnitude": "max", "com_direction": "max", "bf_adf_ratio": "max",
                "adf_mean": "max"}
"""The direction worth finding per scalarizer: a lower onset (reduced cations near vacancies), a lower
S/Mo or O/Ti ratio (missing anions), a higher L3/L2 ratio (reduced Ti), a larger CoM shift."""
