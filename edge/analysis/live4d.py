"""4D-STEM reductions computed live, frame by frame: virtual detectors, centre of mass, DPC.

In 4D-STEM a pixelated detector records one diffraction pattern (a *frame*, ``(det_rows, det_cols)``) per
probe position. Reducing each frame to a few numbers as it arrives gives live images of the scan:

- **virtual detectors**: the sum of the frame over a mask with weights. A disk around the direct beam is a
  virtual bright field (BF) detector, an annulus outside it an annular dark field (ADF) detector; any
  weight image works (:func:`disk_mask`, :func:`annulus_mask`, :func:`quadrant_masks`).
- **centre of mass** (CoM) of the frame relative to a reference point, in detector pixels: proportional to
  the momentum transfer, and so to the projected electric field of the specimen (first-moment or CoM
  DPC; Müller et al., Nat. Commun. 5, 5653 (2014); Lazić, Bosch & Lazar, Ultramicroscopy 160, 265 (2016)).
- **segmented DPC**: differences of opposite quadrants of an annular detector normalised by their sum,
  ``(A - C) / (A + B + C + D)`` and ``(B - D) / (A + B + C + D)`` (Dekkers & de Lang, Optik 41, 452 (1974)).
- **iDPC**: the CoM field integrated to the projected potential in Fourier space (:func:`integrate_com`;
  Lazić et al. 2016).

Masks are stored sparse (CSR: the pixels and weights of each detector), so a stack of frames is reduced
by one numba call that touches only the masked pixels (:func:`virtual_stack`, :func:`com_stack`).
:class:`LiveImager` assembles the results into images of the scan as
:class:`beamloop.streams.dectris.receiver.FrameStack`
batches arrive. When a CUDA device is present (``numba.cuda.is_available()``) the same reductions run on it
(:func:`virtual_stack_cuda`, :func:`com_stack_cuda`); otherwise the CPU kernels run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import cuda

from beamloop.edge.kernels import fourd

# --- masks ---------------------------------------------------------------------------------------------------


def _radius(shape: tuple[int, int], centre: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = shape
    cy, cx = ((rows - 1) / 2, (cols - 1) / 2) if centre is None else centre
    yy, xx = np.mgrid[0:rows, 0:cols]
    return np.hypot(yy - cy, xx - cx), yy - cy, xx - cx


def disk_mask(shape: tuple[int, int], radius: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    """Weights of a disk detector (e.g. virtual BF): 1 where the pixel centre lies within ``radius``.

    Parameters
    ----------
    shape : (rows, cols)
        Detector shape, pixels.
    radius : float
        Detector pixels.
    centre : (row, col), optional
        Disk centre in detector pixels; the detector centre by default.

    Returns
    -------
    ndarray (rows, cols), float32
    """
    r, _, _ = _radius(shape, centre)
    return (r <= radius).astype(np.float32)


def annulus_mask(shape: tuple[int, int], r_inner: float, r_outer: float,
                 centre: tuple[float, float] | None = None) -> np.ndarray:
    """Weights of an annular detector (e.g. virtual ADF): 1 for ``r_inner < r <= r_outer`` (detector pixels).

    Raises ``ValueError`` when ``r_outer <= r_inner``.
    """
    if not r_outer > r_inner:
        raise ValueError(f"annulus needs r_outer > r_inner, got {r_inner}, {r_outer}")
    r, _, _ = _radius(shape, centre)
    return ((r > r_inner) & (r <= r_outer)).astype(np.float32)


def quadrant_masks(shape: tuple[int, int], r_inner: float, r_outer: float, centre: tuple[float, float] | None = None,
                   rotation_deg: float = 0.0) -> np.ndarray:
    """Four quadrants A, B, C, D of an annular segmented DPC detector.

    Quadrant A is centred on +x (columns), B on +y (rows), C on -x, D on -y, after rotating by
    ``rotation_deg`` (counter-clockwise in (x, y)).

    Returns
    -------
    ndarray (4, rows, cols), float32
    """
    ring = annulus_mask(shape, r_inner, r_outer, centre)
    _, dy, dx = _radius(shape, centre)
    ang = (np.degrees(np.arctan2(dy, dx)) - rotation_deg + 45.0) % 360.0
    return np.stack([ring * ((ang >= 90 * k) & (ang < 90 * (k + 1))) for k in range(4)]).astype(np.float32)


@dataclass(frozen=True)
class SparseMasks:
    """Detectors as CSR: detector ``k`` has pixels ``pix[start[k]:start[k+1]]`` (flat indices) with ``weight``.

    Build with :meth:`from_dense`.
    """

    names: tuple[str, ...]
    shape: tuple[int, int]
    start: np.ndarray  # (K + 1,) int64
    pix: np.ndarray  # (M,) int64
    weight: np.ndarray  # (M,) float32

    @classmethod
    def from_dense(cls, masks: dict[str, np.ndarray]) -> SparseMasks:
        """From named weight images, all of one detector shape (zero weights are left out).

        Raises ``ValueError`` for masks of different shapes, non-finite weights, or no masks.
        """
        if not masks:
            raise ValueError("no masks given")
        shapes = {np.shape(m) for m in masks.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"masks must be 2-D and of one shape, got {sorted(shapes)}")
        start, pix, weight = [0], [], []
        for m in masks.values():
            m = np.asarray(m, np.float32).ravel()
            if not np.isfinite(m).all():
                raise ValueError("mask weights must be finite")
            nz = np.flatnonzero(m)
            pix.append(nz)
            weight.append(m[nz])
            start.append(start[-1] + len(nz))
        return cls(tuple(masks), next(iter(shapes)), np.asarray(start, np.int64),
                   np.concatenate(pix).astype(np.int64), np.concatenate(weight).astype(np.float32))

    @property
    def runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The masks as runs of consecutive flat pixels with one weight: ``(detector, start, length, weight)``.

        A disk or annulus has at most two runs per detector row, so a detector sums contiguous memory.
        """
        cached = self.__dict__.get("_runs")
        if cached is not None:
            return cached
        det, start, length, weight = [], [], [], []
        for k in range(len(self.names)):
            pix = self.pix[self.start[k]:self.start[k + 1]]
            w = self.weight[self.start[k]:self.start[k + 1]]
            if len(pix) == 0:
                continue
            brk = np.flatnonzero((np.diff(pix) != 1) | (np.diff(w) != 0)) + 1
            first = np.concatenate([[0], brk])
            last = np.concatenate([brk, [len(pix)]])
            det.append(np.full(len(first), k, np.int64))
            start.append(pix[first])
            length.append(last - first)
            weight.append(w[first].astype(np.float64))
        runs = tuple(np.concatenate(v) if v else np.empty(0, t) for v, t in
                     zip((det, start, length, weight), (np.int64, np.int64, np.int64, np.float64)))
        object.__setattr__(self, "_runs", runs)
        return runs







