"""Reading the files microscopes write, through RosettaSciIO (the ``formats`` extra).

RosettaSciIO is HyperSpy's file-format library (https://hyperspy.org/rosettasciio). Each of its plugins
returns a list of signal dictionaries (``data``, ``axes``, ``metadata``); :func:`read_with_rsciio` picks
the first one that is an image (two signal axes) or a stack of images (one navigation axis), and takes the
pixel size from the signal axes' ``scale`` and ``units`` (converted to Angstrom by :func:`length_to_A`).

========================  =========================  ==========================================
suffix                    what writes it             RosettaSciIO plugin
========================  =========================  ==========================================
``.dm3``, ``.dm4``        Gatan DigitalMicrograph    ``rsciio.digitalmicrograph``
``.emd``                  Berkeley EMD (NCEM), Velox ``rsciio.emd``
``.ser``                  FEI / Thermo Fisher TIA    ``rsciio.tia``
``.mrc``                  MRC 2014 (CCP-EM)          ``rsciio.mrc``
``.mib``                  Quantum Detectors Merlin   ``rsciio.quantumdetector``
``.hspy``, ``.zspy``      HyperSpy                   ``rsciio.hspy``, ``rsciio.zspy``
``.tif``, ``.tiff``       many                       ``rsciio.tiff``
``.nxs``                  NeXus (NXdata)             ``rsciio.nexus``
========================  =========================  ==========================================

Array order. Rows are the ``y`` axis and columns the ``x`` axis (HyperSpy's convention). When a plugin hands
back the two signal axes named ``x`` then ``y`` in array order (RosettaSciIO's Berkeley EMD reader transposes
the stored array of every non-py4DSTEM file, so an image that ncempy wrote as ``(rows, cols)`` with
``dim1 = y`` comes back as ``(cols, rows)`` labelled ``x, y``), the image is transposed back so that rows
are ``y`` again, as the file's own axis names say. RosettaSciIO's Merlin reader turns every ``.mib`` frame
upside down (``np.flip(data, axis=-2)`` in ``rsciio.quantumdetector``); it is flipped back here, so that
rows come in the file's raster order, as the Merlin stream receiver (:mod:`beamloop.streams.merlin`) and
LiberTEM's MIB reader deliver them and as the scan positions of a live frame are numbered.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np

from beamloop.edge.io.imageio import Image, ImageReadError, length_to_A

RSCIIO_PLUGINS = {
    ".dm3": "rsciio.digitalmicrograph", ".dm4": "rsciio.digitalmicrograph", ".emd": "rsciio.emd",
    ".ser": "rsciio.tia", ".mrc": "rsciio.mrc", ".mib": "rsciio.quantumdetector", ".hspy": "rsciio.hspy",
    ".zspy": "rsciio.zspy", ".tif": "rsciio.tiff", ".tiff": "rsciio.tiff", ".nxs": "rsciio.nexus",
}
"""File suffix -> the RosettaSciIO plugin module that reads it."""

RSCIIO_SUFFIXES = (".dm3", ".dm4", ".emd", ".ser", ".mrc", ".mib", ".zspy", ".nxs")
"""Suffixes that :func:`beamloop.edge.io.imageio.read_image` reads through RosettaSciIO (the others in
:data:`RSCIIO_PLUGINS` have a reader of their own there that needs no extra)."""

INSTALL_HINT = "pip install 'beamloop[formats]' (RosettaSciIO)"
"""How to get the ``formats`` extra."""

SQUARE_TOLERANCE = 1e-3
"""Largest relative difference of the x and y pixel sizes still taken as square pixels."""


def rsciio_available() -> bool:
    """Whether RosettaSciIO can be imported (the ``formats`` extra is installed)."""
    try:
        import rsciio  # noqa: F401
    except ImportError:
        return False
    return True


def _plugin(path: Path):
    suffix = path.suffix.lower()
    name = RSCIIO_PLUGINS.get(suffix)
    if name is None:
        raise ImageReadError(f"{path}: unsupported file type {suffix!r} for RosettaSciIO; expected one of "
                             f"{tuple(RSCIIO_PLUGINS)}")
    try:
        import rsciio  # noqa: F401
    except ImportError:
        raise ImageReadError(f"{path}: reading {suffix} files needs RosettaSciIO, which is not installed: "
                             f"{INSTALL_HINT}") from None
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # a plugin whose own dependency is missing
        raise ImageReadError(f"{path}: RosettaSciIO's {name} plugin cannot be loaded ({exc})") from None


def _describe(sig: dict) -> str:
    title = ((sig.get("metadata") or {}).get("General") or {}).get("title") or "untitled"
    nav = [a["size"] for a in sig["axes"] if a.get("navigate")]
    dims = [a["size"] for a in sig["axes"] if not a.get("navigate")]
    return f"{title!r} signal {tuple(dims)} navigation {tuple(nav)}"


def _title(sig: dict) -> str:
    return str(((sig.get("metadata") or {}).get("General") or {}).get("title") or "")


def _is_image(sig: dict) -> bool:
    axes = sig.get("axes") or []
    data = sig.get("data")
    if data is None or len(axes) != np.ndim(data):
        return False
    n_sig = sum(1 for a in axes if not a.get("navigate"))
    return n_sig == 2 and np.ndim(data) in (2, 3) and all(not a.get("navigate") for a in axes[-2:])


def read_with_rsciio(path: str | Path, signal: str | None = None) -> Image:
    """Read the image (or the stack of images) of a microscope file through RosettaSciIO.

    Parameters
    ----------
    path : str or Path
        A file with a suffix of :data:`RSCIIO_PLUGINS` (a ``.zspy`` store is a folder).
    signal : str, optional
        Take the signal whose title contains this text (case-insensitive), e.g. ``"HAADF"`` in a Velox file
        with several detectors; default the first image in the file.

    Returns
    -------
    Image
        ``data`` (rows, cols) or (n, rows, cols) in native byte order (the file's dtype; a memory map is
        read into memory), ``pixel_size_A`` from the signal axes' scale and length units (None when the file
        gives no length unit, e.g. a Merlin ``.mib`` in detector pixels, or when the x and y pixel sizes
        differ by more than :data:`SQUARE_TOLERANCE`), ``units`` the file's unit text, ``reader`` the plugin.

    Raises
    ------
    ImageReadError
        No such file; a suffix RosettaSciIO is not used for; RosettaSciIO is not installed (the message says
        how to install it); the plugin fails on the file; the file holds no image of two signal axes (the
        message lists what it does hold), or no signal matches ``signal``.
    """
    path = Path(path)
    if not (path.is_file() or (path.is_dir() and path.suffix.lower() == ".zspy")):
        raise ImageReadError(f"{path}: no such file")
    mod = _plugin(path)
    try:
        signals = mod.file_reader(str(path), lazy=False)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every plugin failure becomes one line naming the file
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise ImageReadError(f"{path}: RosettaSciIO ({mod.__name__}) cannot read it ({type(exc).__name__}: "
                             f"{text})") from None
    if isinstance(signals, dict):
        signals = [signals]
    images = [s for s in signals if _is_image(s)]
    if signal is not None:
        images = [s for s in images if signal.lower() in _title(s).lower()]
    if not images:
        held = "; ".join(_describe(s) for s in signals) or "nothing"
        want = f" titled like {signal!r}" if signal is not None else ""
        raise ImageReadError(f"{path}: no 2-D image{want} in the file (it holds {held})")
    sig = images[0]
    data = np.asarray(sig["data"])
    axes = sorted(sig["axes"], key=lambda a: a.get("index_in_array", sig["axes"].index(a)))
    if [a.get("name") for a in axes[-2:]] == ["x", "y"]:  # labelled x then y: rows are x (module docstring)
        data = np.swapaxes(data, -1, -2)
        axes[-2:] = axes[-2:][::-1]
    if mod.__name__ == "rsciio.quantumdetector":  # undo its vertical flip (module docstring)
        data = data[..., ::-1, :]
    data = np.array(data, dtype=data.dtype.newbyteorder("=")) if data.dtype.byteorder not in "=|" else np.array(data)
    y_ax, x_ax = axes[-2], axes[-1]
    units = x_ax.get("units")
    units = None if units in (None, "", "<undefined>") else str(units)
    size = _pixel_size(x_ax, y_ax)
    return Image(data, size, path, units=units, reader=mod.__name__)


def _pixel_size(x_ax: dict, y_ax: dict) -> float | None:
    """Angstrom per pixel from two signal axes, None without a length unit or for non-square pixels."""
    sizes = []
    for ax in (x_ax, y_ax):
        factor = length_to_A(ax.get("units"))
        scale = ax.get("scale")
        if factor is None or scale is None:
            return None
        value = abs(float(scale)) * factor
        if not (math.isfinite(value) and value > 0):
            return None
        sizes.append(value)
    if abs(sizes[0] - sizes[1]) > SQUARE_TOLERANCE * max(sizes):
        return None
    return sizes[0]
