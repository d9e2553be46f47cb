"""A large simulated specimen for automated search: tens of square micrometres of mixed material on a stage.

:class:`LargeSpecimen` is a region map of a 2D-material flake on a support film, with ground truth: the
classes of :data:`REGION_CLASSES` (holes in the film, monolayer and multilayer areas, amorphous
contamination, grain boundaries, defect clusters, small particles of another, heavier material), painted on
a raster of ``map_nm`` nanometres from smooth random fields, a Voronoi grain pattern and random disks.
:meth:`LargeSpecimen.render` images it at any field of view with mass-thickness (incoherent HAADF, Z-contrast)
contrast, not atoms: the signal of a pixel is the scattering of the material under it, proportional to the
projected thickness times an effective ``Z^1.7`` (Rutherford-like high-angle scattering; E. J. Kirkland,
*Advanced Computing in Electron Microscopy*, 2nd ed., Springer 2010, ch. 5; P. D. Nellist & S. J. Pennycook,
Adv. Imaging Electron Phys. 113, 147-203 (2000)), plus each class's texture at its own physical length scale
(averaged away when the pixel is coarser), then Poisson counting noise for the dose.

:class:`SpecimenBackend` is a :class:`beamloop.edge.control.controller.ScanBackend` and
:class:`~beamloop.edge.control.controller.StageBackend` over it, and :class:`SearchMicroscope` the
:class:`~beamloop.edge.control.controller.ScanController` on top (the bridge, its safety rules, the frame
stream). The stage has the travel time of :class:`beamloop.edge.control.protocol.StageLimits`, backlash (an
axis that reverses stops ``backlash_um / 2`` short of the target in the direction of travel; the encoder
reads the target), a repeatability error, and after every move the specimen drifts
(:class:`beamloop.edge.sim.drift.SpecimenDrift`, settling after the move) on the controller's clock.

The region classes and their contrast follow the montages of the automated-search seed work (M. J. Olszta et
al., Microsc. Microanal. 28, 1611-1621 (2022); C. Doty et al., "Design of a graphical user interface for
few-shot machine learning classification of electron microscopy data", Comput. Mater. Sci. 203, 111121
(2022)); the numbers (fractions, sizes, signals) are model parameters, not measurements.

Coordinates: specimen nanometres, origin at the specimen's centre, x along image columns, y along rows; the
stage in micrometres in the same axes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zmq
from scipy import ndimage
from scipy.spatial import cKDTree

from beamloop.edge.control.controller import Acquisition, Capabilities, ScanController
from beamloop.edge.control.protocol import BridgeError, ScanLimits, StageLimits
from beamloop.edge.control.safety import SafetyLimits
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.physics import electrons_per_second
from beamloop.edge.sim.drift import DriftConfig, SpecimenDrift

REGION_CLASSES = ("hole", "monolayer", "multilayer", "contamination", "grain_boundary", "defect_cluster",
                  "particle")
"""Region classes, by label value (uint8 0..6)."""

RARE_CLASSES = ("defect_cluster", "particle")
"""The rare features a search looks for."""

SIGNAL = np.array([0.002, 0.05, 0.16, 0.08, 0.06, 0.05, 0.9], np.float32)
"""Mean HAADF signal per class, fraction of the probe's electrons scattered onto the detector (hole: the
support's edge glow only; multilayer ~3 layers; particle: a heavy-element nanoparticle)."""

FINE_AMP = np.array([0.0, 0.12, 0.08, 0.35, 0.25, 0.9, 0.1], np.float32)
"""Relative amplitude of the fine texture (``fine_nm``) per class: defect clusters are pitted, contamination
is amorphous, grain boundaries carry dislocation cores."""

COARSE_AMP = np.array([0.0, 0.05, 0.15, 0.45, 0.1, 0.2, 0.05], np.float32)
"""Relative amplitude of the coarse texture (``coarse_nm``) per class."""


