"""More specimens as projected atomic columns: other TMDs, graphene and hBN, SrTiO3 [001], Si [110], fcc [110].

Every builder returns a :class:`beamloop.edge.sim.lattice.Specimen` that
:class:`beamloop.edge.sim.render.ColumnRenderer`
and :class:`beamloop.edge.sim.frames.FrameSimulator` render as they render MoS2. Columns of 3-D crystals hold
``thickness`` atoms of each kind along the beam (the linear incoherent model then makes them ``thickness``
times brighter than one atom: no channelling, adequate for training data, not for quantitative HAADF).
Non-MoS2 specimens label their columns ``("column", "vacancy")``.

Lattice constants (room temperature) are from R. W. G. Wyckoff, *Crystal Structures* (1963) and, for the
dichalcogenides, from Wilson & Yoffe, Adv. Phys. 18, 193 (1969); the projections follow from the unit cells:

- 2H-MX2 monolayer [001]: honeycomb of M columns and X2 columns (two chalcogens stacked), nearest
  distance ``a / sqrt(3)``.
- graphene / hBN [001]: honeycomb of single atoms (C-C 1.42 Angstrom; B-N 1.45 Angstrom).
- SrTiO3 [001] (cubic perovskite, ``a`` = 3.905 Angstrom): a square lattice of Sr columns, Ti-O columns at the
  cell centres and pure O columns at the edge centres (``a / 2`` from the Ti-O columns).
- diamond-cubic Si [110] (``a`` = 5.431 Angstrom): a centred rectangular cell ``a / sqrt(2)`` x ``a`` with two
  "dumbbells" of columns ``a / 4`` = 1.36 Angstrom apart along [001].
- fcc [110] (Au 4.078, Pt 3.924, Cu 3.615, Al 4.050 Angstrom): a centred rectangular cell ``a / sqrt(2)`` x ``a``,
  nearest column distance ``a sqrt(3/8)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from beamloop.edge.sim.lattice import MOS2_A, Specimen, bravais_points, mos2

GENERIC_CLASSES = ("column", "vacancy")
"""Class names of non-MoS2 specimens (:meth:`Specimen.classes`)."""

TMD_A = {"MoS2": MOS2_A, "WS2": 3.153, "MoSe2": 3.288, "WSe2": 3.282, "MoTe2": 3.519, "WTe2": 3.50}
"""In-plane lattice constants of 2H transition-metal dichalcogenides, Angstrom."""

FCC_A = {"Au": 4.078, "Pt": 3.924, "Cu": 3.615, "Al": 4.050}
"""Lattice constants of fcc metals, Angstrom."""

SI_A = 5.431
"""Lattice constant of silicon, Angstrom."""

SRTIO3_A = 3.905
"""Lattice constant of cubic SrTiO3, Angstrom."""

GRAPHENE_A = 2.46
HBN_A = 2.504
"""In-plane lattice constants of graphene and hexagonal boron nitride, Angstrom."""

Extent = tuple[float, float, float, float]


def _specimen(xy: np.ndarray, site: np.ndarray, site_atoms: list[dict[str, int]], sublattices: tuple[str, ...],
              material: str, nn: float, extra_elements: tuple[str, ...] = ()) -> Specimen:
    """Build a Specimen whose columns on sublattice ``k`` hold ``site_atoms[k]`` (element -> atoms)."""
    elements = tuple(dict.fromkeys([e for atoms in site_atoms for e in atoms] + list(extra_elements)))
    counts = np.zeros((len(xy), len(elements)), np.int16)
    for k, atoms in enumerate(site_atoms):
        for el, n in atoms.items():
            counts[site == k, elements.index(el)] = n
    class_names = None if material == "MoS2" else GENERIC_CLASSES
    kw = {} if class_names is None else {"class_names": class_names}
    return Specimen(np.asarray(xy, float), elements, counts, site.astype(np.int8), sublattices, material, float(nn),
                    **kw)


def tmd(extent_A: Extent, metal: str = "W", chalcogen: str = "S", *, rotation_deg: float = 0.0,
        origin_A: tuple[float, float] = (0.0, 0.0), a: float | None = None, dopants: tuple[str, ...] = ()) -> Specimen:
    """A 2H transition-metal dichalcogenide monolayer ``MX2`` viewed along [001].

    ``tmd(extent, "Mo", "S")`` is :func:`beamloop.edge.sim.lattice.mos2` (material ``"MoS2"``, MoS2 classes); any
    other pair is labelled generically.

    Parameters
    ----------
    extent_A : (x0, x1, y0, y1)
        Region to fill, Angstrom.
    metal, chalcogen : str
        Element symbols (e.g. ``"W"``, ``"Se"``).
    rotation_deg, origin_A
        As in :func:`beamloop.edge.sim.lattice.mos2`.
    a : float, optional
        Lattice constant, Angstrom (default from :data:`TMD_A`, else 3.3).
    dopants : tuple of str
        Elements to include (with no atoms yet) for :func:`substitute`; a doped MoS2 is labelled generically.

    Raises
    ------
    KeyError
        Unknown element (see :data:`beamloop.edge.sim.profiles.Z`) -- raised when the specimen is rendered.
    """
    name = f"{metal}{chalcogen}2"
    a = a if a is not None else TMD_A.get(name, 3.3)
    if name == "MoS2" and not dopants:
        return mos2(extent_A, rotation_deg=rotation_deg, origin_A=origin_A, a=a)
    if dopants:
        name += "-doped"  # the MoS2 classes (by Mo and S counts) do not describe substituted columns
    basis = np.array([[0.0, 0.0], [1 / 3, 1 / 3]])
    xy, site = bravais_points((a, 0.0), (a / 2, a * math.sqrt(3) / 2), basis, extent_A, rotation_deg, origin_A)
    return _specimen(xy, site, [{metal: 1}, {chalcogen: 2}], (metal, chalcogen + "2"), name, a / math.sqrt(3),
                     dopants)


def honeycomb(extent_A: Extent, elements: tuple[str, str] = ("C", "C"), *, a: float | None = None,
              rotation_deg: float = 0.0, origin_A: tuple[float, float] = (0.0, 0.0),
              dopants: tuple[str, ...] = ()) -> Specimen:
    """Graphene (``("C", "C")``) or hBN (``("B", "N")``) viewed along [001]: single atoms on a honeycomb.

    Parameters
    ----------
    elements : (str, str)
        Atoms of the two sublattices.
    a : float, optional
        Lattice constant, Angstrom (graphene 2.46, hBN 2.504).
    """
    a = a if a is not None else (GRAPHENE_A if elements == ("C", "C") else HBN_A)
    basis = np.array([[0.0, 0.0], [1 / 3, 1 / 3]])
    xy, site = bravais_points((a, 0.0), (a / 2, a * math.sqrt(3) / 2), basis, extent_A, rotation_deg, origin_A)
    name = "graphene" if elements == ("C", "C") else "".join(elements)
    return _specimen(xy, site, [{elements[0]: 1}, {elements[1]: 1}], elements, name, a / math.sqrt(3), dopants)


def srtio3_001(extent_A: Extent, thickness: int = 10, *, a: float = SRTIO3_A, rotation_deg: float = 0.0,
               origin_A: tuple[float, float] = (0.0, 0.0), dopants: tuple[str, ...] = ()) -> Specimen:
    """Cubic perovskite SrTiO3 viewed along [001], ``thickness`` unit cells thick.

    Columns: Sr at the cell corner, Ti-O at the centre, O at the two edge centres. Raises ``ValueError`` for
    a thickness below 1.
    """
    if thickness < 1:
        raise ValueError(f"thickness must be at least one unit cell, got {thickness}")
    basis = np.array([[0.0, 0.0], [0.5, 0.5], [0.5, 0.0], [0.0, 0.5]])
    xy, site = bravais_points((a, 0.0), (0.0, a), basis, extent_A, rotation_deg, origin_A)
    site = np.minimum(site, 2)  # both O sites form one sublattice
    t = int(thickness)
    return _specimen(xy, site, [{"Sr": t}, {"Ti": t, "O": t}, {"O": t}], ("Sr", "TiO", "O"), "SrTiO3", a / 2,
                     dopants)


def si_110(extent_A: Extent, thickness: int = 10, *, a: float = SI_A, rotation_deg: float = 0.0,
           origin_A: tuple[float, float] = (0.0, 0.0), element: str = "Si", dopants: tuple[str, ...] = ()) -> Specimen:
    """A diamond-cubic crystal (Si; ``element`` for another) viewed along [110].

    ``thickness`` atoms per column. x runs along [1-10], y along [001]; dumbbell columns ``a / 4`` apart.
    Raises ``ValueError`` for a thickness below 1.
    """
    if thickness < 1:
        raise ValueError(f"thickness must be at least one atom per column, got {thickness}")
    basis = np.array([[0.0, 0.0], [0.0, 0.25], [0.5, 0.5], [0.5, 0.75]])
    xy, site = bravais_points((a / math.sqrt(2), 0.0), (0.0, a), basis, extent_A, rotation_deg, origin_A)
    return _specimen(xy, np.zeros_like(site), [{element: int(thickness)}], (element,), f"{element}[110]", a / 4,
                     dopants)


def fcc_110(extent_A: Extent, element: str = "Au", thickness: int = 10, *, a: float | None = None,
            rotation_deg: float = 0.0, origin_A: tuple[float, float] = (0.0, 0.0),
            dopants: tuple[str, ...] = ()) -> Specimen:
    """An fcc metal viewed along [110], ``thickness`` atoms per column.

    Raises ``ValueError`` for a thickness below 1.
    """
    if thickness < 1:
        raise ValueError(f"thickness must be at least one atom per column, got {thickness}")
    a = a if a is not None else FCC_A.get(element, 4.0)
    basis = np.array([[0.0, 0.0], [0.5, 0.5]])
    xy, site = bravais_points((a / math.sqrt(2), 0.0), (0.0, a), basis, extent_A, rotation_deg, origin_A)
    return _specimen(xy, np.zeros_like(site), [{element: int(thickness)}], (element,), f"{element}[110]",
                     a * math.sqrt(3 / 8), dopants)


def add_vacancies(specimen: Specimen, rng: np.random.Generator, fraction: float, *,
                  partial: float = 0.0) -> Specimen:
    """Empty a random ``fraction`` of columns (all atoms gone), in place; return the specimen.

    With ``partial`` > 0, that further fraction of columns loses a random part (at least one atom, not all)
    of each element's atoms -- thinner columns in a thick crystal, or a mono-vacancy in an X2 column.

    Raises ``ValueError`` for fractions outside [0, 1].
    """
    if not (0 <= fraction <= 1 and 0 <= partial <= 1):
        raise ValueError(f"fractions must lie in [0, 1], got {fraction}, {partial}")
    u = rng.random(len(specimen))
    specimen.counts[u < fraction] = 0
    part = (u >= fraction) & (u < fraction + partial)
    for k in np.flatnonzero(part):
        row = specimen.counts[k]
        for e in np.flatnonzero(row > 1):
            row[e] = rng.integers(1, row[e])
    return specimen


def substitute(specimen: Specimen, rng: np.random.Generator, host: str, dopant: str, fraction: float) -> Specimen:
    """Replace ``host`` atoms by ``dopant`` in a random ``fraction`` of the columns holding ``host``, in place.

    The dopant must be among ``specimen.elements`` (builders take ``dopants=``). In columns of several
    atoms, each host atom of a chosen column is replaced with probability 1/2 (at least one).

    Raises
    ------
    ValueError
        Host or dopant not in the specimen, or a fraction outside [0, 1].
    """
    if host not in specimen.elements or dopant not in specimen.elements:
        raise ValueError(f"host {host!r} and dopant {dopant!r} must both be in {specimen.elements}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    h, d = specimen.elements.index(host), specimen.elements.index(dopant)
    cand = np.flatnonzero(specimen.counts[:, h] > 0)
    chosen = cand[rng.random(len(cand)) < fraction]
    for k in chosen:
        n = int(specimen.counts[k, h])
        m = max(1, int(rng.binomial(n, 0.5))) if n > 1 else 1
        specimen.counts[k, h] -= m
        specimen.counts[k, d] += m
    return specimen


def remove_region(specimen: Specimen, centre_A: tuple[float, float], radius_A: float) -> Specimen:
    """Take the columns within ``radius_A`` of ``centre_A`` out of the specimen (a hole: vacuum, no site).

    Returns a new Specimen (the sites are gone, not vacancies).
    """
    keep = np.hypot(specimen.xy[:, 0] - centre_A[0], specimen.xy[:, 1] - centre_A[1]) > radius_A
    return Specimen(specimen.xy[keep], specimen.elements, specimen.counts[keep].copy(), specimen.site[keep],
                    specimen.sublattices, specimen.material, specimen.nn_distance_A, specimen.class_names)


def bicrystal(build: Callable[..., Specimen], extent_A: Extent, rng: np.random.Generator, *,
              misorientation_deg: float, **kw) -> Specimen:
    """Two grains of one structure meeting at a straight boundary through the field (a grain boundary).

    ``build(extent_A, rotation_deg=..., origin_A=..., **kw)`` makes each grain; the second is rotated by
    ``misorientation_deg`` from the first. Columns of the second grain closer than 0.8 nearest-neighbour
    distances to a column of the first are dropped (no overlapping atoms at the boundary).

    Returns
    -------
    Specimen
        Columns of both grains; ``site`` and sublattices from the grain builder.
    """
    from scipy.spatial import cKDTree

    rot0 = float(rng.uniform(0, 180))
    g1 = build(extent_A, rotation_deg=rot0, origin_A=tuple(rng.uniform(-2, 2, 2)), **kw)
    g2 = build(extent_A, rotation_deg=rot0 + misorientation_deg, origin_A=tuple(rng.uniform(-2, 2, 2)), **kw)
    x0, x1, y0, y1 = extent_A
    c = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)]) * 0.5 + np.array([(x0 + x1) / 4, (y0 + y1) / 4])
    ang = rng.uniform(0, math.pi)
    normal = np.array([math.cos(ang), math.sin(ang)])
    side1 = (g1.xy - c) @ normal < 0
    side2 = (g2.xy - c) @ normal >= 0
    xy1, xy2 = g1.xy[side1], g2.xy[side2]
    if len(xy1) and len(xy2):
        d, _ = cKDTree(xy1).query(xy2)
        ok = d >= 0.8 * g1.nn_distance_A
        side2[np.flatnonzero(side2)[~ok]] = False
    return Specimen(np.concatenate([g1.xy[side1], g2.xy[side2]]), g1.elements,
                    np.concatenate([g1.counts[side1], g2.counts[side2]]),
                    np.concatenate([g1.site[side1], g2.site[side2]]), g1.sublattices, g1.material,
                    g1.nn_distance_A, g1.class_names)


STRUCTURES = {
    "MoS2": lambda e, **kw: tmd(e, "Mo", "S", **kw),
    "WS2": lambda e, **kw: tmd(e, "W", "S", **kw),
    "MoSe2": lambda e, **kw: tmd(e, "Mo", "Se", **kw),
    "WSe2": lambda e, **kw: tmd(e, "W", "Se", **kw),
    "MoTe2": lambda e, **kw: tmd(e, "Mo", "Te", **kw),
    "graphene": lambda e, **kw: honeycomb(e, ("C", "C"), **kw),
    "hBN": lambda e, **kw: honeycomb(e, ("B", "N"), **kw),
    "SrTiO3[001]": lambda e, **kw: srtio3_001(e, **kw),
    "Si[110]": lambda e, **kw: si_110(e, **kw),
    "Au[110]": lambda e, **kw: fcc_110(e, "Au", **kw),
    "Pt[110]": lambda e, **kw: fcc_110(e, "Pt", **kw),
    "Cu[110]": lambda e, **kw: fcc_110(e, "Cu", **kw),
    "Al[110]": lambda e, **kw: fcc_110(e, "Al", **kw),
}
"""Builders by name: ``STRUCTURES[name](extent_A, rotation_deg=..., origin_A=..., ...)`` -> Specimen."""
