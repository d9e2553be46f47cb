"""The abTEM cells the U-Net trains on and the ones held out for evaluation (:mod:`beamloop.edge.sim.multislice`).

Training cells cover 3-D crystals and graphene under several probes (energy, aperture, defocus, C3,
astigmatism), detectors and with or without frozen phonons; evaluation cells are transition-metal
dichalcogenide monolayers (MoS2, WSe2) with frozen phonons and optics outside the training list, a
structure family the training cells never contain. Cells are simulated once and cached in ``out/abtem``
(never shipped); ``python -m beamloop.edge.learn.multislice_set`` fills the cache.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from beamloop.edge.sim.multislice import CellImage, Optics, cached_cell

DEFAULT_CACHE = Path("out/abtem")
"""Cache folder of simulated cells (relative to the working directory)."""

_S = dict(scan_sampling_A=0.2, potential_sampling_A=0.06)

TRAIN_CELLS: tuple[tuple[str, Optics, int, tuple[int, ...], tuple[int, int]], ...] = (
    ("Si[110]", Optics(200.0, 22.0, 20.0, 0.0, 0.0, 70, 160, method="prism", **_S), 3, (), (1, 1)),
    ("GaAs[110]", Optics(200.0, 25.0, 0.0, 0.0, 15.0, 80, 160, method="prism", **_S), 4, (), (1, 1)),
    ("SrTiO3[001]", Optics(200.0, 20.0, 40.0, 0.0, 0.0, 65, 150, method="prism", **_S), 6, (), (1, 1)),
    ("Au[110]", Optics(200.0, 24.0, 10.0, 0.0, 0.0, 75, 160, method="prism", **_S), 3, (), (1, 1)),
    ("graphene", Optics(60.0, 30.0, 0.0, 0.0, 0.0, 60, 200, method="prism", **_S), 1, (), (1, 1)),
    ("graphene", Optics(80.0, 20.0, 50.0, 0.0, 8.0, 90, 250, method="prism", **_S), 1, (), (1, 1)),
)
"""(structure, optics, thickness in cells, removed atoms, supercell) of every training cell."""

HELD_OUT_CELLS: dict[str, tuple[str, Optics, int, tuple[int, ...], tuple[int, int]]] = {
    # 2 x 1 MoS2 cells, atom 3 (an S of the second formula unit) removed: one S1 column per supercell
    "MoS2": ("MoS2", Optics(60.0, 27.0, 15.0, 0.0, 0.0, 75, 210, frozen_phonons=4, method="prism", **_S), 1, (3,),
             (2, 1)),
    "WSe2": ("WSe2", Optics(80.0, 24.0, -10.0, 0.0, 5.0, 85, 200, frozen_phonons=4, method="prism", **_S), 1, (),
             (1, 1)),
}
"""Evaluation cells by name: never used in training."""


def train_cells(cache: str | Path = DEFAULT_CACHE) -> list[CellImage]:
    """Every training cell (simulated on first use, then read from ``cache``)."""
    return [cached_cell(cache, *spec) for spec in TRAIN_CELLS]


def held_out_cell(name: str, cache: str | Path = DEFAULT_CACHE) -> CellImage:
    """The held-out cell ``name`` (a key of :data:`HELD_OUT_CELLS`)."""
    return cached_cell(cache, *HELD_OUT_CELLS[name])


def main(argv: list[str] | None = None) -> int:
    """Fill the cache: held-out cells first, then the training cells."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--only", choices=("held-out", "train", "all"), default="all")
    a = p.parse_args(argv)
    specs = []
    if a.only in ("held-out", "all"):
        specs += list(HELD_OUT_CELLS.values())
    if a.only in ("train", "all"):
        specs += list(TRAIN_CELLS)
    for spec in specs:
        t0 = time.perf_counter()
        c = cached_cell(a.cache, *spec)
        print(f"{spec[0]} {spec[1].energy_kV:.0f} kV: {c.image.shape} px over {c.cell_A} A in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
