"""The preprocess stage: a separable Gaussian smoothing (a matched filter for the columns) and a noise estimate.

All work happens in buffers allocated once per frame shape (:class:`Preprocessor`); the per-frame path
allocates nothing. Kernels: :mod:`beamloop.edge.kernels.smooth`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from beamloop.edge.frame.stage import FrameError, StageBase
from beamloop.edge.kernels.smooth import gaussian_kernel, noise_sigma, smooth_separable

if TYPE_CHECKING:
    from beamloop.edge.frame.context import FrameContext, FrameMeta
    from beamloop.edge.stages.find import FinderConfig


class Preprocessor:
    """Smooths frames with a Gaussian and estimates their noise, in preallocated buffers.

    Parameters
    ----------
    sigma_px : float
        Gaussian sigma, pixels. For atomic columns, a matched filter: about the column's own sigma
        (e.g. 0.3 Angstrom / pixel size).
    noise_row_step : int
        Evaluate the noise estimate on every n-th row (see :func:`~beamloop.edge.kernels.smooth.noise_sigma`).

    Raises
    ------
    ValueError
        A sigma that is not a positive finite number.

    Notes
    -----
    Buffers are (re)allocated when the frame shape changes; the array returned by :meth:`run` is
    reused by the next call. Integer frames are read as they are (converted to float32 on the fly).
    Frames are not validated here: the frame path checks each frame once
    (:func:`beamloop.edge.frame.stage.check_frame`).
    """

    def __init__(self, sigma_px: float, noise_row_step: int = 2) -> None:
        self.sigma_px = float(sigma_px)
        self.kernel = gaussian_kernel(sigma_px)
        self.noise_row_step = int(noise_row_step)
        self._shape: tuple[int, ...] | None = None

    def allocate(self, shape: tuple[int, int]) -> None:
        """Buffers for frames of ``shape``.

        Raises
        ------
        FrameError
            Frames of this shape are smaller than the smoothing kernel.
        """
        if min(shape) < self.kernel.shape[0] // 2 + 1:
            raise FrameError(f"frame {tuple(shape)} is smaller than the smoothing kernel ({self.kernel.shape[0]} px)")
        self.smooth = np.empty(shape, np.float32)
        self._tmp = np.empty(shape, np.float32)
        self._row = np.empty(shape[1] + self.kernel.shape[0] - 1, np.float32)
        self._noise_rows = np.empty((3, shape[1]), np.float64)
        self._shape = (int(shape[0]), int(shape[1]))

    def run(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        """Smooth one frame and estimate its noise.

        Parameters
        ----------
        frame : ndarray, shape (rows, cols), integer or float32/float64 dtype
            Detector counts or intensities (a frame that passed ``check_frame``).

        Returns
        -------
        smooth : ndarray (rows, cols) float32
            The Gaussian-smoothed frame (a reused buffer).
        noise : float
            Noise standard deviation of the raw frame (Immerkaer's estimate).

        Raises
        ------
        FrameError
            The frame is smaller than the smoothing kernel.
        """
        if self._shape != frame.shape:
            self.allocate(frame.shape)
        smooth_separable(frame, self.kernel, self._row, self._tmp, self.smooth)
        return self.smooth, float(noise_sigma(frame, self.noise_row_step, self._noise_rows))


class Preprocess(StageBase):
    """Frame stage ``preprocess``: writes ``smooth`` (float32, the frame's shape) and ``noise`` (raw-frame sigma).

    Parameters
    ----------
    config : FinderConfig, optional
        Fixed finder parameters (their ``sigma_px``); by default derived from each series' metadata
        (:meth:`beamloop.edge.stages.find.FinderConfig.for_meta`).
    from_background : bool
        Smooth the background stage's ``extras["frame"]`` (:mod:`beamloop.edge.stages.background`) instead of
        the frame.
    """

    name = "preprocess"
    reads: tuple[str, ...] = ("image",)
    writes = ("smooth", "noise")

    pre: Preprocessor
    """The smoother of the current series (made by :meth:`prepare`)."""

    def __init__(self, config: FinderConfig | None = None, from_background: bool = False) -> None:
        self.config = config
        self.from_background = bool(from_background)
        if from_background:
            self.reads = ("image", "extras")

    def prepare(self, meta: FrameMeta) -> None:
        """A :class:`Preprocessor` for the series' scale, with buffers for its shape.

        Raises
        ------
        FrameError
            No scale for the series, or frames smaller than the kernel.
        """
        from beamloop.edge.stages.find import FinderConfig

        cfg = self.config or FinderConfig.for_meta(meta)
        if getattr(self, "pre", None) is None or self.pre.sigma_px != cfg.sigma_px:
            self.pre = Preprocessor(cfg.sigma_px)
        self.pre.allocate(meta.shape)

    def process(self, ctx: FrameContext) -> None:
        """``ctx.smooth, ctx.noise`` from ``ctx.image`` (or the background stage's ``extras["frame"]``)."""
        ctx.smooth, ctx.noise = self.pre.run(ctx.extras["frame"] if self.from_background else ctx.image)
