"""The preprocess stage on an NVIDIA GPU: :class:`GpuPreprocessor`, the CUDA twin of
:class:`beamloop.edge.stages.preprocess.Preprocessor` (kernels: :mod:`beamloop.edge.kernels.cuda_smooth`)."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from beamloop.edge.frame.stage import FrameError
from beamloop.edge.kernels.cuda_smooth import THREADS_1D, THREADS_2D, noise_sum, smooth_cols, smooth_rows
from beamloop.edge.kernels.smooth import gaussian_kernel


class GpuPreprocessor:
    """:class:`beamloop.edge.stages.preprocess.Preprocessor` on a CUDA device (numba): Gaussian smoothing and noise
    sigma,
    device buffers allocated once per frame shape.

    Parameters
    ----------
    sigma_px : float
        Gaussian sigma, pixels (:func:`beamloop.edge.kernels.smooth.gaussian_kernel`).
    noise_row_step : int
        As :class:`beamloop.edge.stages.preprocess.Preprocessor`.

    Raises
    ------
    RuntimeError
        No CUDA device (``numba.cuda.is_available()`` is False).
    """

    def __init__(self, sigma_px: float, noise_row_step: int = 2) -> None:
        if not cuda.is_available():
            raise RuntimeError("no CUDA device (numba.cuda.is_available() is False)")
        self.kernel = gaussian_kernel(sigma_px)
        self.d_kernel = cuda.to_device(self.kernel)
        self.noise_row_step = int(noise_row_step)
        self._key: tuple | None = None
        self.smooth: np.ndarray = np.empty((0, 0), np.float32)

    def _allocate(self, shape, dtype) -> None:
        self.d_src = cuda.device_array(shape, dtype)
        self.d_tmp = cuda.device_array(shape, np.float32)
        self.d_dst = cuda.device_array(shape, np.float32)
        self.d_acc = cuda.device_array(1, np.float64)
        self.smooth = cuda.pinned_array(shape, np.float32) if hasattr(cuda, "pinned_array") else np.empty(shape,
                                                                                                          np.float32)
        self._zero = np.zeros(1, np.float64)
        self._key = (shape, np.dtype(dtype))

    def upload(self, frame: np.ndarray) -> None:
        """Copy ``frame`` ((rows, cols), integer or float32/float64) to the device.

        Raises ``beamloop.edge.frame.stage.FrameError`` for a frame that is not 2-D or smaller than 3 x 3."""
        if frame.ndim != 2 or min(frame.shape) < max(3, self.kernel.shape[0] // 2 + 1):
            raise FrameError(f"frame of shape {frame.shape} cannot be smoothed with a "
                             f"{self.kernel.shape[0]}-tap kernel")
        if self._key != (frame.shape, frame.dtype):
            self._allocate(frame.shape, frame.dtype)
        self.d_src.copy_to_device(np.ascontiguousarray(frame))

    def run_device(self) -> None:
        """Smooth the uploaded frame and sum the noise operator on the device (then synchronise)."""
        rows, cols = self.d_src.shape
        grid = (math.ceil(rows / THREADS_2D[0]), math.ceil(cols / THREADS_2D[1]))
        smooth_rows[grid, THREADS_2D](self.d_src, self.d_kernel, self.d_tmp)
        smooth_cols[grid, THREADS_2D](self.d_tmp, self.d_kernel, self.d_dst)
        self.d_acc.copy_to_device(self._zero)
        nr = (rows - 2 + self.noise_row_step - 1) // self.noise_row_step
        blocks = max(min(math.ceil(nr * (cols - 2) / THREADS_1D), 1024), 1)
        noise_sum[blocks, THREADS_1D](self.d_src, self.noise_row_step, self.d_acc)
        cuda.synchronize()

    def download(self) -> tuple[np.ndarray, float]:
        """The smoothed frame ((rows, cols) float32, a reused host buffer) and the noise sigma."""
        rows, cols = self.d_src.shape
        self.d_dst.copy_to_host(self.smooth)
        acc = float(self.d_acc.copy_to_host()[0])
        nr = (rows - 2 + self.noise_row_step - 1) // self.noise_row_step
        return self.smooth, math.sqrt(math.pi / 2.0) * acc / (6.0 * nr * (cols - 2))

    def run(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        """Upload, process and download one frame: ``(smooth, noise)`` as :meth:`Preprocessor.run` returns."""
        self.upload(frame)
        self.run_device()
        return self.download()