@dataclass(frozen=True)
class SpecimenConfig:
    """Parameters of :class:`LargeSpecimen` and its stage.

    Attributes
    ----------
    size_um : float
        Side of the square specimen, micrometres (default 8: 64 square micrometres).
    map_nm : float
        Pixel of the region map, nanometres.
    seed : int
        Seed of the map, the textures, the noise and the stage errors.
    hole_fraction, multilayer_fraction, contamination_fraction : float
        Area fractions of holes, multilayer and contamination (before the smaller features are painted).
    grains : int
        Grains of the Voronoi pattern whose edges are grain boundaries.
    boundary_nm : float
        Half width of a grain boundary band, nanometres.
    defect_clusters : int
        Defect clusters (disks in monolayer areas).
    defect_radius_nm : (float, float)
        Their radius range, nanometres.
    particles : int
        Particles of a heavier material.
    particle_radius_nm : (float, float)
        Their radius range, nanometres.
    fine_nm, coarse_nm : float
        Length scales of the two texture fields, nanometres.
    stage : StageLimits
        Travel range (default the specimen, +-size/2), speed and settle time of the stage, backlash.
    repeat_um : float
        Stage repeatability (Gaussian sigma per axis of the position reached), micrometres.
    max_fov_nm : float
        Largest field of view, nanometres (the lowest magnification).
    current_pA : float
        Probe current, picoamperes (sets the electrons per pixel with the dwell time).
    drift_A_per_s, drift_settle_A_per_s, drift_settle_tau_s : float
        Specimen drift (:class:`beamloop.edge.sim.drift.DriftConfig`): constant speed, extra speed right after a
        stage move, and its decay time.
    """

    size_um: float = 8.0
    map_nm: float = 10.0
    seed: int = 0
    hole_fraction: float = 0.08
    multilayer_fraction: float = 0.2
    contamination_fraction: float = 0.07
    grains: int = 24
    boundary_nm: float = 12.0
    defect_clusters: int = 7
    defect_radius_nm: tuple[float, float] = (90.0, 180.0)
    particles: int = 9
    particle_radius_nm: tuple[float, float] = (40.0, 90.0)
    fine_nm: float = 4.0
    coarse_nm: float = 25.0
    stage: StageLimits | None = None
    repeat_um: float = 0.02
    max_fov_nm: float = 4000.0
    current_pA: float = 20.0
    drift_A_per_s: float = 0.05
    drift_settle_A_per_s: float = 2.0
    drift_settle_tau_s: float = 20.0

    def __post_init__(self) -> None:
        checks = {"size_um": (0.5, 200.0), "map_nm": (1.0, 100.0), "hole_fraction": (0.0, 0.5),
                  "multilayer_fraction": (0.0, 0.6), "contamination_fraction": (0.0, 0.5),
                  "boundary_nm": (0.0, 200.0), "fine_nm": (0.5, 100.0), "coarse_nm": (1.0, 500.0),
                  "repeat_um": (0.0, 10.0), "max_fov_nm": (10.0, 1e5), "current_pA": (1e-3, 1e4),
                  "drift_A_per_s": (0.0, 1e3), "drift_settle_A_per_s": (0.0, 1e3), "drift_settle_tau_s": (1e-3, 1e4)}
        for name, (lo, hi) in checks.items():
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi):
                raise ValueError(f"specimen {name} {v!r} must be a number in [{lo:g}, {hi:g}]")
        for name in ("grains", "defect_clusters", "particles"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 0 <= v <= 10_000):
                raise ValueError(f"specimen {name} {v!r} must be a whole number in [0, 10000]")
        if self.size_um * 1000 / self.map_nm > 4096:
            raise ValueError(f"specimen map of {self.size_um:g} um at {self.map_nm:g} nm per pixel exceeds 4096 "
                             "pixels a side; raise map_nm")

    def stage_limits(self) -> StageLimits:
        """``stage``, or +-``size_um / 2`` at 2 um/s with 4 s settling and 0.1 um backlash (goniometer-like
        figures: stage-limited montaging at ~0.1 frames/s, Olszta et al. 2022)."""
        if self.stage is not None:
            return self.stage
        h = self.size_um / 2
        return StageLimits((-h, h), (-h, h), speed_um_per_s=2.0, settle_s=4.0, backlash_um=0.1)


@dataclass(frozen=True)
class RareRegion:
    """One rare feature of the specimen (ground truth).

    Attributes
    ----------
    index : int
    cls : str
        One of :data:`RARE_CLASSES`.
    x_nm, y_nm : float
        Centre, specimen nanometres.
    radius_nm : float
    """

    index: int
    cls: str
    x_nm: float
    y_nm: float
    radius_nm: float


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field (white noise filtered at ``sigma_px``), float32."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, mode="wrap")
    return (f - f.mean()) / max(float(f.std()), 1e-12)


