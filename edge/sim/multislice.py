"""A second, independent simulator: periodic HAADF images from abTEM multislice / PRISM, resampled into frames.

The project's own simulator (:mod:`beamloop.edge.sim.frames`) is a linear incoherent model: each column
adds its element's single-atom profile. This module computes the image of a perfect (or periodically
defective) crystal with full dynamical scattering instead -- abTEM (J. Madsen & T. Susi, "The abTEM code:
transmission electron microscopy from first principles", Open Research Europe 1, 24 (2021)): a probe with
the chosen aberrations is propagated through the projected potential (multislice, J. M. Cowley &
A. F. Moodie, Acta Cryst. 10, 609 (1957); or PRISM, C. Ophus, Adv. Struct. Chem. Imaging 3, 13 (2017)),
optionally averaged over frozen-phonon configurations, and the electrons scattered onto an annular
detector are counted.

Because a crystal's image is periodic, only one cell of probe positions is scanned (the potential is the
cell repeated to at least :data:`MIN_EXTENT_A` so that the probe does not wrap onto itself). A frame is then
made by sampling that periodic image at the distorted probe positions of a scan
(:func:`beamloop.edge.sim.distortion.probe_positions`) with any rotation and offset: Fourier
upsampling of the cell image followed by cubic interpolation with periodic wrap. The columns' true
positions are moved by the smooth part of the distortion as :class:`beamloop.edge.sim.frames.FrameSimulator`
reports them. Noise and detector models are applied afterwards by the caller.

abTEM is an optional dependency (``pip install abtem``); cell images are cached as ``.npz`` files
(:func:`cached_cell`), never shipped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.sim import distortion as dist

MIN_EXTENT_A = 14.0
"""Smallest lateral size of the simulated potential, Angstrom: a 20-30 mrad probe's tails stay well inside."""

CELL_STRUCTURES = ("MoS2", "WSe2", "WS2", "graphene", "Si[110]", "SrTiO3[001]", "Au[110]", "GaAs[110]")
"""Structures :func:`cell_atoms` builds."""


@dataclass(frozen=True)
class Optics:
    """Probe, detector and simulation settings of one abTEM run.

    Attributes
    ----------
    energy_kV : float
        Beam energy, kV.
    semiangle_mrad : float
        Probe-forming aperture semi-angle, mrad.
    defocus_A : float
        Defocus (abTEM sign convention: positive underfocus), Angstrom.
    cs_A : float
        Spherical aberration C3, Angstrom (1 mm = 1e7 Angstrom).
    astig_A : float
        Two-fold astigmatism C12 magnitude, Angstrom.
    inner_mrad, outer_mrad : float
        Annular detector angles, mrad.
    frozen_phonons : int
        Frozen-phonon configurations (0: a static lattice).
    phonon_sigma_A : float
        RMS thermal displacement of every atom, Angstrom.
    method : {"multislice", "prism"}
    prism_interpolation : int
        PRISM interpolation factor (1: exact for a periodic cell).
    potential_sampling_A : float
        Potential and wave-function sampling, Angstrom; made finer where the detector's outer angle needs it
        (:func:`wave_sampling_A`).
    scan_sampling_A : float
        Probe-position spacing within the cell, Angstrom.
    slice_A : float
        Slice thickness, Angstrom.
    """

    energy_kV: float = 80.0
    semiangle_mrad: float = 25.0
    defocus_A: float = 0.0
    cs_A: float = 0.0
    astig_A: float = 0.0
    inner_mrad: float = 80.0
    outer_mrad: float = 200.0
    frozen_phonons: int = 0
    phonon_sigma_A: float = 0.08
    method: str = "multislice"
    prism_interpolation: int = 1
    potential_sampling_A: float = 0.05
    scan_sampling_A: float = 0.1
    slice_A: float = 1.0


