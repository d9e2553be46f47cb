"""Reading STEM images from files: TIFF, PNG, NumPy ``.npy`` and HyperSpy ``.hspy`` / ``.hdf5`` here; the files
microscopes write (Gatan ``.dm3`` / ``.dm4``, Berkeley and Velox ``.emd``, TIA ``.ser``, ``.mrc``, Merlin
``.mib``, HyperSpy ``.zspy``, NeXus ``.nxs``) through RosettaSciIO (:mod:`beamloop.edge.io.formats`, the
``formats`` extra).

Every reader returns an :class:`Image`: the pixels as a 2-D frame or a 3-D stack of frames ``(n, rows,
cols)`` and, when the file records it, the pixel size in Angstrom. Colour images are converted to
luminance (ITU-R BT.601 weights, as Pillow's ``convert("L")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

RSCIIO_SUFFIXES = (".dm3", ".dm4", ".emd", ".ser", ".mrc", ".mib", ".zspy", ".nxs")
"""File name endings :func:`read_image` reads through RosettaSciIO (:mod:`beamloop.edge.io.formats`)."""

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".hspy", ".hdf5", ".h5") + RSCIIO_SUFFIXES
"""File name endings :func:`read_image` understands."""

FOLDER_SUFFIXES = (".zspy",)
"""Endings of formats whose "file" is a folder (a Zarr store)."""

_UNIT_TO_A = {"nm": 10.0, "Å": 1.0, "\u212b": 1.0, "A": 1.0, "angstrom": 1.0, "angstroms": 1.0, "ang": 1.0,
              "pm": 0.01, "um": 1e4, "µm": 1e4, "\u03bcm": 1e4, "micron": 1e4, "micrometer": 1e4,
              "micrometre": 1e4, "nanometer": 10.0, "nanometre": 10.0, "nanometers": 10.0, "mm": 1e7, "m": 1e10,
              "meter": 1e10, "metre": 1e10}
"""Length unit text -> Angstrom per unit (SI prefixes; 1 Angstrom = 0.1 nm, BIPM SI Brochure, 9th ed.)."""


class ImageReadError(ValueError):
    """A file that is missing, of an unsupported kind, unreadable, or holds no image of 2 or 3 dimensions."""


@dataclass
class Image:
    """Pixels read from a file.

    Attributes
    ----------
    data : ndarray, shape (rows, cols) or (n, rows, cols)
        Pixel values in the file's dtype (colour converted to float32 luminance).
    pixel_size_A : float or None
        Angstrom per pixel when the file records a length unit, else None.
    path : Path
    units : str or None
        The length unit as the file writes it (``"nm"``, ``"µm"``...), when the reader reports it.
    reader : str
        Which reader read it (a RosettaSciIO plugin module, or empty for the readers of this module).
    """

    data: np.ndarray
    pixel_size_A: float | None
    path: Path
    units: str | None = None
    reader: str = ""

    @property
    def frames(self) -> np.ndarray:
        """The data as a stack ``(n, rows, cols)``."""
        return self.data[None] if self.data.ndim == 2 else self.data


def length_to_A(unit) -> float | None:
    """Angstrom per ``unit`` for a length unit's text (``"nm"`` -> 10.0), None for anything else.

    Parameters
    ----------
    unit : str, bytes or None
        As files write it: ``nm``, ``Å``, ``A``, ``angstrom``, ``pm``, ``µm`` / ``um`` / ``micron``, ``mm``,
        ``m`` and spelled-out forms, any case. Reciprocal units (``1/nm``), angles and an empty or missing
        unit are not lengths: None.
    """
    if isinstance(unit, bytes):
        unit = unit.decode(errors="replace")
    if not isinstance(unit, str):
        return None
    return _UNIT_TO_A.get(unit.strip()) or _UNIT_TO_A.get(unit.strip().lower())




def _read_png(path: Path) -> Image:
    from PIL import Image as PILImage

    with PILImage.open(path) as im:
        if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
            im = im.convert("L")
        data = np.array(im)
    return Image(data, None, path)


def _read_tiff(path: Path) -> Image:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        data = tf.asarray()
        size = None
        ij = tf.imagej_metadata or {}
        scale = length_to_A(ij.get("unit"))
        page = tf.pages[0]
        xres = page.tags.get("XResolution")
        if scale and xres is not None:
            num, den = xres.value
            if num > 0:
                size = scale * den / num
    if data.ndim == 3 and data.shape[-1] in (3, 4):
        data = (data[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.float32)
    return Image(data, size, path, units=str(ij["unit"]) if size and ij.get("unit") else None)


def _read_hspy(path: Path) -> Image:
    import h5py

    with h5py.File(path, "r") as f:
        exp = f.get("Experiments")
        if exp is None or not len(exp):
            raise ImageReadError(f"{path}: no /Experiments group; not a HyperSpy file")
        g = exp[next(iter(exp))]
        if "data" not in g:
            raise ImageReadError(f"{path}: HyperSpy signal has no data")
        data = g["data"][()]
        size = None
        # signal axes (navigate == False) are the last two; their scale and units give the pixel size
        axes = [g[k].attrs for k in sorted((k for k in g if k.startswith("axis-")), key=lambda s: int(s[5:]))]
        sig = [a for a in axes if not bool(a.get("navigate", False))]
        units = None
        if sig:
            scale = length_to_A(sig[-1].get("units"))
            if scale:
                size = float(sig[-1].get("scale", 1.0)) * scale
                units = sig[-1].get("units")
                units = units.decode(errors="replace") if isinstance(units, bytes) else str(units)
    return Image(data, size, path, units=units)


def _read_rsciio(path: Path) -> Image:
    from beamloop.edge.io.formats import read_with_rsciio

    return read_with_rsciio(path)


NPY_MAGIC = b"\x93NUMPY"
"""First bytes of every NumPy ``.npy`` file (NumPy's format specification, ``numpy.lib.format``)."""


def _read_npy(path: Path) -> Image:
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head != NPY_MAGIC:
        raise ImageReadError(f"{path}: not a NumPy .npy file (it does not start with the .npy magic string)")
    return Image(np.load(path, allow_pickle=False), None, path)


def read_image(path: str | Path) -> Image:
    """Read one image file (see the module docstring for the formats).

    Parameters
    ----------
    path : str or Path
        A file ending in one of :data:`IMAGE_SUFFIXES` (a ``.zspy`` store is a folder).

    Returns
    -------
    Image
        2-D frame or 3-D stack; ``pixel_size_A`` in Angstrom when the file records a length unit.

    Raises
    ------
    ImageReadError
        Missing file, unsupported suffix, a file the reader cannot parse, a RosettaSciIO format without
        RosettaSciIO installed (the message says how to install it), a file with no 2-D image, or data that
        is not a 2-D frame or 3-D stack of real numbers.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not (path.is_file() or (suffix in FOLDER_SUFFIXES and path.is_dir())):
        raise ImageReadError(f"{path}: no such file")
    readers = {".png": _read_png, ".tif": _read_tiff, ".tiff": _read_tiff, ".hspy": _read_hspy,
               ".hdf5": _read_hspy, ".h5": _read_hspy,
               ".npy": _read_npy, **{k: _read_rsciio for k in RSCIIO_SUFFIXES}}
    reader = readers.get(suffix)
    if reader is None:
        raise ImageReadError(f"{path}: unsupported file type {suffix!r}; expected one of {IMAGE_SUFFIXES}")
    try:
        img = reader(path)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    if img.data.ndim not in (2, 3) or img.data.dtype.kind not in "uif" or min(img.data.shape) == 0:
        raise ImageReadError(f"{path}: holds {img.data.dtype} data of shape {img.data.shape}; need a 2-D frame or a "
                             "3-D stack of real numbers")
    if img.data.dtype == np.float16:  # half floats (e.g. HyperSpy files) widen exactly to float32
        img.data = img.data.astype(np.float32)
    return img


def image_files(paths, empty: list[str] | None = None) -> list[Path]:
    """Expand files and folders into the image files they hold (folders: sorted, by suffix). A folder with a
    suffix of :data:`FOLDER_SUFFIXES` (a ``.zspy`` Zarr store) is one image file, not a folder of them.

    Parameters
    ----------
    paths : iterable of path-like
    empty : list of str, optional
        Receives a one-line message for each folder that holds no image file (its files are not
        images, or it is empty); such a folder adds nothing to the result.

    Returns
    -------
    list of Path
    """
    out = []
    for p in map(Path, paths):
        if p.is_dir() and p.suffix.lower() not in FOLDER_SUFFIXES:
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES
                           and (q.is_file() or (q.is_dir() and q.suffix.lower() in FOLDER_SUFFIXES)))
            if not found and empty is not None:
                empty.append(f"{p}: a folder with no image files ({' '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        else:
            out.append(p)
    return out
