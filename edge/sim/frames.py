"""Simulated HAADF frames with ground truth: the imaging half of the simulated microscope."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.physics import electrons_per_second  # noqa: F401  (re-exported: the simulator's users import it here)
from beamloop.edge.sim import distortion as dist
from beamloop.edge.sim import lattice, profiles
from beamloop.edge.sim.render import ColumnRenderer, poisson_counts


@dataclass
class SimulatedFrame:
    """One simulated frame and what is really in it.

    Attributes
    ----------
    counts : ndarray, shape (rows, cols), uint16
        HAADF detector counts per pixel.
    scan : ScanFrame
        The scan that produced it.
    truth_xy : ndarray, shape (n, 2), float64
        Pixel coordinates ``(x, y)`` of every column and vacancy site inside the frame, moved by the
        smooth part of the scan distortion.
    truth_cls : ndarray, shape (n,), int8
        Their classes (indices into ``class_names``).
    truth_index : ndarray, shape (n,), int64
        Their indices in the specimen.
    class_names : tuple of str
    dose_e_per_A2 : float
        Electron dose of the frame, electrons per square Angstrom.
    distortion : ScanDistortion
    t_start_s : float
        Simulator clock time the scan started, seconds (NaN: a frame off the clock, without specimen drift).
    """

    counts: np.ndarray
    scan: ScanFrame
    truth_xy: np.ndarray
    truth_cls: np.ndarray
    truth_index: np.ndarray
    class_names: tuple[str, ...]
    dose_e_per_A2: float
    distortion: dist.ScanDistortion
    t_start_s: float = math.nan

    @property
    def pixel_size_A(self) -> float:
        """Angstrom per pixel."""
        return self.scan.pixel_size_A


class FrameSimulator:
    """Scans a specimen: renders frames with the linear incoherent model, distortions and Poisson noise.

    Parameters
    ----------
    specimen : lattice.Specimen
    rng : numpy.random.Generator
    blur_sigma_A : float
        Effective source size (Gaussian sigma), Angstrom.
    background_fraction : float
        Constant extra signal (support film), as a fraction of probe electrons.
    distortion_scale : float
        Scale of the typical scan distortion (:meth:`ScanDistortion.typical`); 0 disables it.
    """

    def __init__(self, specimen: lattice.Specimen, rng: np.random.Generator, *, blur_sigma_A: float = 0.25,
                 background_fraction: float = 2e-5, distortion_scale: float = 1.0) -> None:
        self.specimen = specimen
        self.rng = rng
        self.renderer = ColumnRenderer(specimen, profiles.profile_table(specimen.elements, blur_sigma_A))
        self.background_fraction = background_fraction
        self.distortion_scale = distortion_scale

    def acquire(self, scan: ScanFrame, electrons_per_pixel: float,
                distortion: dist.ScanDistortion | None = None, motion: dist.Motion | None = None) -> SimulatedFrame:
        """Scan one frame.

        Parameters
        ----------
        scan : ScanFrame
            Geometry and dwell time.
        electrons_per_pixel : float
            Beam electrons per pixel (current x dwell).
        distortion : ScanDistortion, optional
            Defaults to a random typical one scaled by ``distortion_scale``.
        motion : callable, optional
            The specimen's own displacement during the scan (:mod:`beamloop.edge.sim.drift`); it replaces
            the distortion's per-frame stand-in drift (``drift_A_per_s`` set to 0), and ``truth_xy`` then
            follows the moving columns. None: as before drift was modelled.
        """
        rows, cols = scan.shape
        frame_time = rows * cols * scan.dwell_us * 1e-6
        if distortion is None:
            distortion = (dist.ScanDistortion.typical(self.rng, frame_time, self.distortion_scale)
                          if self.distortion_scale > 0 else dist.ScanDistortion())
        if motion is not None:
            distortion = replace(distortion, drift_A_per_s=(0.0, 0.0))
        x, y = dist.probe_positions(scan, distortion, self.rng, motion)
        expected = self.renderer.expected(x, y)
        counts = poisson_counts(expected, electrons_per_pixel, self.rng, self.background_fraction)
        app = dist.apparent_positions(scan, distortion, self.specimen.xy, motion=motion)
        inside = (app[:, 0] >= -0.5) & (app[:, 0] <= cols - 0.5) & (app[:, 1] >= -0.5) & (app[:, 1] <= rows - 0.5)
        idx = np.flatnonzero(inside)
        py, px = scan.pixel_size_A_yx
        return SimulatedFrame(
            counts=counts,
            scan=scan,
            truth_xy=app[idx],
            truth_cls=self.specimen.classes()[idx],
            truth_index=idx,
            class_names=self.specimen.class_names,
            dose_e_per_A2=electrons_per_pixel / (px * py),
            distortion=distortion,
        )


def mos2_frame(shape: tuple[int, int] = (256, 256), pixel_size_A: float = 0.15, dose_e_per_A2: float = 1e5,
               seed: int = 0, *, defects: bool = True, distortion_scale: float = 1.0, rotation_deg: float | None = None,
               dwell_us: float = 10.0, blur_sigma_A: float = 0.25) -> SimulatedFrame:
    """A MoS2 monolayer frame with point defects and ground truth, from scratch (for tests and benchmarks).

    Parameters
    ----------
    shape : (rows, cols)
    pixel_size_A : float
        Angstrom per pixel.
    dose_e_per_A2 : float
        Electrons per square Angstrom.
    seed : int
        Seed of everything random (lattice rotation and offset, defects, distortion, noise).
    defects : bool
        Add S mono-/di-vacancies and Mo vacancies (:func:`lattice.add_point_defects`).
    distortion_scale : float
        Scale of drift, wobble and jitter (0: none).
    rotation_deg : float, optional
        Lattice rotation; random when omitted.
    dwell_us : float
        Pixel dwell time (sets the frame time that drift acts over).
    """
    rng = np.random.default_rng(seed)
    rows, cols = shape
    h, w = rows * pixel_size_A, cols * pixel_size_A
    margin = 8.0
    rot = float(rng.uniform(0, 60)) if rotation_deg is None else rotation_deg
    spec = lattice.mos2((-w / 2 - margin, w / 2 + margin, -h / 2 - margin, h / 2 + margin), rotation_deg=rot,
                        origin_A=tuple(rng.uniform(-2, 2, 2)))
    if defects:
        lattice.add_point_defects(spec, rng)
    sim = FrameSimulator(spec, rng, blur_sigma_A=blur_sigma_A, distortion_scale=distortion_scale)
    scan = ScanFrame(0, (rows, cols), (h / 10, w / 10), dwell_us=dwell_us)
    return sim.acquire(scan, dose_e_per_A2 * pixel_size_A**2)


def frame_dose(electrons_per_pixel: float, pixel_size_A: float) -> float:
    """Dose in electrons per square Angstrom."""
    return electrons_per_pixel / (pixel_size_A * pixel_size_A) if pixel_size_A > 0 else math.nan
