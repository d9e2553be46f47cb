"""4D-STEM mode of the simulated microscope: one convergent-beam diffraction pattern per probe position.

Model (phenomenological, for testing live reductions, trigger models and transport; not a multislice
simulation):

- The probe's bright-field (BF) disk has radius ``disk_radius_px`` (the convergence semi-angle in
  detector pixels) and soft edges one pixel wide.
- The specimen scatters a fraction ``s`` of the probe electrons out of the BF disk. ``s`` follows the
  HAADF signal of the linear incoherent model used for HAADF frames (:class:`beamloop.edge.sim.render.ColumnRenderer`,
  abTEM single-atom profiles): ``s = min(scatter_factor * h, s_max)`` where ``h`` is the fraction reaching
  the HAADF detector at that probe position. So the BF disk dims over atomic columns, more for heavy ones.
- The scattered electrons land outside the disk with a radial density ``(1 + (r / r_df)^2)^-2`` (a screened
  Rutherford-like tail, ``r`` from the disk centre); what falls beyond the detector edge is lost.
- The pattern (disk and tail) is shifted rigidly by ``kappa * grad(h)`` (rows along specimen y, columns
  along x). For a weak phase object the centre-of-mass shift is proportional to the gradient of the
  projected potential (Müller et al., Nat. Commun. 5, 5653 (2014)) and points towards the nuclei; ``h``
  stands in for the smoothed projected potential, since both peak on the columns. ``kappa`` is set so that
  the steepest flank of one Mo atom shifts the pattern by ``max_shift_px``.
- Counts are Poisson with ``electrons`` electrons per probe position.

Limits: no coherent interference (no overlapping Bragg disks, no Ronchigram or aberration features),
no thickness or channelling effects, the HAADF-to-total scattering ratio is one constant for all elements,
and the CoM is proportional to the gradient of the HAADF signal rather than of the true potential (which
is wider and scales with Z rather than Z^1.8). Qualitative trends (BF darkens and ADF brightens on columns,
CoM points at columns, heavier columns give stronger signals) are right; absolute values are not.

API for other modules (e.g. trigger models needing small labelled patterns):

>>> from beamloop.edge.sim.fourd import training_patterns
>>> patterns, labels = training_patterns(1000, detector_px=16, electrons=2000, seed=0)   # doctest: +SKIP
>>> patterns.shape, patterns.dtype               # (1000, 16, 16) float32, counts binned 6x6
>>> labels["over_column"]                         # bool (1000,): probe within 0.5 A of an occupied column
>>> labels["column_class"], labels["distance_A"]  # class of the nearest site (MOS2_CLASSES), its distance

For full control, build a :class:`FourDMicroscope` from a specimen (:mod:`beamloop.edge.sim.lattice`) and call
:meth:`FourDMicroscope.patterns` at arbitrary probe positions, :meth:`FourDMicroscope.scan` over a
:class:`beamloop.edge.frame.scanframe.ScanFrame`, and :func:`bin_patterns` to reduce the detector size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.sim import lattice
from beamloop.edge.sim.profiles import profile_table
from beamloop.edge.sim.render import ColumnRenderer


@dataclass(frozen=True)
class FourDConfig:
    """Parameters of the 4D-STEM model (see the module docstring).

    Attributes
    ----------
    detector_shape : (rows, cols)
        Detector pixels, e.g. (96, 96) for a binned DECTRIS ARINA.
    disk_radius_px : float
        BF disk radius (convergence semi-angle), detector pixels.
    centre_px : (row, col) or None
        Position of the unscattered disk centre; the detector centre by default.
    scatter_factor : float
        Electrons scattered out of the BF disk per electron reaching the HAADF detector.
    s_max : float
        Upper bound of the scattered fraction.
    df_width_px : float
        ``r_df`` of the dark-field tail, detector pixels.
    max_shift_px : float
        Pattern shift at the steepest flank of one Mo atom's HAADF profile, detector pixels.
    blur_sigma_A : float
        Source-size blur of the HAADF profiles, Angstrom.
    """

    detector_shape: tuple[int, int] = (96, 96)
    disk_radius_px: float = 16.0
    centre_px: tuple[float, float] | None = None
    scatter_factor: float = 3.0
    s_max: float = 0.9
    df_width_px: float = 24.0
    max_shift_px: float = 1.5
    blur_sigma_A: float = 0.25

    @property
    def centre(self) -> tuple[float, float]:
        """Unscattered disk centre (row, col), detector pixels."""
        if self.centre_px is not None:
            return self.centre_px
        return ((self.detector_shape[0] - 1) / 2, (self.detector_shape[1] - 1) / 2)


@numba.njit(cache=True, nogil=True)
def _patterns_kernel(s, shift, cy, cx, radius, r_df, out):
    n, rows, cols = out.shape
    for i in range(n):
        y0 = cy + shift[i, 0]
        x0 = cx + shift[i, 1]
        bf_sum = 0.0
        df_sum = 0.0
        for r in range(rows):
            for c in range(cols):
                d = math.hypot(r - y0, c - x0)
                a = min(max(radius - d + 0.5, 0.0), 1.0)
                out[i, r, c] = a
                bf_sum += a
                q = d / r_df
                df_sum += (1.0 - a) / ((1.0 + q * q) * (1.0 + q * q))
        bf_w = (1.0 - s[i]) / bf_sum if bf_sum > 0 else 0.0
        df_w = s[i] / df_sum if df_sum > 0 else 0.0
        for r in range(rows):
            for c in range(cols):
                a = out[i, r, c]
                q = math.hypot(r - y0, c - x0) / r_df
                out[i, r, c] = a * bf_w + (1.0 - a) * df_w / ((1.0 + q * q) * (1.0 + q * q))


class FourDMicroscope:
    """Convergent-beam diffraction patterns of a specimen at arbitrary probe positions.

    Parameters
    ----------
    specimen : beamloop.edge.sim.lattice.Specimen
        Read at every call (ejected atoms show at once).
    config : FourDConfig

    Raises
    ------
    KeyError
        An element of the specimen has no HAADF profile.
    """

    def __init__(self, specimen: lattice.Specimen, config: FourDConfig = FourDConfig()) -> None:
        self.specimen = specimen
        self.config = config
        elements = tuple(dict.fromkeys(specimen.elements + ("Mo",)))
        self.profiles = profile_table(elements, config.blur_sigma_A)
        self.renderer = ColumnRenderer(specimen, self.profiles)
        mo = self.profiles.table[self.profiles.index("Mo")]
        steepest = np.max(np.abs(np.diff(mo))) / self.profiles.dr
        self.kappa = config.max_shift_px / steepest  # detector px per (fraction per Angstrom)
        self._h = 0.01  # finite-difference step for the gradient, Angstrom

    def signals(self, x_A: np.ndarray, y_A: np.ndarray) -> dict[str, np.ndarray]:
        """Per-position model quantities.

        Parameters
        ----------
        x_A, y_A : ndarray (n,), float
            Probe positions, specimen coordinates, Angstrom.

        Returns
        -------
        dict of ndarray (n,) (``shift_px``: (n, 2))
            ``haadf_fraction`` h, ``scattered_fraction`` s, ``shift_px`` (row, col) of the pattern.
        """
        x = np.ascontiguousarray(x_A, np.float64).ravel()
        y = np.ascontiguousarray(y_A, np.float64).ravel()
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ValueError("probe positions must be finite")
        e = self.renderer.expected
        h = e(x[None], y[None])[0]
        d = self._h
        gx = (e(x[None] + d, y[None])[0] - e(x[None] - d, y[None])[0]) / (2 * d)
        gy = (e(x[None], y[None] + d)[0] - e(x[None], y[None] - d)[0]) / (2 * d)
        c = self.config
        s = np.minimum(c.scatter_factor * h, c.s_max)
        return {"haadf_fraction": h, "scattered_fraction": s,
                "shift_px": np.stack([self.kappa * gy, self.kappa * gx], axis=1)}

    def expected(self, x_A: np.ndarray, y_A: np.ndarray) -> np.ndarray:
        """Expected fraction of probe electrons per detector pixel.

        Returns
        -------
        ndarray (n, rows, cols), float64
            Sums to 1 minus what the dark-field tail loses past the detector edge (here: normalised on
            the detector, so exactly 1).
        """
        sig = self.signals(x_A, y_A)
        c = self.config
        out = np.empty((len(sig["haadf_fraction"]), *c.detector_shape), np.float64)
        cy, cx = c.centre
        _patterns_kernel(sig["scattered_fraction"], sig["shift_px"], cy, cx, c.disk_radius_px, c.df_width_px, out)
        return out

    def patterns(self, x_A: np.ndarray, y_A: np.ndarray, electrons: float, rng: np.random.Generator,
                 dtype=np.uint16) -> np.ndarray:
        """Detector counts at each probe position: Poisson(expected x ``electrons``).

        Parameters
        ----------
        electrons : float
            Probe electrons per position (dose x probe-step area), > 0.
        dtype : uint8, uint16 or uint32
            Counts are clipped to its maximum, as a counting detector saturates.

        Returns
        -------
        ndarray (n, rows, cols), ``dtype``

        Raises
        ------
        ValueError
            Non-positive or non-finite ``electrons``, non-finite positions.
        """
        if not (electrons > 0 and math.isfinite(electrons)):
            raise ValueError(f"electrons per position must be positive and finite, got {electrons}")
        lam = self.expected(x_A, y_A) * electrons
        return np.minimum(rng.poisson(lam), np.iinfo(dtype).max).astype(dtype)

    def scan(self, scan: ScanFrame, electrons: float, rng: np.random.Generator, dtype=np.uint16) -> np.ndarray:
        """A 4D-STEM scan: patterns at every probe position of ``scan`` (raster, no distortion).

        Returns
        -------
        ndarray (scan_rows, scan_cols, det_rows, det_cols), ``dtype``
        """
        x, y = self.positions(scan)
        return self.patterns(x.ravel(), y.ravel(), electrons, rng, dtype).reshape(*scan.shape,
                                                                                    *self.config.detector_shape)

    @staticmethod
    def positions(scan: ScanFrame) -> tuple[np.ndarray, np.ndarray]:
        """Probe positions (x_A, y_A), each (rows, cols), at the pixel centres of ``scan``."""
        rows, cols = scan.shape
        jj, ii = np.meshgrid(np.arange(cols, dtype=float), np.arange(rows, dtype=float))
        return scan.specimen_of_fraction((jj + 0.5) / cols, (ii + 0.5) / rows)

    def labels(self, x_A: np.ndarray, y_A: np.ndarray, column_radius_A: float = 0.5) -> dict[str, np.ndarray]:
        """Ground truth at probe positions.

        Returns
        -------
        dict
            ``over_column`` bool (n,): an occupied column lies within ``column_radius_A``; ``distance_A``
            (n,): distance to the nearest site (occupied or vacancy); ``column_class`` int8 (n,): that site's
            class (index into ``specimen.class_names``); plus :meth:`signals`.
        """
        from scipy.spatial import cKDTree

        x = np.asarray(x_A, float).ravel()
        y = np.asarray(y_A, float).ravel()
        sp = self.specimen
        cls = sp.classes()
        d_all, i_all = cKDTree(sp.xy).query(np.stack([x, y], 1))
        occupied = sp.counts.sum(axis=1) > 0
        if occupied.any():
            d_occ, _ = cKDTree(sp.xy[occupied]).query(np.stack([x, y], 1))
        else:
            d_occ = np.full(len(x), np.inf)
        out = {"over_column": d_occ <= column_radius_A, "distance_A": d_all, "column_class": cls[i_all].astype(np.int8)}
        out.update(self.signals(x, y))
        return out


def bin_patterns(patterns: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Sum-bin patterns (..., rows, cols) to (..., out_rows, out_cols); rows and cols must be multiples.

    Returns float32 counts. Raises ``ValueError`` when the shapes do not divide.
    """
    *lead, rows, cols = patterns.shape
    orow, ocol = out_shape
    if rows % orow or cols % ocol:
        raise ValueError(f"cannot bin {rows}x{cols} to {orow}x{ocol}: not a whole factor")
    p = patterns.reshape(*lead, orow, rows // orow, ocol, cols // ocol)
    return p.sum(axis=(-3, -1), dtype=np.float64).astype(np.float32)


def training_patterns(n: int, *, detector_px: int = 16, electrons: float = 2000.0, seed: int = 0,
                      column_radius_A: float = 0.5, over_column_fraction: float = 0.5,
                      config: FourDConfig = FourDConfig(), defects: bool = True) -> tuple[np.ndarray, dict]:
    """Labelled, binned diffraction patterns of MoS2 at random probe positions.

    Half the positions (``over_column_fraction``) are drawn within ``column_radius_A`` of a random site
    (occupied or vacancy), the rest uniformly over the specimen.

    Parameters
    ----------
    n : int
        Patterns to make.
    detector_px : int
        Binned detector size (square); must divide ``config.detector_shape``.
    electrons : float
        Probe electrons per position.
    seed : int
    column_radius_A : float
        Radius that defines ``over_column``.
    defects : bool
        Add MoS2 point defects (S mono-/di-vacancies, Mo vacancies) so all classes occur.

    Returns
    -------
    patterns : ndarray (n, detector_px, detector_px), float32
        Counts.
    labels : dict
        See :meth:`FourDMicroscope.labels`; plus ``x_A``, ``y_A``.
    """
    rng = np.random.default_rng(seed)
    spec = lattice.mos2((-15.0, 15.0, -15.0, 15.0))
    if defects:
        lattice.add_point_defects(spec, rng, s_mono=0.15, s_di=0.08, mo_vacancy=0.08)
    mic = FourDMicroscope(spec, config)
    near = rng.random(n) < over_column_fraction
    pos = rng.uniform(-10.0, 10.0, (n, 2))
    inner = np.flatnonzero((np.abs(spec.xy) < 10.0).all(axis=1))
    pick = spec.xy[rng.choice(inner, int(near.sum()))]
    r = column_radius_A * np.sqrt(rng.random(len(pick)))
    a = rng.uniform(0, 2 * math.pi, len(pick))
    pos[near] = pick + np.stack([r * np.cos(a), r * np.sin(a)], 1)
    full = mic.patterns(pos[:, 0], pos[:, 1], electrons, rng)
    labels = mic.labels(pos[:, 0], pos[:, 1], column_radius_A)
    labels["x_A"], labels["y_A"] = pos[:, 0], pos[:, 1]
    return bin_patterns(full, (detector_px, detector_px)), labels
