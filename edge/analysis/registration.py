"""Sub-pixel frame-to-frame registration: cross-correlation peak refined by a local upsampled DFT.

M. Guizar-Sicairos, S. T. Thurman & J. R. Fienup, "Efficient subpixel image registration algorithms", Opt. Lett.
33, 156-158 (2008): the integer peak of the cross-correlation from one inverse FFT, then the correlation
evaluated on a fine grid (1 / ``upsample`` pixel) around it by a matrix-multiply DFT. Here the spectra are real
FFTs (half the frequencies; the correlation of real images is real, so the other half is their complex
conjugate), each frame's spectrum is computed once and kept for the next frame, and the upsampled DFT sums
only the frequencies up to ``band`` (cycles per pixel): a lattice image's shift is carried by its Bragg
frequencies, and the matrices then have a size fixed by the lattice, not by the frame (a 1024 x 1024 frame
costs what a 256 x 256 one costs). Unnormalised cross-correlation, as scikit-image's
``phase_cross_correlation(..., normalization=None)``. The FFTs are scipy's (pocketfft, one thread); they return
new spectra (scipy.fft has no output argument; numpy's, which has, was 5x slower here at 1024 x 1024).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft as sfft


class Registrar:
    """Registers each frame against the previous one (:meth:`push`).

    Parameters
    ----------
    shape : (rows, cols)
        Frame shape, pixels (at least 8 x 8).
    upsample : int
        Precision 1 / ``upsample`` pixel (>= 1).
    band : float
        Highest frequency (cycles per pixel, in (0, 0.5]) the sub-pixel refinement uses.

    Raises
    ------
    ValueError
        A shape below 8 x 8, ``upsample`` below 1 or ``band`` outside (0, 0.5].
    """

    def __init__(self, shape: tuple[int, int], upsample: int = 20, band: float = 0.5) -> None:
        rows, cols = (int(shape[0]), int(shape[1]))
        if rows < 8 or cols < 8:
            raise ValueError(f"frames to register must be at least 8 x 8 pixels, got {rows} x {cols}")
        if not (isinstance(upsample, int) and upsample >= 1):
            raise ValueError(f"upsample must be a whole number >= 1, got {upsample!r}")
        if not 0 < band <= 0.5:
            raise ValueError(f"band must lie in (0, 0.5] cycles per pixel, got {band}")
        self.shape = (rows, cols)
        self.upsample = upsample
        self.band = float(band)
        self._prev: np.ndarray | None = None
        self._prev_energy = 0.0
        ky = min(int(math.ceil(band * rows)), rows // 2)
        kx = min(int(math.ceil(band * cols)), cols // 2)
        # frequencies kept: rows 0..ky and -ky..-1 of the half spectrum, columns 0..kx
        self._rows_kept = np.r_[0:ky + 1, rows - ky:rows] if ky < rows // 2 else np.arange(rows)
        self._cols_kept = np.arange(kx + 1)
        fy = sfft.fftfreq(rows)[self._rows_kept]  # cycles per pixel
        fx = np.arange(kx + 1) / cols
        w = np.full(kx + 1, 2.0)  # Hermitian weights of the half spectrum
        w[0] = 1.0
        if cols % 2 == 0 and kx == cols // 2:
            w[-1] = 1.0
        self._w = w
        m = int(math.ceil(1.5 * upsample))
        self._offsets = (np.arange(m) - m // 2) / upsample  # pixels around the integer peak
        self._fy, self._fx = fy, fx

    def reset(self) -> None:
        """Forget the previous frame (the next :meth:`push` registers nothing)."""
        self._prev = None

    def push(self, image: np.ndarray) -> tuple[np.ndarray, float] | None:
        """Register ``image`` against the previous frame and keep it for the next.

        Parameters
        ----------
        image : ndarray (rows, cols) float32 or float64
            The frame, mean-subtracted and windowed by the caller.

        Returns
        -------
        ((dx, dy), error) or None
            How far the content moved since the previous frame (pixels, x along columns, y along rows, to
            1 / ``upsample``), and ``1 - rho^2`` with ``rho`` the normalised correlation at the integer peak;
            None for the first frame.

        Raises
        ------
        ValueError
            A frame of another shape than the registrar's.
        """
        if image.shape != self.shape:
            raise ValueError(f"frame shape {image.shape} differs from the registrar's {self.shape}")
        spec = sfft.rfft2(image, workers=1)
        energy = float(np.vdot(image.ravel(), image.ravel()).real)
        prev, prev_energy = self._prev, self._prev_energy
        self._prev, self._prev_energy = spec, energy
        if prev is None:
            return None
        cross = np.conj(prev)
        cross *= spec  # R(k) = conj(F_prev) F_cur: the correlation peaks at the content's displacement
        cc = sfft.irfft2(cross, s=self.shape, workers=1)
        iy, ix = np.unravel_index(int(np.argmax(cc)), cc.shape)
        rows, cols = self.shape
        peak = float(cc[iy, ix])
        y0 = iy - rows if iy > rows // 2 else iy
        x0 = ix - cols if ix > cols // 2 else ix
        rho2 = peak * peak / (prev_energy * energy) if prev_energy > 0 and energy > 0 else 0.0
        # the correlation on a 1 / upsample grid around the integer peak, from the kept frequencies
        r = cross[np.ix_(self._rows_kept, self._cols_kept)] * self._w
        ty = y0 + self._offsets
        tx = x0 + self._offsets
        ey = np.exp(2j * np.pi * np.outer(ty, self._fy))  # (m, ky)
        ex = np.exp(2j * np.pi * np.outer(self._fx, tx))  # (kx, m)
        fine = (ey @ r @ ex).real
        jy, jx = np.unravel_index(int(np.argmax(fine)), fine.shape)
        return np.array([tx[jx], ty[jy]], np.float64), float(max(0.0, 1.0 - rho2))
