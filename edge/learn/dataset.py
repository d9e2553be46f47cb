"""Training data for the column-finding U-Net, from the project's simulator (numpy and numba; no torch).

A data set is a stack of noise-free tiles: the expected HAADF signal (fraction of probe electrons reaching
the detector) of a random specimen under a random scan, with the true column positions in pixels (moved
by the smooth part of the scan distortion, as :class:`beamloop.edge.sim.frames.FrameSimulator` reports them).
Everything that is cheap is drawn anew at every training step (:class:`Augmenter`): the dose and its
Poisson noise, per-line gain and offset (scan-line streaks), read noise, 8-bit contrast stretching with
clipping, flips, and which columns a network can be asked to see at that dose.

What is drawn per tile (:func:`sample_tile_config`): structure (:data:`TRAIN_STRUCTURES`; MoS2 with its
Mo / S2 / S1 classes, everything else as generic columns), pixel size 0.05-0.3 Angstrom, lattice rotation and
offset, source-size blur 0.15-0.45 Angstrom, drift / wobble / line jitter at 0-2 times their typical size,
non-square pixels (+-4 %), vacancies, partial columns and substitutions, grain boundaries, holes, a smooth
background (support film, contamination). A second simulator supplies a share of the tiles
(:func:`multislice_tile`: abTEM cells of :mod:`beamloop.edge.learn.multislice_set`), and per sample the
augmenter can draw acquisition models (:func:`acquisition_model`: probe tails, carbon support, particle
envelope, thickness gradient; :func:`detector_model`: gain, offset, read noise, 16-bit output, saturation,
line artefacts).

Targets (:func:`draw_targets`): a heat map with a Gaussian of :data:`beamloop.edge.stages.unet.HEAT_SIGMA_PX` at each
visible column, a class index map near each column (:data:`beamloop.edge.stages.unet.SEG_CLASSES`), and a weight map
that is zero around columns too faint to call either way at the drawn dose (:func:`column_snr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
from scipy.ndimage import gaussian_filter

from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.sim import distortion as dist
from beamloop.edge.sim import lattice, profiles, structures
from beamloop.edge.sim.render import ColumnRenderer
from beamloop.edge.stages.unet import HEAT_SIGMA_PX, SEG_CLASSES, normalise_frame

TRAIN_STRUCTURES = {
    "MoS2": 0.34, "WS2": 0.07, "MoSe2": 0.06, "MoTe2": 0.04, "graphene": 0.05, "hBN": 0.03,
    "SrTiO3[001]": 0.11, "Si[110]": 0.12, "Au[110]": 0.06, "Cu[110]": 0.06, "Al[110]": 0.06,
}
"""Structures in the training set and their sampling weights (sum 1). MoS2 weighs most: the service's
main specimen, and the only one with classes."""

HELD_OUT_STRUCTURES = ("WSe2", "Pt[110]")
"""Structures never seen in training, for the held-out evaluation."""

SNR_VISIBLE = 1.0
"""A column whose matched-filter signal-to-noise ratio (:func:`column_snr`) reaches this is a target."""

SNR_IGNORE = 0.4
"""Between this and :data:`SNR_VISIBLE` a column is neither target nor background (weight 0)."""

CLASS_OF_MOS2 = {0: 0, 1: 1, 2: 2}
"""MoS2 specimen classes (Mo, S2, S1) -> :data:`SEG_CLASSES` indices; vacancy sites are not columns."""

GENERIC_CLASS = SEG_CLASSES.index("column")


@dataclass(frozen=True)
class TileConfig:
    """Random choices for one training tile (see the module docstring)."""

    structure: str
    pixel_size_A: float
    rotation_deg: float
    blur_sigma_A: float
    distortion_scale: float
    thickness: int
    vacancy: float
    partial: float
    substitution: float
    bicrystal: bool
    hole: bool
    background_fraction: float
    smooth_background: float
    seed: int


@dataclass
class TileSet:
    """Noise-free tiles with their columns.

    Attributes
    ----------
    expected : ndarray, shape (n, rows, cols), float32
        Fraction of probe electrons reaching the detector, per pixel.
    pixel_size_A : ndarray, shape (n,), float32
    columns : ndarray, shape (m, 6), float32
        ``x_px, y_px, class (SEG_CLASSES index, -1: vacancy site), amplitude (peak fraction), level (expected
        signal at the column), column sigma in px`` for all tiles, rows ``offsets[k]:offsets[k+1]`` for tile k.
    offsets : ndarray, shape (n + 1,), int64
    structures : ndarray, shape (n,), str
    """

    expected: np.ndarray
    pixel_size_A: np.ndarray
    columns: np.ndarray
    offsets: np.ndarray
    structures: np.ndarray

    def __len__(self) -> int:
        return len(self.expected)

    def tile_columns(self, k: int) -> np.ndarray:
        """Column rows of tile ``k`` (view), shape (m_k, 6)."""
        return self.columns[self.offsets[k]:self.offsets[k + 1]]

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, expected=self.expected, pixel_size_A=self.pixel_size_A, columns=self.columns,
                 offsets=self.offsets, structures=self.structures)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TileSet:
        """Read a file written by :meth:`save`. Raises ``OSError``/``KeyError`` for a missing or foreign file."""
        with np.load(Path(path), allow_pickle=False) as d:
            return cls(d["expected"], d["pixel_size_A"], d["columns"], d["offsets"], d["structures"])


def sample_tile_config(rng: np.random.Generator, structures_weights: dict[str, float] | None = None) -> TileConfig:
    """Draw the random choices of one tile (ranges in the module docstring)."""
    w = structures_weights or TRAIN_STRUCTURES
    names = list(w)
    p = np.asarray([w[n] for n in names], float)
    name = names[int(rng.choice(len(names), p=p / p.sum()))]
    if name == "MoS2" and rng.random() < 0.6:
        px = float(rng.uniform(0.1, 0.2))  # the service's usual range, more often
    else:
        px = float(math.exp(rng.uniform(math.log(0.05), math.log(0.3))))
    crystal = name in ("SrTiO3[001]", "Si[110]") or name.endswith("[110]")
    return TileConfig(
        structure=name,
        pixel_size_A=px,
        rotation_deg=float(rng.uniform(0, 360)),
        blur_sigma_A=float(rng.uniform(0.15, 0.45)),
        distortion_scale=float(rng.choice([0.0, rng.uniform(0, 2)], p=[0.15, 0.85])),
        thickness=int(rng.integers(3, 31)) if crystal else 1,
        vacancy=float(rng.uniform(0, 0.03)),
        partial=float(rng.uniform(0, 0.08)) if crystal else 0.0,
        substitution=float(rng.uniform(0, 0.05)) if rng.random() < 0.3 else 0.0,
        bicrystal=bool(rng.random() < (0.15 if name != "MoS2" else 0.03)),
        hole=bool(rng.random() < 0.08),
        background_fraction=float(math.exp(rng.uniform(math.log(1e-6), math.log(1e-3)))),
        smooth_background=float(rng.uniform(0, 0.6)) if rng.random() < 0.4 else 0.0,
        seed=int(rng.integers(2**63 - 1)),
    )


_DOPANT = {"W": "Mo", "Mo": "W", "S": "Se", "Se": "S", "Te": "Se", "C": "N", "B": "C", "N": "O", "Sr": "Ba",
           "Ti": "Sr", "Si": "As", "Au": "Pt", "Cu": "Au", "Al": "Cu", "Pt": "Au"}


def build_specimen(cfg: TileConfig, extent_A: tuple[float, float, float, float], rng: np.random.Generator
                   ) -> lattice.Specimen:
    """The specimen of one tile: structure, grains, defects and holes as ``cfg`` says."""
    build = structures.STRUCTURES[cfg.structure]
    crystal = cfg.thickness > 1
    kw = {"thickness": cfg.thickness} if crystal else {}
    probe = build((-1.0, 1.0, -1.0, 1.0), **kw)
    host = probe.elements[0]
    dopant = _DOPANT.get(host) if cfg.substitution > 0 and cfg.structure != "MoS2" else None
    if dopant is not None:
        kw["dopants"] = (dopant,)
    if cfg.bicrystal:
        mis = float(rng.uniform(8, 52)) * (1 if rng.random() < 0.5 else -1)
        spec = structures.bicrystal(build, extent_A, rng, misorientation_deg=mis, **kw)
    else:
        spec = build(extent_A, rotation_deg=cfg.rotation_deg, origin_A=tuple(rng.uniform(-3, 3, 2)), **kw)
    if spec.material == "MoS2":
        lattice.add_point_defects(spec, rng, s_mono=float(rng.uniform(0, 0.08)), s_di=float(rng.uniform(0, 0.03)),
                                  mo_vacancy=float(rng.uniform(0, 0.02)))
    else:
        structures.add_vacancies(spec, rng, cfg.vacancy, partial=cfg.partial)
        if dopant is not None:
            structures.substitute(spec, rng, host, dopant, cfg.substitution)
    if cfg.hole:
        x0, x1, y0, y1 = extent_A
        c = (float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)))
        spec = structures.remove_region(spec, c, float(rng.uniform(0.1, 0.35)) * (x1 - x0))
    return spec


def render_tile(cfg: TileConfig, shape: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Render one noise-free tile.

    Returns
    -------
    expected : ndarray, shape ``shape``, float32
        Fraction of probe electrons reaching the detector (columns, flat and smooth background).
    columns : ndarray, shape (m, 6), float32
        See :class:`TileSet` (``columns``). Vacancy sites keep class -1.
    """
    rng = np.random.default_rng(cfg.seed)
    rows, cols = shape
    h, w = rows * cfg.pixel_size_A, cols * cfg.pixel_size_A
    margin = 8.0
    extent = (-w / 2 - margin, w / 2 + margin, -h / 2 - margin, h / 2 + margin)
    spec = build_specimen(cfg, extent, rng)
    table = profiles.profile_table(spec.elements, round(cfg.blur_sigma_A, 2))
    acq = np.random.default_rng(cfg.seed + 1)  # acquisition choices added later: their own stream
    aniso = float(acq.uniform(-0.04, 0.04)) if acq.random() < 0.5 else 0.0  # scan calibration: non-square pixels
    scan = ScanFrame(0, (rows, cols), (h * (1 + aniso) / 10, w / 10), dwell_us=float(rng.uniform(2, 20)))
    frame_time = rows * cols * scan.dwell_us * 1e-6
    d = (dist.ScanDistortion.typical(rng, frame_time, cfg.distortion_scale) if cfg.distortion_scale > 0
         else dist.ScanDistortion())
    x, y = dist.probe_positions(scan, d, rng)
    expected = ColumnRenderer(spec, table).expected(x, y)
    peak = table.table[:, 0]
    amp = spec.counts.astype(float) @ peak
    if cfg.smooth_background > 0:
        field = gaussian_filter(rng.normal(size=shape), rng.uniform(4, 24))
        field = (field - field.min()) / max(float(np.ptp(field)), 1e-12)
        occupied = amp[amp > 0]
        expected += cfg.smooth_background * (float(np.median(occupied)) if len(occupied) else 1e-3) * field
    expected += cfg.background_fraction
    app = dist.apparent_positions(scan, d, spec.xy)
    inside = (app[:, 0] >= -0.5) & (app[:, 0] <= cols - 0.5) & (app[:, 1] >= -0.5) & (app[:, 1] <= rows - 0.5)
    app, amp_in = app[inside], amp[inside]
    cls_spec = spec.classes()[inside]
    if spec.material == "MoS2":
        cls = np.array([CLASS_OF_MOS2.get(int(c), -1) for c in cls_spec], np.float32)
    else:
        cls = np.where(cls_spec == 0, GENERIC_CLASS, -1).astype(np.float32)
    ii = np.clip(np.rint(app[:, 1]).astype(int), 0, rows - 1)
    jj = np.clip(np.rint(app[:, 0]).astype(int), 0, cols - 1)
    level = expected[ii, jj]
    sigma_px = _profile_sigma_A(table) / cfg.pixel_size_A
    out = np.stack([app[:, 0], app[:, 1], cls, amp_in, level, np.full(len(app), sigma_px)], axis=1)
    return expected.astype(np.float32), out.astype(np.float32)


