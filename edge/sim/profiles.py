"""Single-atom HAADF profiles for the linear incoherent imaging model.

The simulator renders a frame as the sum over atoms of that element's radial single-atom HAADF
response (an incoherent, linear model of image formation; e.g. Kirkland, *Advanced Computing in Electron
Microscopy*, 2nd ed., ch. 5). The Mo and S responses were computed with abTEM multislice
(``data/haadf_single_atom_profiles.npz``, see ``data/README.md``); against a PRISM simulation of MoS2 the
linear model reached a Pearson correlation of 0.995 (../shared/notes/atom-finding.md).

Profiles are tabulated on a regular radius grid, optionally convolved with a Gaussian source-size
blur, and returned as a :class:`ProfileTable` that the numba renderer interpolates.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
from scipy.ndimage import gaussian_filter

Z = {"H": 1, "B": 5, "C": 6, "N": 7, "O": 8, "Si": 14, "S": 16, "Ti": 22, "Sr": 38, "Mo": 42, "Se": 34,
     "W": 74, "Te": 52, "Au": 79, "Pt": 78, "Cu": 29, "Al": 13, "Ga": 31, "As": 33, "Ba": 56}
"""Atomic numbers of the elements the simulator knows."""

Z_EXPONENT = 1.78
"""Effective exponent of the HAADF signal in Z, from the abTEM Mo/S peak ratio 5.6 = (42/16)^1.78."""


@dataclass(frozen=True)
class ProfileTable:
    """Radial HAADF responses of several elements on one radius grid.

    Attributes
    ----------
    elements : tuple of str
        Element symbols, one per row of ``table``.
    table : ndarray, shape (n_elements, n_r), float64
        Fraction of incident probe electrons that reach the HAADF detector, per atom, for a probe at
        radius ``r = k * dr`` from the atom; the last column is zero.
    dr : float
        Radius step, Angstrom.
    blur_sigma_A : float
        Gaussian source-size blur already folded into the table, Angstrom.
    """

    elements: tuple[str, ...]
    table: np.ndarray
    dr: float
    blur_sigma_A: float

    @property
    def r_max(self) -> float:
        """Radius beyond which the response is taken as zero, Angstrom."""
        return (self.table.shape[1] - 1) * self.dr

    def index(self, element: str) -> int:
        """Row of ``element`` in :attr:`table`; raises ``KeyError`` when absent."""
        try:
            return self.elements.index(element)
        except ValueError:
            raise KeyError(f"element {element!r} not in profile table {self.elements}") from None

    def value(self, element: str, r_A) -> np.ndarray:
        """Response of one atom of ``element`` at radii ``r_A`` (Angstrom), linear interpolation."""
        r = np.asarray(r_A, dtype=float)
        grid = np.arange(self.table.shape[1]) * self.dr
        return np.interp(r, grid, self.table[self.index(element)], right=0.0)


@lru_cache(maxsize=1)
def _abtem_profiles() -> tuple[np.ndarray, dict]:
    with resources.files("beamloop.edge.sim").joinpath("data/haadf_single_atom_profiles.npz").open("rb") as f:
        d = np.load(f)
        return np.asarray(d["r"], float), {"Mo": np.asarray(d["Mo"], float), "S": np.asarray(d["S"], float)}


def raw_profile(element: str) -> tuple[np.ndarray, np.ndarray]:
    """Unblurred radial response ``(r_A, fraction)`` of one atom of ``element``.

    Mo and S come from the abTEM table. Other elements take the profile shape of the nearer of Mo and S
    in Z, scaled by ``(Z / Z_ref) ** 1.78`` (:data:`Z_EXPONENT`): an approximation adequate for
    training data and tests, not for quantitative HAADF.

    Raises
    ------
    KeyError
        Unknown element (not in :data:`Z`).
    """
    r, prof = _abtem_profiles()
    if element in prof:
        return r, prof[element]
    if element not in Z:
        raise KeyError(f"unknown element {element!r}; known: {sorted(Z)}")
    ref = "S" if abs(Z[element] - Z["S"]) < abs(Z[element] - Z["Mo"]) else "Mo"
    return r, prof[ref] * (Z[element] / Z[ref]) ** Z_EXPONENT


@lru_cache(maxsize=32)
def profile_table(elements: tuple[str, ...], blur_sigma_A: float = 0.25, dr: float = 0.02) -> ProfileTable:
    """Blurred radial responses of ``elements``, cached.

    Each profile is laid out on a 2D grid of step ``dr``, convolved with an isotropic Gaussian of
    ``blur_sigma_A`` (the effective source size; ~0.25 Angstrom is typical of an aberration-corrected
    STEM, ../shared/notes/atom-finding.md) and read back along a radius.

    Parameters
    ----------
    elements : tuple of str
    blur_sigma_A : float
        Gaussian sigma, Angstrom (>= 0).
    dr : float
        Radius step, Angstrom.

    Raises
    ------
    ValueError
        Negative blur or non-positive step.
    KeyError
        Unknown element.
    """
    if blur_sigma_A < 0 or dr <= 0:
        raise ValueError(f"blur_sigma_A must be >= 0 and dr > 0, got {blur_sigma_A}, {dr}")
    r0, _ = raw_profile(elements[0])
    r_max = float(r0[-1]) + 3.0 * blur_sigma_A
    n = int(np.ceil(r_max / dr)) + 1
    grid = np.arange(-n + 1, n) * dr
    rr = np.hypot(*np.meshgrid(grid, grid))
    rows = []
    for el in elements:
        r, p = raw_profile(el)
        img = np.interp(rr, r, p, right=0.0)
        if blur_sigma_A > 0:
            img = gaussian_filter(img, blur_sigma_A / dr, mode="constant")
        rows.append(img[n - 1, n - 1:])
    table = np.zeros((len(elements), n + 1))
    table[:, :n] = np.asarray(rows)
    return ProfileTable(tuple(elements), table, float(dr), float(blur_sigma_A))