def virtual_stack(frames: np.ndarray, masks: SparseMasks, out: np.ndarray | None = None) -> np.ndarray:
    """Virtual detector signals of a stack of frames.

    Parameters
    ----------
    frames : ndarray (n, rows, cols), uint8/uint16/uint32/float32, C-contiguous
        Diffraction patterns (counts).
    masks : SparseMasks
        ``K`` detectors of shape (rows, cols).
    out : ndarray (n, K), float64, optional

    Returns
    -------
    ndarray (n, K), float64
        Weighted sums, counts.

    Raises
    ------
    ValueError
        Frame shape different from the masks'.
    """
    n = frames.shape[0]
    if frames.shape[1:] != masks.shape:
        raise ValueError(f"frames of shape {frames.shape[1:]}, masks of shape {masks.shape}")
    if out is None:
        out = np.empty((n, len(masks.names)), np.float64)
    r = masks.runs
    kernel = fourd.virtual_runs_int if np.issubdtype(frames.dtype, np.integer) else fourd.virtual_runs
    kernel(np.ascontiguousarray(frames).reshape(n, -1), r[0], r[1], r[2], r[3], out)
    return out




def com_stack(frames: np.ndarray, centre: tuple[float, float], pixels: np.ndarray | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """Total counts and centre of mass of each frame, relative to ``centre``.

    Parameters
    ----------
    frames : ndarray (n, rows, cols)
    centre : (row, col)
        Reference point (the unscattered beam's centre), detector pixels.
    pixels : ndarray (M,), int64, optional
        Flat indices of the pixels to include (e.g. a disk around the BF disk to keep far dark-field noise
        out); all pixels by default.
    out : ndarray (n, 3), float64, optional

    Returns
    -------
    ndarray (n, 3), float64
        ``[sum, com_row, com_col]``: counts and CoM shift in detector pixels (0 for an empty frame).
    """
    n, rows, cols = frames.shape
    if pixels is None:
        pixels = np.arange(rows * cols, dtype=np.int64)
    if out is None:
        out = np.empty((n, 3), np.float64)
    fourd.com_sums(np.ascontiguousarray(frames).reshape(n, -1), cols, np.asarray(pixels, np.int64), float(centre[0]),
                float(centre[1]), out)
    return out


# --- on a CUDA device (when one is present) ---------------------------------------------------------------






def cuda_available() -> bool:
    """True when numba finds a usable CUDA device."""
    try:
        return bool(cuda.is_available())
    except Exception:  # driver libraries absent or broken
        return False


def virtual_stack_cuda(frames: np.ndarray, masks: SparseMasks) -> np.ndarray:  # pragma: no cover - needs CUDA
    """:func:`virtual_stack` on the CUDA device (one thread per frame and detector). Raises
    ``RuntimeError`` without a device."""
    if not cuda_available():
        raise RuntimeError("no CUDA device (numba.cuda.is_available() is False)")
    n = frames.shape[0]
    d_flat = cuda.to_device(np.ascontiguousarray(frames).reshape(n, -1))
    d_out = cuda.device_array((n, len(masks.names)), np.float64)
    tpb = (64, 4)
    grid = ((n + tpb[0] - 1) // tpb[0], (len(masks.names) + tpb[1] - 1) // tpb[1])
    fourd.virtual_cuda[grid, tpb](d_flat, cuda.to_device(masks.start), cuda.to_device(masks.pix),
                                    cuda.to_device(masks.weight), d_out)
    return d_out.copy_to_host()


def com_stack_cuda(frames: np.ndarray, centre: tuple[float, float], pixels: np.ndarray | None = None
                   ) -> np.ndarray:  # pragma: no cover - needs CUDA
    """:func:`com_stack` on the CUDA device (one thread per frame). Raises ``RuntimeError`` without a device."""
    if not cuda_available():
        raise RuntimeError("no CUDA device (numba.cuda.is_available() is False)")
    n, rows, cols = frames.shape
    if pixels is None:
        pixels = np.arange(rows * cols, dtype=np.int64)
    d_out = cuda.device_array((n, 3), np.float64)
    fourd.com_cuda[(n + 127) // 128, 128](cuda.to_device(np.ascontiguousarray(frames).reshape(n, -1)), cols,
                                            cuda.to_device(np.asarray(pixels, np.int64)), float(centre[0]),
                                            float(centre[1]), d_out)
    return d_out.copy_to_host()


# --- assembling live images ------------------------------------------------------------------------------------




class LiveImager:
    """Live images of a 4D-STEM scan, filled in as frame stacks arrive.

    Frame ``image_id`` belongs to probe position ``image_id % (rows * cols)`` in raster order (row-major,
    fast axis along columns), as a DECTRIS detector triggered once per probe position numbers them.

    Parameters
    ----------
    scan_shape : (rows, cols)
        Probe positions of the scan.
    masks : dict name -> ndarray (det_rows, det_cols)
        Virtual detectors (weights).
    com_centre : (row, col), optional
        Reference point for centre of mass; ``None`` skips CoM images.
    com_radius : float, optional
        Only pixels within this radius of ``com_centre`` enter the CoM (detector pixels); all by default.
    device : {"auto", "cpu", "cuda"}
        Where the reductions run; ``auto`` picks CUDA when a device is present.

    Attributes
    ----------
    images : dict name -> ndarray (rows, cols), float64
        One image per mask, plus ``com_row``, ``com_col`` and ``com_sum`` when CoM is on, and ``dpc_x``,
        ``dpc_y`` when the masks include ``A``, ``B``, ``C``, ``D`` (see :meth:`dpc`). NaN where no frame
        has arrived yet.
    filled : int
        Probe positions seen.

    Raises
    ------
    ValueError
        Non-positive scan shape, bad masks, or ``device="cuda"`` without a device.
    """

    def __init__(self, scan_shape: tuple[int, int], masks: dict[str, np.ndarray], *,
                 com_centre: tuple[float, float] | None = None, com_radius: float | None = None,
                 device: str = "auto") -> None:
        rows, cols = (int(v) for v in scan_shape)
        if rows <= 0 or cols <= 0:
            raise ValueError(f"scan shape must be positive, got {scan_shape}")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        if device == "cuda" and not cuda_available():
            raise ValueError("device='cuda' but numba finds no CUDA device")
        self.use_cuda = device == "cuda" or (device == "auto" and cuda_available())
        self.scan_shape = (rows, cols)
        self.masks = SparseMasks.from_dense(masks)
        self.com_centre = com_centre
        det = self.masks.shape
        if com_centre is not None and com_radius is not None:
            r, _, _ = _radius(det, com_centre)
            self._com_pix = np.flatnonzero(r.ravel() <= com_radius).astype(np.int64)
        else:
            self._com_pix = np.arange(det[0] * det[1], dtype=np.int64)
        self._names = list(self.masks.names) + (["com_sum", "com_row", "com_col"] if com_centre is not None else [])
        self._flat = np.full((len(self._names), rows * cols), np.nan)
        self._seen = np.zeros(rows * cols, bool)
        self._values = np.empty((0, len(self._names)))

    @property
    def images(self) -> dict[str, np.ndarray]:
        """Current images by name (views, shape ``scan_shape``)."""
        out = {name: self._flat[k].reshape(self.scan_shape) for k, name in enumerate(self._names)}
        if all(q in out for q in "ABCD"):
            out["dpc_x"], out["dpc_y"] = self.dpc()
        return out

    @property
    def filled(self) -> int:
        """Probe positions that have received a frame."""
        return int(self._seen.sum())

    def update(self, frames: np.ndarray, image_ids: np.ndarray) -> None:
        """Reduce a stack of frames and write the results at their probe positions.

        Parameters
        ----------
        frames : ndarray (n, det_rows, det_cols)
        image_ids : ndarray (n,), int
            Frame ids (0-based, raster order); ids beyond one scan wrap around (a repeated scan).

        Raises
        ------
        ValueError
            Detector shape different from the masks', or ids and frames of different lengths.
        """
        n = len(image_ids)
        if frames.shape[0] != n:
            raise ValueError(f"{frames.shape[0]} frames but {n} image ids")
        if self._values.shape[0] < n:
            self._values = np.empty((n, len(self._names)))
        vals = self._values[:n]
        k = len(self.masks.names)
        if self.use_cuda:  # pragma: no cover - needs a CUDA device
            vals[:, :k] = virtual_stack_cuda(frames, self.masks)
            if self.com_centre is not None:
                vals[:, k:] = com_stack_cuda(frames, self.com_centre, self._com_pix)
        else:
            vals[:, :k] = virtual_stack(frames, self.masks)
            if self.com_centre is not None:
                vals[:, k:] = com_stack(frames, self.com_centre, self._com_pix)
        fourd.scatter_rows(np.asarray(image_ids, np.int64), vals, self._seen.size, self._flat, self._seen)

    def update_stack(self, stack) -> None:
        """:meth:`update` from a :class:`beamloop.streams.dectris.receiver.FrameStack` (its first channel)."""
        self.update(stack.frames, stack.image_ids)

    def dpc(self) -> tuple[np.ndarray, np.ndarray]:
        """Segmented DPC images ``((A - C) / S, (B - D) / S)`` with ``S = A + B + C + D`` (NaN where S = 0).

        Raises ``KeyError`` unless masks named ``A``, ``B``, ``C``, ``D`` (:func:`quadrant_masks`) are present.
        """
        q = {name: self._flat[self._names.index(name)] for name in "ABCD"}
        s = q["A"] + q["B"] + q["C"] + q["D"]
        with np.errstate(invalid="ignore", divide="ignore"):
            dx = np.where(s > 0, (q["A"] - q["C"]) / s, np.nan)
            dy = np.where(s > 0, (q["B"] - q["D"]) / s, np.nan)
        return dx.reshape(self.scan_shape), dy.reshape(self.scan_shape)


def integrate_com(com_row: np.ndarray, com_col: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Integrated DPC (iDPC): the scalar field whose gradient best matches the CoM field, by Fourier integration.

    Solves ``grad(phi) = (com_row, com_col)`` in the least-squares sense:
    ``phi = F^-1[(k_y F[com_row] + k_x F[com_col]) / (2 pi i |k|^2)]`` (Lazić, Bosch & Lazar,
    Ultramicroscopy 160, 265 (2016)), with periodic boundaries and the mean set to zero.

    Parameters
    ----------
    com_row, com_col : ndarray (rows, cols), float
        CoM shift images (detector pixels, or any unit proportional to the projected field); NaN not allowed.
    eps : float
        Regularisation of ``|k|^2`` near zero frequency, in cycles per probe position squared.

    Returns
    -------
    ndarray (rows, cols), float64
        Proportional to the projected potential (arbitrary units), up to the sign set by the detector's
        rotation relative to the scan.

    Raises
    ------
    ValueError
        Shapes differ or the images contain NaN.
    """
    gy, gx = np.asarray(com_row, float), np.asarray(com_col, float)
    if gy.shape != gx.shape or gy.ndim != 2:
        raise ValueError(f"CoM images must be 2-D and of one shape, got {gy.shape}, {gx.shape}")
    if not (np.isfinite(gy).all() and np.isfinite(gx).all()):
        raise ValueError("CoM images contain NaN or inf (unfilled probe positions?)")
    ky = np.fft.fftfreq(gy.shape[0])[:, None]
    kx = np.fft.fftfreq(gy.shape[1])[None, :]
    k2 = ky ** 2 + kx ** 2
    num = ky * np.fft.fft2(gy) + kx * np.fft.fft2(gx)
    phi = np.fft.ifft2(num / (2j * math.pi * (k2 + eps * eps)))
    phi = phi.real
    return phi - phi.mean()
