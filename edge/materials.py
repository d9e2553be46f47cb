"""Materials the frame path knows: their column classes and the lengths that set its scale.

One table (:data:`MATERIALS`) holds every material constant the stages, the simulator and the
benchmarks use, so that the MoS2 numbers live in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MOS2_A = 3.16
"""In-plane lattice constant of 2H-MoS2, Angstrom (Wakabayashi, Smith & Nicklow, Phys. Rev. B 12, 659 (1975))."""


@dataclass(frozen=True)
class Material:
    """Constants of one material as the frame path sees it (a projection along the beam).

    Attributes
    ----------
    name : str
        The name options and stream metadata use (``"MoS2"``, ``"generic"``).
    class_names : tuple of str
        Column classes the classify stage writes (index = ``ColumnTable.cls``).
    nn_spacing_A : float or None
        Nearest-neighbour distance of projected columns, Angstrom; None: unknown (estimated per image).
    column_sigma_A : float
        Standard deviation of a column's blurred HAADF profile, Angstrom (the finder's matched filter).
    lattice_a_A : float or None
        In-plane lattice constant, Angstrom.
    """

    name: str
    class_names: tuple[str, ...]
    nn_spacing_A: float | None = None
    column_sigma_A: float = 0.33
    lattice_a_A: float | None = None


MOS2 = Material("MoS2", ("Mo", "S2", "S1", "vacancy"), nn_spacing_A=round(MOS2_A / math.sqrt(3), 3),
                column_sigma_A=0.33, lattice_a_A=MOS2_A)
"""MoS2 [001]: Mo, S2 (two S stacked), S1 (a mono-vacancy) and empty sites (S di-vacancy, Mo vacancy).
Mo-S projected distance a / sqrt(3) = 1.824 Angstrom (to the digits the finder uses); column sigma 0.33 Angstrom
(FWHM 0.77 Angstrom of abTEM single-atom HAADF profiles at 200 kV, 25 mrad, blurred by a 0.25 Angstrom source)."""

GENERIC = Material("generic", ("column",))
"""Any lattice: one class, scale from the pixel size and a given spacing, or estimated from the image."""

MATERIALS: dict[str, Material] = {m.name: m for m in (MOS2, GENERIC)}
"""Materials by name."""


def material(name: str | Material) -> Material:
    """The :class:`Material` called ``name`` (a Material is returned as it is).

    Raises
    ------
    ValueError
        Unknown name.
    """
    if isinstance(name, Material):
        return name
    try:
        return MATERIALS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown material {name!r}; known: {sorted(MATERIALS)}") from None