class LargeSpecimen:
    """The region map and its rendering (module docstring).

    Parameters
    ----------
    config : SpecimenConfig

    Attributes
    ----------
    labels : ndarray, shape (n, n), uint8
        Class per map pixel (:data:`REGION_CLASSES`); row ``i``, column ``j`` covers specimen
        ``x = (j + 0.5) map_nm - size/2``, ``y = (i + 0.5) map_nm - size/2`` nanometres.
    thickness : ndarray, shape (n, n), float32
        Relative projected thickness (1: one monolayer).
    rare : list of RareRegion
    half_nm : float
        Half the specimen's side, nanometres.
    """

    def __init__(self, config: SpecimenConfig | None = None) -> None:
        self.config = cfg = config or SpecimenConfig()
        rng = np.random.default_rng([cfg.seed, 0x5EA2C4])
        n = int(round(cfg.size_um * 1000 / cfg.map_nm))
        self.half_nm = cfg.size_um * 500.0
        px = cfg.map_nm
        labels = np.full((n, n), 1, np.uint8)
        thick = np.ones((n, n), np.float32)
        multi = _smooth_field(rng, (n, n), 300 / px)
        m_thr = np.quantile(multi, 1 - cfg.multilayer_fraction)
        labels[multi > m_thr] = 2
        thick[:] = np.where(multi > m_thr, 2.0 + np.clip(multi - m_thr, 0, 2), 1.0)
        # grain boundaries: where the nearest two Voronoi seeds are nearly equidistant
        if cfg.grains >= 2:
            seeds = rng.uniform(0, n, (cfg.grains, 2))
            yy, xx = np.mgrid[0:n, 0:n]
            d, _ = cKDTree(seeds).query(np.column_stack([yy.ravel(), xx.ravel()]), k=2)
            gb = ((d[:, 1] - d[:, 0]) * 0.5 * px < cfg.boundary_nm).reshape(n, n)
            labels[gb] = 4
        cont = _smooth_field(rng, (n, n), 150 / px)
        labels[cont > np.quantile(cont, 1 - cfg.contamination_fraction)] = 3
        holes = _smooth_field(rng, (n, n), 200 / px)
        labels[holes < np.quantile(holes, cfg.hole_fraction)] = 0
        self.rare: list[RareRegion] = []
        yy, xx = np.mgrid[0:n, 0:n]
        for cls, count, (rlo, rhi), value, where in (
                ("defect_cluster", cfg.defect_clusters, cfg.defect_radius_nm, 5, (1,)),
                ("particle", cfg.particles, cfg.particle_radius_nm, 6, (1, 2, 3))):
            placed, tries = 0, 0
            while placed < count and tries < 200 * max(count, 1):
                tries += 1
                r = rng.uniform(rlo, rhi)
                cx, cy = rng.uniform(-self.half_nm + 2 * r, self.half_nm - 2 * r, 2)
                i, j = int((cy + self.half_nm) / px), int((cx + self.half_nm) / px)
                if labels[i, j] not in where or any(math.hypot(cx - q.x_nm, cy - q.y_nm) < 3 * (r + q.radius_nm)
                                                    for q in self.rare):
                    continue
                disk = np.hypot((xx + 0.5) * px - self.half_nm - cx, (yy + 0.5) * px - self.half_nm - cy) <= r
                labels[disk & (labels != 0)] = value
                self.rare.append(RareRegion(len(self.rare), cls, float(cx), float(cy), float(r)))
                placed += 1
        thick[labels == 0] = 0.0
        self.labels = labels
        self.thickness = thick
        self._noise_seed = int(rng.integers(2**31))

    # ground truth ----------------------------------------------------------------------------------------
    def _coords(self, center_nm: tuple[float, float], fov_nm: tuple[float, float], shape: tuple[int, int]):
        """Map-pixel coordinates (row, col arrays of the frame's pixel centres) of a frame."""
        rows, cols = shape
        h, w = fov_nm
        y = center_nm[1] + (np.arange(rows) + 0.5 - rows / 2) * (h / rows)
        x = center_nm[0] + (np.arange(cols) + 0.5 - cols / 2) * (w / cols)
        px = self.config.map_nm
        return (y + self.half_nm) / px - 0.5, (x + self.half_nm) / px - 0.5

    def labels_of(self, center_nm: tuple[float, float], fov_nm: tuple[float, float],
                  shape: tuple[int, int]) -> np.ndarray:
        """Ground-truth class of every pixel of a frame (nearest map pixel; outside the specimen: hole).

        Parameters
        ----------
        center_nm : (x, y)
            Frame centre on the specimen, nanometres.
        fov_nm : (h, w)
            Field of view, nanometres.
        shape : (rows, cols)

        Returns
        -------
        ndarray, shape (rows, cols), uint8
        """
        r, c = self._coords(center_nm, fov_nm, shape)
        n = self.labels.shape[0]
        ri, ci = np.rint(r).astype(np.int64), np.rint(c).astype(np.int64)
        inside = ((ri >= 0) & (ri < n))[:, None] & ((ci >= 0) & (ci < n))[None, :]
        out = self.labels[np.clip(ri, 0, n - 1)[:, None], np.clip(ci, 0, n - 1)[None, :]]
        return np.where(inside, out, 0).astype(np.uint8)

    def rare_in(self, center_nm: tuple[float, float], fov_nm: tuple[float, float],
                margin: float = 0.1) -> list[RareRegion]:
        """Rare regions whose centre lies inside a frame, ``margin`` (fraction of the field) from its edges."""
        h, w = fov_nm
        return [q for q in self.rare if abs(q.x_nm - center_nm[0]) <= w * (0.5 - margin)
                and abs(q.y_nm - center_nm[1]) <= h * (0.5 - margin)]

    # imaging ---------------------------------------------------------------------------------------------
    def render(self, center_nm: tuple[float, float], fov_nm: tuple[float, float], shape: tuple[int, int],
               electrons_per_px: float, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A HAADF frame of mass-thickness contrast and its ground-truth labels.

        Parameters
        ----------
        center_nm : (x, y)
            Frame centre on the specimen, nanometres.
        fov_nm : (h, w)
            Field of view, nanometres.
        shape : (rows, cols)
            Pixels.
        electrons_per_px : float
            Probe electrons per pixel (current times dwell); 0 or less: the noise-free signal.
        rng : numpy.random.Generator, optional
            Noise and texture (default: seeded by the frame's position, so a frame repeats exactly).

        Returns
        -------
        counts : ndarray, shape (rows, cols), uint16
            Detector counts (Poisson), or the signal times 1000 without noise.
        labels : ndarray, shape (rows, cols), uint8
        """
        rows, cols = shape
        if rng is None:
            key = [self._noise_seed, *(int(round(v * 10)) & 0x7FFFFFFF for v in (*center_nm, *fov_nm)), rows, cols]
            rng = np.random.default_rng(key)
        r, c = self._coords(center_nm, fov_nm, shape)
        labels = self.labels_of(center_nm, fov_nm, shape)
        grid_r, grid_c = np.meshgrid(r, c, indexing="ij")
        thick = ndimage.map_coordinates(self.thickness, [grid_r, grid_c], order=1, mode="constant", cval=0.0)
        px_nm = fov_nm[1] / cols
        fine = _smooth_field(rng, shape, max(self.config.fine_nm / px_nm, 0.5))
        coarse = _smooth_field(rng, shape, max(self.config.coarse_nm / px_nm, 0.5))
        # a texture finer than the pixel averages out: its amplitude falls as (scale / pixel)
        f_att = min(1.0, self.config.fine_nm / px_nm)
        c_att = min(1.0, self.config.coarse_nm / px_nm)
        base = SIGNAL[labels] * np.where(labels == 2, thick / 2.0, 1.0)
        sig = base * (1 + FINE_AMP[labels] * f_att * fine + COARSE_AMP[labels] * c_att * coarse)
        pits = (labels == 5) & (fine < -0.8)
        sig[pits] *= 1 - 0.8 * f_att
        sig = np.clip(sig, 0.0, None).astype(np.float32)
        if electrons_per_px <= 0:
            return np.clip(sig * 1000, 0, 65535).astype(np.uint16), labels
        counts = rng.poisson(sig * float(electrons_per_px) + 0.5)
        return np.clip(counts, 0, 65535).astype(np.uint16), labels


class SpecimenBackend:
    """The stage, scan and detector over a :class:`LargeSpecimen` (module docstring).

    Implements :class:`beamloop.edge.control.controller.ScanBackend` and
    :class:`~beamloop.edge.control.controller.StageBackend`. One ``haadf`` channel, frames of 16 to 4096
    pixels a side, dwell 0.05 to 100 us, fields of view up to ``config.max_fov_nm``.

    Parameters
    ----------
    config : SpecimenConfig
    clock : callable, optional
        Monotonic seconds (the controller's clock): drift runs on it.

    Attributes
    ----------
    specimen : LargeSpecimen
    limits : StageLimits
    commanded_um : (float, float)
        The last stage target (what the encoders read).
    true_um : (float, float)
        Where the stage really is (backlash and repeatability error included).
    drift : SpecimenDrift or None
    frames : dict int -> dict
        Ground truth of the last frames: ``center_nm`` (true, on the specimen), ``fov_nm``, ``shape``, ``labels``.
    moves : list of dict
        Every stage move: ``t``, ``target_um``, ``true_um``, ``duration_s``.
    """

    FRAMES_KEPT = 8

    def __init__(self, config: SpecimenConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = cfg = config or SpecimenConfig()
        self.clock = clock
        self.specimen = LargeSpecimen(cfg)
        self.limits = cfg.stage_limits()
        self.commanded_um = (0.0, 0.0)
        self.true_um = (0.0, 0.0)
        self._last_dir = (0, 0)
        self._rng = np.random.default_rng([cfg.seed, 0x57A6E])
        dcfg = DriftConfig(speed_A_per_s=cfg.drift_A_per_s, settle_A_per_s=cfg.drift_settle_A_per_s,
                           settle_tau_s=cfg.drift_settle_tau_s, walk_A_per_sqrt_s=0.0, seed=cfg.seed)
        self.drift: SpecimenDrift | None = SpecimenDrift(dcfg, clock()) if dcfg.enabled else None
        self.electrons_per_s = electrons_per_second(cfg.current_pA)
        self.frames: dict[int, dict] = {}
        self.moves: list[dict] = []
        self.blanked = True

    # ScanBackend -----------------------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        """One ``haadf`` channel; fields of view up to ``max_fov_nm``; no parked stream."""
        limits = ScanLimits(shape=(16, 4096), dwell_us=(0.05, 100.0), default_dwell_us=2.0, channels=("haadf",),
                            max_fov_nm=self.config.max_fov_nm)
        return Capabilities(limits, None, {"simulated": True, "specimen_um": self.config.size_um,
                                           "current_pA": self.config.current_pA})

    def set_frame(self, scan: ScanFrame, channels: tuple[str, ...]) -> dict:
        """Nothing to set up; the reply gets the frame's dose, electrons per square nanometre."""
        ay, ax = scan.pixel_size_A_yx
        return {"dose_e_per_nm2": self.electrons_per_s * scan.dwell_us * 1e-6 / (ay * ax / 100)}

    def frame_center_nm(self, scan: ScanFrame) -> tuple[float, float]:
        """True centre of ``scan`` on the specimen now: stage (true) plus ``center_nm`` minus the drift, nm."""
        dx = dy = 0.0
        if self.drift is not None:
            ddx, ddy = self.drift.displacement(self.clock())
            dx, dy = float(ddx) / 10, float(ddy) / 10  # the specimen moved by D: the beam sees it at -D
        return (self.true_um[0] * 1000 + scan.center_nm[0] - dx, self.true_um[1] * 1000 + scan.center_nm[1] - dy)

    def acquire(self, scan: ScanFrame, channels: tuple[str, ...]) -> Acquisition:
        """Render ``scan`` at the stage's true position (uint16 counts) and keep its ground truth."""
        centre = self.frame_center_nm(scan)
        e_px = self.electrons_per_s * scan.dwell_us * 1e-6
        counts, labels = self.specimen.render(centre, scan.fov_nm, scan.shape, e_px)
        self.frames[scan.frame_id] = {"center_nm": centre, "fov_nm": tuple(scan.fov_nm), "shape": scan.shape,
                                      "labels": labels, "stage_um": self.commanded_um}
        for old in [k for k in self.frames if k <= scan.frame_id - self.FRAMES_KEPT]:
            del self.frames[old]
        t = scan.shape[0] * scan.shape[1] * scan.dwell_us * 1e-6
        return Acquisition({"haadf": counts}, {"simulated": True, "stage_um": list(self.commanded_um),
                                               "dose_e_per_px": e_px}, count_time_s=t, frame_time_s=t)

    def park(self, fx: float, fy: float, frame_id: int) -> tuple[float, float]:
        """The probe goes where it is told; returns ``(fx, fy)``."""
        return fx, fy

    def set_blanked(self, on: bool) -> bool:
        """The blanker follows at once."""
        self.blanked = bool(on)
        return self.blanked

    # StageBackend ----------------------------------------------------------------------------------------
    def stage_limits(self) -> StageLimits:
        """``config.stage_limits()``."""
        return self.limits

    def stage_position(self) -> tuple[float, float]:
        """The encoder reading: the last target, micrometres."""
        return self.commanded_um

    def move_stage(self, x_um: float, y_um: float) -> tuple[float, float, float]:
        """Move: an axis stops ``backlash_um / 2`` short in its direction of travel (an axis that does not move
        keeps its error), plus the repeatability error; the specimen starts settling (drift). Returns the
        target (the encoders' reading) and the move time (:meth:`StageLimits.move_time_s`)."""
        lim = self.limits
        if not (lim.x_um[0] <= x_um <= lim.x_um[1] and lim.y_um[0] <= y_um <= lim.y_um[1]):
            raise BridgeError("out_of_range", f"stage target ({x_um:g}, {y_um:g}) um outside the travel range")
        (x0, y0), (tx, ty) = self.commanded_um, self.true_um
        dur = lim.move_time_s(x_um - x0, y_um - y0)
        dirs = []
        new = []
        for target, before, true_before, last in ((x_um, x0, tx, self._last_dir[0]), (y_um, y0, ty, self._last_dir[1])):
            d = int(np.sign(target - before))
            if d == 0:
                dirs.append(last)
                new.append(true_before)
                continue
            dirs.append(d)
            new.append(target - d * lim.backlash_um / 2 + float(self._rng.normal(0.0, self.config.repeat_um)))
        self._last_dir = (dirs[0], dirs[1])
        self.commanded_um = (float(x_um), float(y_um))
        self.true_um = (new[0], new[1])
        t = self.clock()
        if self.drift is not None and dur > 0:
            self.drift.fov_changed(t)
        self.moves.append({"t": t, "target_um": self.commanded_um, "true_um": self.true_um, "duration_s": dur})
        return self.commanded_um[0], self.commanded_um[1], dur


@dataclass
class ManualClock:
    """Simulated time for a search run: stage moves and frames take seconds that a run need not wait for.

    Attributes
    ----------
    t : float
        Now, seconds.
    """

    t: float = 0.0
    log: list = field(default_factory=list)

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        """Move time on by ``dt`` seconds (>= 0); returns the new time.

        Raises
        ------
        ValueError
            ``dt`` negative or not finite.
        """
        if not (math.isfinite(dt) and dt >= 0):
            raise ValueError(f"clock step {dt!r} must be a finite number of seconds >= 0")
        self.t += float(dt)
        return self.t


class SearchMicroscope(ScanController):
    """A :class:`ScanController` over :class:`SpecimenBackend`: the bridge, safety rules and frame stream of a
    simulated microscope with a motorised stage over a large specimen.

    Parameters
    ----------
    config : SpecimenConfig, optional
    context : zmq.Context, optional
    clock : callable, optional
        Monotonic seconds; a :class:`ManualClock` for a run in simulated time.
    control, frames : str
        Endpoints to bind (loopback, free ports by default).

    Attributes
    ----------
    backend : SpecimenBackend
    """

    backend: SpecimenBackend

    def __init__(self, config: SpecimenConfig | None = None, context: zmq.Context | None = None, *,
                 clock: Callable[[], float] = time.monotonic, control: str = "tcp://127.0.0.1:*",
                 frames: str = "tcp://127.0.0.1:*") -> None:
        backend = SpecimenBackend(config, clock)
        limits = SafetyLimits(max_pixel_dwell_us=100.0)
        super().__init__(backend, control=control, frames=frames, limits=limits, context=context, clock=clock,
                         calls={"sim_frame_truth": self._sim_frame_truth})

    def _sim_frame_truth(self, args: dict) -> dict:
        """``sim_frame_truth``: ``frame_id`` -> true centre (nm), field of view, rare regions inside it."""
        fid = args.get("frame_id")
        g = self.backend.frames.get(fid) if isinstance(fid, int) else None
        if g is None:
            raise BridgeError("out_of_range", f"no ground truth kept for frame {fid!r}")
        rare = self.backend.specimen.rare_in(g["center_nm"], g["fov_nm"])
        return {"center_nm": list(g["center_nm"]), "fov_nm": list(g["fov_nm"]),
                "rare": [q.index for q in rare], "labels": g["labels"].tobytes(), "shape": list(g["shape"])}