def _profile_sigma_A(table: profiles.ProfileTable) -> float:
    """Gaussian-equivalent sigma (half width at half maximum / 1.1774) of the table's brightest profile."""
    row = table.table[int(np.argmax(table.table[:, 0]))]
    k = int(np.argmax(row < 0.5 * row[0]))
    return max(k, 1) * table.dr / 1.1774


def multislice_tile(cell, shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """One noise-free tile resampled from an abTEM cell image (:func:`beamloop.edge.sim.multislice.render_frame`)
    at a random pixel size (0.05-0.3 Angstrom, log-uniform), rotation and scan distortion.

    Returns ``(expected, columns, pixel_size_A)`` in the layout of :func:`render_tile`: every column is a
    generic ``column``; its amplitude is the tile's value at the column above the tile's 5th percentile, its
    sigma the Gaussian-equivalent width of the cell image's brightest peak.
    """
    from beamloop.edge.sim.multislice import render_frame

    px = float(math.exp(rng.uniform(math.log(0.05), math.log(0.3))))
    rf = render_frame(cell, shape, px, rng, distortion_scale=float(rng.uniform(0, 2)))
    exp = rf.expected
    rows, cols = shape
    ii = np.clip(np.rint(rf.truth_xy[:, 1]).astype(int), 0, rows - 1)
    jj = np.clip(np.rint(rf.truth_xy[:, 0]).astype(int), 0, cols - 1)
    level = exp[ii, jj].astype(np.float64)
    amp = np.maximum(level - float(np.percentile(exp, 5)), 0.0)
    sigma_px = _cell_sigma_A(cell) / px
    out = np.stack([rf.truth_xy[:, 0], rf.truth_xy[:, 1], np.full(len(ii), GENERIC_CLASS), amp, level,
                    np.full(len(ii), sigma_px)], axis=1)
    return exp.astype(np.float32), out.astype(np.float32), px


def _cell_sigma_A(cell) -> float:
    """Gaussian-equivalent sigma (half width at half maximum / 1.1774) of a cell image's brightest peak, Angstrom,
    measured on the Fourier-upsampled image along x."""
    from beamloop.edge.sim.multislice import _upsampled

    img = _upsampled(cell.image, 8)
    i, j = np.unravel_index(int(np.argmax(img)), img.shape)
    row = np.roll(img[i], -j)
    base = float(np.percentile(img, 5))
    half = base + 0.5 * (float(row[0]) - base)
    k = int(np.argmax(row < half))
    return max(k, 1) * (cell.cell_A[0] / img.shape[1]) / 1.1774


def build_tileset(n: int, shape: tuple[int, int] = (128, 128), seed: int = 0,
                  structures_weights: dict[str, float] | None = None, progress: bool = True,
                  cells: list | None = None, multislice_fraction: float = 0.0) -> TileSet:
    """Render ``n`` tiles (see :func:`sample_tile_config` and :func:`render_tile`); a fraction
    ``multislice_fraction`` of them from the abTEM cell images ``cells`` (:func:`multislice_tile`; their
    structure is recorded as ``"<name>/abtem"``).

    Raises ``ValueError`` for ``n < 1``, or a multislice fraction without cells.
    """
    if multislice_fraction > 0 and not cells:
        raise ValueError("multislice_fraction > 0 needs abTEM cell images (cells)")
    if n < 1:
        raise ValueError(f"need at least one tile, got {n}")
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    exp = np.empty((n, *shape), np.float32)
    px = np.empty(n, np.float32)
    cols, names = [], []
    n_ms = int(round(multislice_fraction * n)) if cells else 0
    ms_rng = np.random.default_rng(seed + 7_000_000)
    for k in tqdm(range(n), desc="simulating tiles", disable=not progress, unit="tile"):
        if k < n - n_ms:
            cfg = sample_tile_config(rng, structures_weights)
            exp[k], c = render_tile(cfg, shape)
            px[k] = cfg.pixel_size_A
            names.append(cfg.structure)
        else:
            cell = cells[int(ms_rng.integers(len(cells)))]
            exp[k], c, px[k] = multislice_tile(cell, shape, ms_rng)
            names.append(f"{cell.structure}/abtem")
        cols.append(c)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in cols])]).astype(np.int64)
    return TileSet(exp, px, np.concatenate(cols), offsets, np.asarray(names))