@dataclass
class CellImage:
    """The periodic HAADF image of one crystal cell and its columns.

    Attributes
    ----------
    image : ndarray (ny, nx) float64
        Fraction of probe electrons on the detector for probe positions on a regular grid over one cell
        (row = y, column = x), starting at the cell's origin, endpoint excluded.
    cell_A : (Lx, Ly)
        Cell size, Angstrom (the image repeats with it).
    columns_xy : ndarray (m, 2) float64
        Column positions inside the cell (projected atoms grouped within 0.1 Angstrom), Angstrom.
    columns_label : ndarray (m,) str
        Composition of each column, e.g. ``"Mo1"``, ``"S2"``, ``"Si6"``.
    structure : str
    optics : Optics
    thickness_A : float
        Specimen thickness along the beam, Angstrom.
    """

    image: np.ndarray
    cell_A: tuple[float, float]
    columns_xy: np.ndarray
    columns_label: np.ndarray
    structure: str
    optics: Optics
    thickness_A: float

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` file (no pickles)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, image=self.image, cell_A=np.asarray(self.cell_A), columns_xy=self.columns_xy,
                 columns_label=self.columns_label.astype("U16"), structure=np.asarray(self.structure),
                 optics=np.asarray(json.dumps(asdict(self.optics))), thickness_A=np.asarray(self.thickness_A))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CellImage:
        """Read a file written by :meth:`save`; raises ``OSError``/``KeyError`` for a missing or foreign file."""
        with np.load(Path(path), allow_pickle=False) as d:
            return cls(d["image"], tuple(float(v) for v in d["cell_A"]), d["columns_xy"], d["columns_label"],
                       str(d["structure"]), Optics(**json.loads(str(d["optics"]))), float(d["thickness_A"]))


def cell_atoms(structure: str, thickness_cells: int = 1, vacancies: tuple[int, ...] = (), supercell=(1, 1)):
    """An orthogonal, periodic ase ``Atoms`` cell of ``structure`` with the beam along z.

    Parameters
    ----------
    structure : str
        One of :data:`CELL_STRUCTURES`. 2H dichalcogenide monolayers (``MoS2``, ``WSe2``, ``WS2``; lattice
        constants as in :mod:`beamloop.edge.sim.structures`), graphene, and 3-D crystals viewed along the
        zone axis in the name (Si and GaAs [110], SrTiO3 [001], Au [110]).
    thickness_cells : int
        Repeats along the beam (3-D crystals).
    vacancies : tuple of int
        Indices of atoms to remove after building the supercell (periodic point defects).
    supercell : (nx, ny)
        Lateral repeats of the orthogonal cell before removing atoms.

    Raises
    ------
    KeyError
        Unknown structure.
    """
    import ase
    from abtem import orthogonalize_cell
    from ase.build import bulk, graphene, mx2, surface

    from beamloop.edge.sim.structures import FCC_A, GRAPHENE_A, SI_A, SRTIO3_A, TMD_A

    if structure in ("MoS2", "WSe2", "WS2"):
        metal, chal = {"MoS2": ("Mo", "S"), "WSe2": ("W", "Se"), "WS2": ("W", "S")}[structure]
        a = TMD_A[structure]
        thick = {"S": 3.17, "Se": 3.34}[chal]  # chalcogen-chalcogen distance across the layer, Angstrom
        atoms = orthogonalize_cell(mx2(f"{metal}{chal}2", kind="2H", a=a, thickness=thick, vacuum=2.0))
    elif structure == "graphene":
        atoms = orthogonalize_cell(graphene(a=GRAPHENE_A, vacuum=2.0))
    elif structure in ("Si[110]", "GaAs[110]"):
        cryst = (bulk("Si", "diamond", a=SI_A, cubic=True) if structure == "Si[110]"
                 else bulk("GaAs", "zincblende", a=5.653, cubic=True))
        atoms = surface(cryst, (1, 1, 0), layers=2 * thickness_cells, periodic=True)
    elif structure == "Au[110]":
        atoms = surface(bulk("Au", "fcc", a=FCC_A["Au"], cubic=True), (1, 1, 0), layers=2 * thickness_cells,
                        periodic=True)
    elif structure == "SrTiO3[001]":
        a = SRTIO3_A
        atoms = ase.Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                                      (0, 0.5, 0.5)], cell=[a, a, a], pbc=True)
        atoms = atoms * (1, 1, thickness_cells)
    else:
        raise KeyError(f"no cell for {structure!r}; known: {CELL_STRUCTURES}")
    atoms = atoms * (int(supercell[0]), int(supercell[1]), 1)
    if vacancies:
        del atoms[list(vacancies)]
    atoms.wrap()
    return atoms


def projected_columns(atoms, tol_A: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Atoms grouped into columns along z: positions (m, 2) Angstrom inside the cell, and labels like ``"Mo1"``."""
    cell = np.diag(atoms.cell)[:2]
    xy = np.mod(np.round(atoms.positions[:, :2], 6), cell)
    xy[np.isclose(xy, cell[None, :], atol=1e-5)] = 0.0
    sym = np.asarray(atoms.get_chemical_symbols())
    cols: list[list[int]] = []
    centres: list[np.ndarray] = []
    for k, p in enumerate(xy):
        for c, q in enumerate(centres):
            d = (p - q + cell / 2) % cell - cell / 2
            if np.hypot(*d) < tol_A:
                cols[c].append(k)
                break
        else:
            cols.append([k])
            centres.append(p)
    labels = []
    for members in cols:
        el, n = np.unique(sym[members], return_counts=True)
        labels.append("".join(f"{e}{c}" for e, c in zip(el, n)))
    return np.asarray(centres, float), np.asarray(labels)


def electron_wavelength_A(energy_kV: float) -> float:
    """Relativistic electron wavelength, Angstrom: ``h / sqrt(2 m e U (1 + e U / (2 m c^2)))``
    (CODATA 2018 constants)."""
    h, m, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    u = energy_kV * 1e3
    return h / math.sqrt(2 * m * e * u * (1 + e * u / (2 * m * c * c))) * 1e10


def wave_sampling_A(optics: Optics) -> float:
    """Potential sampling that lets abTEM resolve scattering out to the detector's outer angle: its
    anti-aliased (2/3 of Nyquist) rectangular cutoff is ``lambda / (3 s)``, taken 5 % above the outer angle."""
    need = electron_wavelength_A(optics.energy_kV) / (3.0 * 1.05 * optics.outer_mrad * 1e-3)
    return min(optics.potential_sampling_A, need)


def simulate_cell(structure: str, optics: Optics = Optics(), thickness_cells: int = 1,
                  vacancies: tuple[int, ...] = (), supercell=(1, 1), threads: int = 1) -> CellImage:
    """Run abTEM over one cell of ``structure`` (see the module docstring).

    Raises
    ------
    ImportError
        abTEM is not installed.
    KeyError
        Unknown structure.
    """
    import abtem

    abtem.config.set({"device": "cpu", "dask.scheduler": "synchronous" if threads == 1 else "threads"})
    atoms = cell_atoms(structure, thickness_cells, vacancies, supercell)
    cell = np.diag(atoms.cell)[:2].copy()
    cols_xy, labels = projected_columns(atoms)
    reps = tuple(int(math.ceil(MIN_EXTENT_A / c)) for c in cell)
    big = atoms * (reps[0], reps[1], 1)
    if optics.frozen_phonons > 0:
        src = abtem.FrozenPhonons(big, num_configs=optics.frozen_phonons, sigmas=optics.phonon_sigma_A, seed=1)
    else:
        src = big
    potential = abtem.Potential(src, sampling=wave_sampling_A(optics), slice_thickness=optics.slice_A,
                                projection="infinite", parametrization="lobato")
    aberrations = {"C10": -optics.defocus_A, "C30": optics.cs_A, "C12": optics.astig_A}
    n = tuple(max(int(round(c / optics.scan_sampling_A)), 4) for c in cell)
    scan = abtem.GridScan(start=(0.0, 0.0), end=tuple(cell), gpts=n, endpoint=False)
    detector = abtem.AnnularDetector(inner=optics.inner_mrad, outer=optics.outer_mrad)
    if optics.method == "prism":
        s = abtem.SMatrix(potential=potential, energy=optics.energy_kV * 1e3, semiangle_cutoff=optics.semiangle_mrad,
                          interpolation=optics.prism_interpolation)
        meas = s.scan(scan=scan, detectors=detector, ctf=abtem.CTF(aberration_coefficients=aberrations,
                                                                    semiangle_cutoff=optics.semiangle_mrad,
                                                                    energy=optics.energy_kV * 1e3))
    else:
        probe = abtem.Probe(energy=optics.energy_kV * 1e3, semiangle_cutoff=optics.semiangle_mrad,
                            aberrations=aberrations)
        probe.grid.match(potential)
        meas = probe.scan(potential, scan=scan, detectors=detector)
    arr = np.asarray(meas.compute(progress_bar=False).array, float)
    while arr.ndim > 2:  # frozen-phonon ensemble axis
        arr = arr.mean(axis=0)
    thickness = float(atoms.cell[2, 2])
    return CellImage(arr.T.copy(), (float(cell[0]), float(cell[1])), cols_xy, labels, structure, optics, thickness)


def cached_cell(cache_dir: str | Path, structure: str, optics: Optics = Optics(), thickness_cells: int = 1,
                vacancies: tuple[int, ...] = (), supercell=(1, 1)) -> CellImage:
    """:func:`simulate_cell`, cached in ``cache_dir`` under a hash of its arguments."""
    key = json.dumps([structure, asdict(optics), thickness_cells, list(vacancies), list(supercell)], sort_keys=True)
    name = f"{structure.replace('[', '_').replace(']', '')}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
    path = Path(cache_dir) / name
    if path.is_file():
        return CellImage.load(path)
    c = simulate_cell(structure, optics, thickness_cells, vacancies, supercell)
    c.save(path)
    return c


def _upsampled(image: np.ndarray, factor: int) -> np.ndarray:
    """Fourier (band-limited, periodic) upsampling of a periodic image by an integer factor."""
    ny, nx = image.shape
    f = np.fft.fft2(image)
    big = np.zeros((ny * factor, nx * factor), complex)
    ky = np.rint(np.fft.fftfreq(ny) * ny).astype(int) % (ny * factor)
    kx = np.rint(np.fft.fftfreq(nx) * nx).astype(int) % (nx * factor)
    big[np.ix_(ky, kx)] = f
    return np.real(np.fft.ifft2(big)) * factor * factor


@dataclass
class RenderedFrame:
    """A frame resampled from a :class:`CellImage`.

    Attributes
    ----------
    expected : ndarray (rows, cols) float32
        Fraction of probe electrons on the detector per pixel (noise-free).
    truth_xy : ndarray (n, 2) float64
        Column positions in pixels (moved by the smooth part of the scan distortion).
    truth_label : ndarray (n,) str
        Composition of each column (:attr:`CellImage.columns_label`).
    scan : ScanFrame
    distortion : ScanDistortion
    """

    expected: np.ndarray
    truth_xy: np.ndarray
    truth_label: np.ndarray
    scan: ScanFrame
    distortion: dist.ScanDistortion


def render_frame(cell: CellImage, shape: tuple[int, int], pixel_size_A: float, rng: np.random.Generator, *,
                 rotation_deg: float | None = None, distortion_scale: float = 1.0, dwell_us: float = 10.0,
                 upsample: int = 4) -> RenderedFrame:
    """Sample the periodic image of ``cell`` at the probe positions of a distorted scan.

    Parameters
    ----------
    cell : CellImage
    shape : (rows, cols)
    pixel_size_A : float
        Nominal scan step, Angstrom.
    rng : numpy.random.Generator
        Rotation and offset of the lattice, scan distortion.
    rotation_deg : float, optional
        Lattice rotation (random when omitted).
    distortion_scale : float
        Scale of the typical distortion (:meth:`beamloop.edge.sim.distortion.ScanDistortion.typical`); 0: none.
    upsample : int
        Fourier upsampling of the cell image before the cubic interpolation.
    """
    from scipy.ndimage import map_coordinates

    rows, cols = shape
    h, w = rows * pixel_size_A, cols * pixel_size_A
    scan = ScanFrame(0, (rows, cols), (h / 10, w / 10), dwell_us=dwell_us)
    frame_time = rows * cols * dwell_us * 1e-6
    d = (dist.ScanDistortion.typical(rng, frame_time, distortion_scale) if distortion_scale > 0
         else dist.ScanDistortion())
    x, y = dist.probe_positions(scan, d, rng)
    rot = math.radians(float(rng.uniform(0, 360)) if rotation_deg is None else rotation_deg)
    origin = rng.uniform(-3, 3, 2)
    c, s = math.cos(rot), math.sin(rot)
    u = c * (x - origin[0]) + s * (y - origin[1])   # lattice frame: R(-rot) (r - origin)
    v = -s * (x - origin[0]) + c * (y - origin[1])
    lx, ly = cell.cell_A
    img = _upsampled(cell.image, upsample)
    ny, nx = img.shape
    expected = map_coordinates(img, [np.mod(v / ly, 1.0) * ny, np.mod(u / lx, 1.0) * nx], order=3,
                               mode="grid-wrap")
    # columns: tile the cell over the frame (with a margin), rotate back
    rad = 0.5 * math.hypot(w, h) + 8.0
    cx0, cy0 = scan.specimen_of_fraction(0.5, 0.5)
    uc = c * (cx0 - origin[0]) + s * (cy0 - origin[1])
    vc = -s * (cx0 - origin[0]) + c * (cy0 - origin[1])
    ia = np.arange(int(math.floor((uc - rad) / lx)), int(math.ceil((uc + rad) / lx)) + 1)
    ib = np.arange(int(math.floor((vc - rad) / ly)), int(math.ceil((vc + rad) / ly)) + 1)
    ga, gb = np.meshgrid(ia, ib)
    tu = (ga.ravel()[:, None] * lx + cell.columns_xy[None, :, 0]).ravel()
    tv = (gb.ravel()[:, None] * ly + cell.columns_xy[None, :, 1]).ravel()
    labels = np.tile(cell.columns_label, ga.size)
    sx = origin[0] + c * tu - s * tv
    sy = origin[1] + s * tu + c * tv
    app = dist.apparent_positions(scan, d, np.stack([sx, sy], axis=1))
    inside = (app[:, 0] >= -0.5) & (app[:, 0] <= cols - 0.5) & (app[:, 1] >= -0.5) & (app[:, 1] <= rows - 0.5)
    return RenderedFrame(np.maximum(expected, 0.0).astype(np.float32), app[inside], labels[inside], scan, d)
