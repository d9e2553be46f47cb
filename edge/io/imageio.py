"""Reading STEM images from files: TIFF, PNG, NumPy ``.npy`` and HyperSpy ``.hspy`` / ``.hdf5``.

Every reader returns an :class:`Image`: the pixels as a 2-D frame or a 3-D stack of frames ``(n, rows,
cols)`` and, when the file records it, the pixel size in Angstrom. Colour images are converted to
luminance (ITU-R BT.601 weights, as Pillow's ``convert("L")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".hspy", ".hdf5", ".h5")
"""File name endings :func:`read_image` understands."""

_UNIT_TO_A = {"nm": 10.0, "Å": 1.0, "A": 1.0, "angstrom": 1.0, "ang": 1.0, "pm": 0.01, "um": 1e4, "µm": 1e4,
              "micron": 1e4}


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
    """

    data: np.ndarray
    pixel_size_A: float | None
    path: Path

    @property
    def frames(self) -> np.ndarray:
        """The data as a stack ``(n, rows, cols)``."""
        return self.data[None] if self.data.ndim == 2 else self.data


def _unit_scale(unit) -> float | None:
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
        scale = _unit_scale(ij.get("unit"))
        page = tf.pages[0]
        xres = page.tags.get("XResolution")
        if scale and xres is not None:
            num, den = xres.value
            if num > 0:
                size = scale * den / num
    if data.ndim == 3 and data.shape[-1] in (3, 4):
        data = (data[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.float32)
    return Image(data, size, path)


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
        if sig:
            scale = _unit_scale(sig[-1].get("units"))
            if scale:
                size = float(sig[-1].get("scale", 1.0)) * scale
    return Image(data, size, path)


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

    Raises
    ------
    ImageReadError
        Missing file, unsupported suffix, a file the reader cannot parse, or data that is not a 2-D
        frame or 3-D stack of real numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    suffix = path.suffix.lower()
    readers = {".png": _read_png, ".tif": _read_tiff, ".tiff": _read_tiff, ".hspy": _read_hspy,
               ".hdf5": _read_hspy, ".h5": _read_hspy,
               ".npy": _read_npy}
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
    """Expand files and folders into the image files they hold (folders: sorted, by suffix).

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
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found and empty is not None:
                empty.append(f"{p}: a folder with no image files ({' '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        else:
            out.append(p)
    return out