def column_snr(columns: np.ndarray, electrons_per_pixel: float) -> np.ndarray:
    """Matched-filter signal-to-noise ratio of each column at a dose, shape (m,).

    For a Gaussian peak of amplitude ``A`` (counts) and sigma ``s`` (px) on white Poisson noise of variance
    ``L`` (the mean counts there), the optimal linear filter reaches ``A s sqrt(pi) / sqrt(L)``; in fractions
    of the beam, ``A s sqrt(pi N / L)`` with ``N`` electrons per pixel.
    """
    amp, level, sig = columns[:, 3], columns[:, 4], columns[:, 5]
    return amp * sig * np.sqrt(math.pi * electrons_per_pixel / np.maximum(level, 1e-12))


@numba.njit(cache=True, nogil=True)
def _draw(xs, ys, role, cls, sigma, heat, weight, cmap):
    """Heat map (max of Gaussians at target columns, role 1), zero weight near ignored ones (role 2), class
    index near targets; role 0 (vacancy sites, invisible columns) stays background."""
    rows, cols = heat.shape
    r = int(math.ceil(3.0 * sigma))
    inv = 0.5 / (sigma * sigma)
    core2 = (1.2 * sigma) ** 2
    for k in range(xs.shape[0]):
        x, y = xs[k], ys[k]
        i0, j0 = int(round(y)), int(round(x))
        for i in range(max(i0 - r, 0), min(i0 + r + 1, rows)):
            for j in range(max(j0 - r, 0), min(j0 + r + 1, cols)):
                d2 = (j - x) ** 2 + (i - y) ** 2
                if role[k] == 1:
                    g = math.exp(-d2 * inv)
                    if g > heat[i, j]:
                        heat[i, j] = g
                    if d2 <= core2:
                        cmap[i, j] = cls[k]
                elif role[k] == 2 and d2 <= 4.0 * sigma * sigma:
                    weight[i, j] = 0.0


