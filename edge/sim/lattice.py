"""Specimens as projected atomic columns: lattices, point defects and ground-truth classes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MOS2_A = 3.16
"""In-plane lattice constant of 2H-MoS2, Angstrom (Wakabayashi, Smith & Nicklow, Phys. Rev. B 12, 659 (1975))."""

MOS2_CLASSES = ("Mo", "S2", "S1", "vacancy")
"""Column classes of a MoS2 monolayer viewed along [001]: a Mo column, two S atoms stacked, one S atom
(mono-vacancy), and an empty lattice site (S di-vacancy or Mo vacancy)."""


@dataclass
class Specimen:
    """A specimen as projected atomic columns, in specimen coordinates (Angstrom).

    Attributes
    ----------
    xy : ndarray, shape (n, 2), float64
        Column positions (x, y), Angstrom.
    elements : tuple of str
        Element symbols, one per column of ``counts``.
    counts : ndarray, shape (n, n_elements), int16
        Atoms of each element in each column; changes when atoms are ejected.
    site : ndarray, shape (n,), int8
        Sublattice of each column (index into ``sublattices``).
    sublattices : tuple of str
        Sublattice names, e.g. ``("Mo", "S2")``.
    material : str
        ``"MoS2"`` or another name; decides how :meth:`classes` labels columns.
    nn_distance_A : float
        Nearest-neighbour column distance of the perfect lattice, Angstrom.
    """

    xy: np.ndarray
    elements: tuple[str, ...]
    counts: np.ndarray
    site: np.ndarray
    sublattices: tuple[str, ...]
    material: str
    nn_distance_A: float
    class_names: tuple[str, ...] = field(default=MOS2_CLASSES)

    def __len__(self) -> int:
        return len(self.xy)

    def classes(self) -> np.ndarray:
        """Class index of every column (into :attr:`class_names`), from the current atom counts.

        MoS2: one Mo -> ``Mo``; two S -> ``S2``; one S -> ``S1``; no atom -> ``vacancy``. Other
        materials: ``("column", "vacancy")``.
        """
        total = self.counts.sum(axis=1)
        if self.material != "MoS2":
            return np.where(total > 0, 0, 1).astype(np.int8)
        mo = self.counts[:, self.elements.index("Mo")]
        s = self.counts[:, self.elements.index("S")]
        cls = np.full(len(self), 3, np.int8)
        cls[s == 1] = 2
        cls[s >= 2] = 1
        cls[mo >= 1] = 0
        return cls


def bravais_points(a1, a2, basis: np.ndarray, extent: tuple[float, float, float, float], rotation_deg: float,
                   origin: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Points of a 2-D lattice with cell vectors ``a1``, ``a2`` and a basis, inside a rectangle.

    Parameters
    ----------
    a1, a2 : array-like, shape (2,)
        Cell vectors before rotation, Angstrom.
    basis : ndarray, shape (k, 2)
        Basis positions as fractions of ``(a1, a2)``.
    extent : (x0, x1, y0, y1)
        Rectangle to fill, Angstrom.
    rotation_deg : float
        Rotation of the lattice about the rectangle's centre, degrees counter-clockwise.
    origin : (x, y)
        Shift of the lattice origin from the rectangle's centre, Angstrom.

    Returns
    -------
    xy : ndarray, shape (n, 2), float64
        Positions inside the rectangle (edges included), Angstrom; basis site by basis site.
    site : ndarray, shape (n,), int8
        Basis index of each point.

    Raises
    ------
    ValueError
        Degenerate (parallel or zero) cell vectors.
    """
    a1 = np.asarray(a1, float)
    a2 = np.asarray(a2, float)
    area = abs(a1[0] * a2[1] - a1[1] * a2[0])
    if not area > 0:
        raise ValueError(f"cell vectors {a1}, {a2} are degenerate")
    x0, x1, y0, y1 = extent
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    rot = np.array([[c, -s], [s, c]])
    longest = max(math.hypot(*a1), math.hypot(*a2))
    radius = math.hypot(x1 - x0, y1 - y0) / 2 + 2 * longest
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    n = int(radius / (area / longest)) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    pts, sites = [], []
    # lattice centred near the middle of the extent, shifted by origin
    base = centre + np.asarray(origin, float)
    for k, b in enumerate(basis):
        frac = np.stack([i.ravel() + b[0], j.ravel() + b[1]], axis=1)
        p = frac @ np.stack([a1, a2]) @ rot.T + base
        pts.append(p)
        sites.append(np.full(len(p), k, np.int8))
    pts = np.concatenate(pts)
    sites = np.concatenate(sites)
    keep = (pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1)
    return pts[keep], sites[keep]


