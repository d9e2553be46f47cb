"""Exporting found columns to the formats of atomap and TEMUL, the two Python toolkits of the field for
atomic-column analysis.

atomap (M. Nord et al., "Atomap: a new software tool for the automated analysis of atomic resolution
images using two-dimensional Gaussian fitting", Adv. Struct. Chem. Imaging 3, 9 (2017)) takes column
positions as an ``(n, 2)`` array of ``(x, y)`` pixels (``atomap.api.Sublattice(atom_position_list,
image)``), with ``x`` the column index and ``y`` the row index and the origin at the centre of the top-left
pixel: the convention of :class:`beamloop.edge.frame.columns.ColumnTable`, so positions pass unchanged.

TEMUL (E. O'Connell et al., the TEMUL Toolkit, built on atomap) labels each column with the atoms it holds
as ``<element>_<count>`` joined by ``.`` (``"Mo_1"``, ``"S_2"``, ``"Se_1.S_1"``; count 0 for an empty
site) in the ``elements`` attribute of atomap's ``Atom_Position``, beside ``pixel_x``, ``pixel_y`` and
``z_height``.

Files written for a stem ``<stem>``:

``atomap``
    ``<stem>_atomap.csv`` (``x,y,class``: pixels, loadable with ``numpy.loadtxt(..., delimiter=",",
    skiprows=1, usecols=(0, 1))``), ``<stem>_atomap.npz`` (``atom_positions`` (n, 2) float64 pixels,
    ``positions_<class>`` per class, ``class_names``, ``pixel_size_A``; NaN when unknown) and, when the
    image is given, atomap is installed and there is at least one column, ``<stem>_atom_lattice.hdf5`` (an
    ``atomap.Atom_Lattice`` with one ``Sublattice`` per non-empty class, named after it, read back by
    ``atomap.api.load_atom_lattice_from_hdf5``).
``temul``
    ``<stem>_temul.csv``: ``pixel_x, pixel_y, elements, z_height, class, intensity, score`` and, when the
    pixel size is known, ``x_A, y_A``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from beamloop.edge.frame.columns import ColumnTable

EXPORT_FORMATS = ("atomap", "temul")
"""Export formats (``beamloop find --export``)."""

TEMUL_ELEMENTS = {"Mo": ("Mo_1", "0.5"), "S2": ("S_2", "0.25,0.75"), "S1": ("S_1", "0.25")}
"""Class name -> TEMUL ``elements`` label and ``z_height`` (fractions of the cell along the beam) for MoS2
[001] (Mo plane in the middle, the two S planes a quarter cell either side; the 2H structure of
Wildervanck and Jellinek, Z. Anorg. Allg. Chem. 328, 309 (1964)). Other classes (``column``, ``vacancy``:
the finder does not say which site is empty) are written with empty labels."""


def _check(columns: ColumnTable, pixel_size_A: float | None) -> None:
    if not isinstance(columns, ColumnTable):
        raise TypeError(f"columns must be a ColumnTable, got {type(columns).__name__}")
    if pixel_size_A is not None and not (math.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise ValueError(f"pixel size must be a positive number of Angstrom, got {pixel_size_A}")


def write_atomap(stem: str | Path, columns: ColumnTable, *, pixel_size_A: float | None = None,
                 image: np.ndarray | None = None) -> list[Path]:
    """Write the columns for atomap (module docstring): CSV, npz and, with ``image``, an Atom_Lattice HDF5.

    Parameters
    ----------
    stem : str or Path
        Output path without the ending; ``<stem>_atomap.csv`` etc. are written.
    columns : ColumnTable
        Positions in pixels (x column, y row).
    pixel_size_A : float, optional
        Angstrom per pixel, stored in the npz (NaN when None).
    image : ndarray (rows, cols), optional
        The frame; with it (and atomap installed) ``<stem>_atom_lattice.hdf5`` is written too.

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    TypeError
        ``columns`` is not a ColumnTable.
    ValueError
        Non-positive or non-finite ``pixel_size_A``; ``image`` not 2-D.
    OSError
        A file cannot be written.
    """
    _check(columns, pixel_size_A)
    stem = Path(stem)
    labels = columns.class_labels()
    out = [stem.with_name(stem.name + "_atomap.csv"), stem.with_name(stem.name + "_atomap.npz")]
    with out[0].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "class"])
        for k in range(len(columns)):
            w.writerow([f"{columns.x[k]:.4f}", f"{columns.y[k]:.4f}", labels[k]])
    xy = columns.xy
    per_class = {f"positions_{name}": xy[columns.cls == i] for i, name in enumerate(columns.class_names)}
    np.savez(out[1], atom_positions=xy, class_names=np.array(columns.class_names),
             pixel_size_A=np.float64(np.nan if pixel_size_A is None else pixel_size_A), **per_class)
    if image is not None:
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"image must be 2-D (rows, cols), got shape {image.shape}")
        try:
            import atomap.api as am
        except ImportError:
            return out
        lattice = stem.with_name(stem.name + "_atom_lattice.hdf5")
        subs = [am.Sublattice(xy[columns.cls == i], image.astype(np.float64), name=name)
                for i, name in enumerate(columns.class_names) if np.any(columns.cls == i)]
        if not subs:  # atomap 0.4 cannot save a sublattice without atoms (its save reads atom_list[0])
            return out
        al = am.Atom_Lattice(image=image.astype(np.float64), name=stem.name, sublattice_list=subs)
        lattice.unlink(missing_ok=True)
        al.save(str(lattice), overwrite=True)
        out.append(lattice)
    return out


def write_temul(stem: str | Path, columns: ColumnTable, *, pixel_size_A: float | None = None) -> list[Path]:
    """Write ``<stem>_temul.csv`` (module docstring): one row per column, TEMUL's element labels.

    Parameters
    ----------
    stem : str or Path
        Output path without the ending.
    columns : ColumnTable
    pixel_size_A : float, optional
        Angstrom per pixel; adds ``x_A, y_A``.

    Returns
    -------
    list of Path

    Raises
    ------
    TypeError, ValueError, OSError
        As :func:`write_atomap`.
    """
    _check(columns, pixel_size_A)
    stem = Path(stem)
    path = stem.with_name(stem.name + "_temul.csv")
    labels = columns.class_labels()
    header = ["pixel_x", "pixel_y", "elements", "z_height", "class", "intensity", "score"]
    if pixel_size_A:
        header += ["x_A", "y_A"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for k in range(len(columns)):
            elements, z = TEMUL_ELEMENTS.get(labels[k], ("", ""))
            row = [f"{columns.x[k]:.4f}", f"{columns.y[k]:.4f}", elements, z, labels[k],
                   f"{columns.intensity[k]:.6g}", f"{columns.score[k]:.3f}"]
            if pixel_size_A:
                row += [f"{columns.x[k] * pixel_size_A:.4f}", f"{columns.y[k] * pixel_size_A:.4f}"]
            w.writerow(row)
    return [path]


def export_columns(fmt: str, stem: str | Path, columns: ColumnTable, *, pixel_size_A: float | None = None,
                   image: np.ndarray | None = None) -> list[Path]:
    """Write ``columns`` in export format ``fmt`` (one of :data:`EXPORT_FORMATS`); returns the files.

    Raises
    ------
    ValueError
        Unknown format (and as :func:`write_atomap`).
    """
    if fmt == "atomap":
        return write_atomap(stem, columns, pixel_size_A=pixel_size_A, image=image)
    if fmt == "temul":
        return write_temul(stem, columns, pixel_size_A=pixel_size_A)
    raise ValueError(f"unknown export format {fmt!r}; expected one of {EXPORT_FORMATS}")