def draw_targets(columns: np.ndarray, snr: np.ndarray, shape: tuple[int, int], flip_x: bool = False,
                 flip_y: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets of one tile.

    Parameters
    ----------
    columns : ndarray (m, 6)
        See :class:`TileSet`; class -1 rows (vacancy sites) are never targets.
    snr : ndarray (m,)
        :func:`column_snr` at the dose drawn.
    shape : (rows, cols)
    flip_x, flip_y : bool
        The image was mirrored left-right / top-bottom.

    Returns
    -------
    heat : ndarray (rows, cols) float32, in [0, 1]
    weight : ndarray (rows, cols) float32, 0 or 1
    classes : ndarray (rows, cols) int64, SEG_CLASSES index within 1.2 heat sigmas of a target, else -1
    """
    rows, cols = shape
    xs = columns[:, 0].astype(np.float64)
    ys = columns[:, 1].astype(np.float64)
    if flip_x:
        xs = cols - 1 - xs
    if flip_y:
        ys = rows - 1 - ys
    real = columns[:, 2] >= 0
    role = np.where(real & (snr >= SNR_VISIBLE), 1, np.where(real & (snr >= SNR_IGNORE), 2, 0)).astype(np.int64)
    heat = np.zeros(shape, np.float32)
    weight = np.ones(shape, np.float32)
    cmap = np.full(shape, -1, np.int64)
    _draw(xs, ys, role, columns[:, 2].astype(np.int64), float(HEAT_SIGMA_PX), heat, weight, cmap)
    return heat, weight, cmap


def acquisition_model(expected: np.ndarray, columns: np.ndarray, pixel_size_A: float, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Random probe tails and specimen backgrounds on a noise-free tile (fractions of the beam).

    Each with its own probability: probe tails (a fraction 5-35 % of the intensity spread by a Gaussian of
    0.4-1.5 Angstrom, as aberrations and the source spread a real probe's intensity: e.g. Kirkland, *Advanced
    Computing in Electron Microscopy*, ch. 3); amorphous carbon support (a 0.3-1 Angstrom correlated random
    field, 5-60 % of the median column amplitude); a nanoparticle envelope (an elliptical particle whose
    projected thickness ``sqrt(1 - r^2)`` scales the columns and adds 1-12 median column amplitudes of diffuse
    signal); a thickness gradient (columns and background scaled by a linear ramp of -50..+50 % across the
    tile). Column amplitudes and levels are updated so that :func:`column_snr` stays right.

    Parameters
    ----------
    expected : ndarray (rows, cols) float64
    columns : ndarray (m, 6)
        :class:`TileSet` rows of the tile.
    pixel_size_A : float
    rng : numpy.random.Generator

    Returns
    -------
    expected, columns : new arrays (the inputs are not modified)
    """
    rows, cols_n = expected.shape
    out = expected.copy()
    c = columns.copy()
    amp = c[:, 3].astype(np.float64)
    occupied = amp[amp > 0]
    a_med = float(np.median(occupied)) if len(occupied) else float(np.median(out))
    ii = np.clip(np.rint(c[:, 1]).astype(int), 0, rows - 1)
    jj = np.clip(np.rint(c[:, 0]).astype(int), 0, cols_n - 1)
    if rng.random() < 0.35:  # probe tails
        f = float(rng.uniform(0.05, 0.35))
        wide = gaussian_filter(out, float(rng.uniform(0.4, 1.5)) / pixel_size_A, mode="reflect")
        out = (1 - f) * out + f * wide
        c[:, 3] *= 1 - f
    scale = np.ones_like(out)
    if rng.random() < 0.2:  # thickness gradient
        g = float(rng.uniform(-0.5, 0.5))
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:rows, 0:cols_n]
        ramp = ((xx - cols_n / 2) * math.cos(ang) + (yy - rows / 2) * math.sin(ang)) / max(rows, cols_n)
        scale *= np.maximum(1.0 + 2.0 * g * ramp, 0.1)
    if rng.random() < 0.2:  # nanoparticle envelope
        yy, xx = np.mgrid[0:rows, 0:cols_n]
        cy, cx = rng.uniform(-0.3, 1.3) * rows, rng.uniform(-0.3, 1.3) * cols_n
        ra, rb = rng.uniform(0.4, 1.5) * rows, rng.uniform(0.4, 1.5) * cols_n
        th = np.sqrt(np.clip(1 - ((yy - cy) / ra) ** 2 - ((xx - cx) / rb) ** 2, 0, 1))
        th = gaussian_filter(th, 2.0)
        scale *= 0.15 + 0.85 * th
        out += float(rng.uniform(1, 12)) * a_med * th
    out = out * scale if not np.all(scale == 1) else out
    c[:, 3] *= scale[ii, jj]
    if rng.random() < 0.3:  # amorphous carbon support
        field = gaussian_filter(rng.normal(size=out.shape), float(rng.uniform(0.3, 1.0)) / pixel_size_A)
        field = (field - field.min()) / max(float(np.ptp(field)), 1e-12)
        out += float(rng.uniform(0.05, 0.6)) * a_med * field
    c[:, 4] = out[ii, jj]
    return out, c