def _hex_points(a: float, basis: np.ndarray, extent: tuple[float, float, float, float], rotation_deg: float,
                origin: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Points of a hexagonal lattice (constant ``a``) with ``basis`` (fractional), inside ``extent``."""
    return bravais_points((a, 0.0), (a / 2, a * math.sqrt(3) / 2), basis, extent, rotation_deg, origin)


def mos2(extent_A: tuple[float, float, float, float], *, rotation_deg: float = 0.0,
         origin_A: tuple[float, float] = (0.0, 0.0), a: float = MOS2_A) -> Specimen:
    """A perfect 2H-MoS2 monolayer viewed along [001].

    Mo columns sit on one sublattice of the projected honeycomb and S2 columns (two S atoms, one above
    and one below the Mo plane) on the other, at the projected Mo-S distance ``a / sqrt(3)``
    (1.82 Angstrom for ``a`` = 3.16 Angstrom).

    Parameters
    ----------
    extent_A : (x0, x1, y0, y1)
        Region to fill with columns, specimen coordinates in Angstrom.
    rotation_deg : float
        In-plane rotation of the lattice, degrees counter-clockwise.
    origin_A : (x, y)
        Shift of the lattice from the region's centre, Angstrom.
    a : float
        Lattice constant, Angstrom.

    Returns
    -------
    Specimen
        ``elements = ("Mo", "S")``, ``sublattices = ("Mo", "S2")``.
    """
    basis = np.array([[0.0, 0.0], [1 / 3, 1 / 3]])
    xy, site = _hex_points(a, basis, extent_A, rotation_deg, origin_A)
    counts = np.zeros((len(xy), 2), np.int16)
    counts[site == 0, 0] = 1
    counts[site == 1, 1] = 2
    return Specimen(xy, ("Mo", "S"), counts, site, ("Mo", "S2"), "MoS2", a / math.sqrt(3))


def add_point_defects(specimen: Specimen, rng: np.random.Generator, *, s_mono: float = 0.03,
                      s_di: float = 0.01, mo_vacancy: float = 0.005) -> Specimen:
    """Introduce MoS2 point defects in place and return the specimen.

    Parameters
    ----------
    s_mono, s_di : float
        Fractions of S2 columns that lose one S atom (mono-vacancy, the column becomes S1) or both
        (di-vacancy, the site becomes empty).
    mo_vacancy : float
        Fraction of Mo columns removed.

    Raises
    ------
    ValueError
        Fractions outside [0, 1] or summing to more than 1 for the S sublattice, or a non-MoS2 specimen.
    """
    if specimen.material != "MoS2":
        raise ValueError("add_point_defects() models MoS2 defects; the specimen is " + specimen.material)
    if not (0 <= s_mono and 0 <= s_di and s_mono + s_di <= 1 and 0 <= mo_vacancy <= 1):
        raise ValueError(f"invalid defect fractions s_mono={s_mono}, s_di={s_di}, mo_vacancy={mo_vacancy}")
    s_idx = np.flatnonzero(specimen.site == 1)
    u = rng.random(len(s_idx))
    specimen.counts[s_idx[u < s_mono], 1] = 1
    specimen.counts[s_idx[(u >= s_mono) & (u < s_mono + s_di)], 1] = 0
    mo_idx = np.flatnonzero(specimen.site == 0)
    specimen.counts[mo_idx[rng.random(len(mo_idx)) < mo_vacancy], 0] = 0
    return specimen