def detector_model(img: np.ndarray, lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random detector and scan artefacts on a Poisson-counted tile (counts, float64): gain (0.3-30 ADU per
    electron), offset (up to 30,000 ADU), Gaussian read noise, 16-bit integer output, saturation of the
    brightest 0.1-2 % of pixels, and line artefacts (a repeated or dropped scan line, a line with a spike).
    Each with its own probability; returns a new array."""
    out = img.copy()
    rows = out.shape[0]
    sd = math.sqrt(max(float(lam.mean()), 1e-9))
    if rng.random() < 0.4:
        out *= float(math.exp(rng.uniform(math.log(0.3), math.log(30.0))))
        sd *= 1.0
    if rng.random() < 0.3:
        out += rng.normal(0, rng.uniform(0.1, 1.0) * sd * max(float(out.std()) / max(float(img.std()), 1e-9), 1e-3),
                          out.shape)
    if rng.random() < 0.4:
        out += float(rng.uniform(0, 30000))
    if rng.random() < 0.3:
        out = np.clip(np.rint(out), 0, 65535)
    if rng.random() < 0.15:  # saturation
        out = np.minimum(out, np.percentile(out, 100 - rng.uniform(0.1, 2.0)))
    if rng.random() < 0.15:  # line artefacts
        r = int(rng.integers(1, rows))
        if rng.random() < 0.5:
            out[r] = out[r - 1]
        else:
            out[r] += float(rng.uniform(1, 5)) * float(out.std())
    return out


class Augmenter:
    """Makes training batches from a :class:`TileSet`: dose, noise, detector and scan artefacts, flips.

    Parameters
    ----------
    tiles : TileSet
    rng : numpy.random.Generator
    dose_range : (lo, hi)
        Dose drawn log-uniformly, e-/Angstrom^2 (1e3-1e6), unless ``dose_sampler`` is given.
    dose_sampler : callable, optional
        ``dose_sampler(rng) -> dose`` in e-/Angstrom^2.
    acquisition : bool
        Also draw probe tails, backgrounds (:func:`acquisition_model`) and detector models
        (:func:`detector_model`).
    """

    def __init__(self, tiles: TileSet, rng: np.random.Generator, dose_range: tuple[float, float] = (1e3, 1e6),
                 dose_sampler=None, acquisition: bool = False):
        self.acquisition = bool(acquisition)
        self.tiles = tiles
        self.rng = rng
        self.log_dose = (math.log(dose_range[0]), math.log(dose_range[1]))
        self.dose_sampler = dose_sampler

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One augmented tile: ``(image, heat, weight, classes)``, image normalised float32 (rows, cols)."""
        rng = self.rng
        t = self.tiles
        dose = self.dose_sampler(rng) if self.dose_sampler else math.exp(rng.uniform(*self.log_dose))
        ne = dose * float(t.pixel_size_A[k]) ** 2
        cols = t.tile_columns(k)
        expected = t.expected[k].astype(np.float64)
        if self.acquisition:
            expected, cols = acquisition_model(expected, cols, float(t.pixel_size_A[k]), rng)
        lam = expected * ne
        img = rng.poisson(lam).astype(np.float64)
        rows = img.shape[0]
        if rng.random() < 0.4:  # per-line gain and offset: scan-line streaks
            img *= 1.0 + rng.normal(0, rng.uniform(0, 0.08), (rows, 1))
            img += rng.normal(0, rng.uniform(0, 0.3), (rows, 1)) * math.sqrt(max(lam.mean(), 1e-9))
        if rng.random() < 0.3:  # detector read noise
            img += rng.normal(0, rng.uniform(0, 0.5) * math.sqrt(max(lam.mean(), 1e-9)), img.shape)
        if self.acquisition:
            img = detector_model(img, lam, rng)
        if rng.random() < 0.25:  # contrast-stretched 8-bit export with clipping
            lo, hi = np.percentile(img, [rng.uniform(0, 3), rng.uniform(97, 100)])
            img = np.clip(np.rint((img - lo) / max(hi - lo, 1e-9) * 255), 0, 255)
        fx, fy = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        if fx:
            img = img[:, ::-1]
        if fy:
            img = img[::-1, :]
        heat, weight, cmap = draw_targets(cols, column_snr(cols, ne), img.shape, fx, fy)
        return normalise_frame(np.ascontiguousarray(img, np.float32)), heat, weight, cmap

    def batch(self, idx) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Stacked :meth:`sample` of tiles ``idx``: shapes (b, 1, r, c) x3 and (b, r, c) for classes."""
        parts = [self.sample(int(k)) for k in idx]
        img, heat, weight, cmap = (np.stack(p) for p in zip(*parts))
        return img[:, None], heat[:, None], weight[:, None], cmap
