"""The background stage: a smooth background (support film, particle envelope, thickness gradient) removed
before the finder smooths the frame.

Method: :mod:`beamloop.edge.kernels.background` -- the 10 % quantile of the frame in blocks of about one
lattice period (:data:`BLOCK_PERIODS` times the finder's background window), smoothed once over 3 x 3 blocks
(so the surface follows the envelope on a scale of about three periods, and not the columns), interpolated
bilinearly and subtracted. The corrected frame (float32, a buffer of this stage) is written to
``extras["frame"]``, where the preprocess stage reads it; when the stage is inactive ``extras["frame"]``
is the frame itself (no copy).

The stage is on for series without a pixel size (image files, uncalibrated streams: mode ``"auto"``) or
when asked for (``"on"``); at 256 x 256 it costs about a tenth of a millisecond, measured in
``bench/results/atom_finding_real.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from beamloop.edge.frame.stage import StageBase
from beamloop.edge.kernels.background import (
    block_quantiles,
    column_weights,
    grid_shape,
    smooth_grid,
    subtract_surface,
)

if TYPE_CHECKING:
    from beamloop.edge.frame.context import FrameContext, FrameMeta
    from beamloop.edge.stages.find import FinderConfig

MODES = ("auto", "on", "off")
"""``auto``: on for series without a pixel size; ``on``; ``off``."""

BLOCK_PERIODS = 2.0
"""Block side as a multiple of the finder's background half-width (about 0.5-0.9 lattice periods)."""

QUANTILE = 0.1
"""Quantile of each block taken as its background level."""


class BackgroundSubtractor:
    """The background surface of frames of one shape, in preallocated buffers.

    Parameters
    ----------
    block_px : int
        Block side, pixels (>= 4).
    quantile : float
        Block quantile in [0, 1].
    passes : int
        3 x 3 smoothing passes over the block grid.

    Raises
    ------
    ValueError
        A block under 4 pixels or a quantile outside [0, 1].
    """

    def __init__(self, block_px: int, quantile: float = QUANTILE, passes: int = 1) -> None:
        if block_px < 4 or not 0.0 <= quantile <= 1.0:
            raise ValueError(f"need a block of >= 4 px and a quantile in [0, 1], got {block_px}, {quantile}")
        self.block = int(block_px)
        self.quantile = float(quantile)
        self.passes = int(passes)
        self._shape: tuple[int, int] | None = None
        self._scratch = np.empty(16 * 16 + 4, np.float32)

    def allocate(self, shape: tuple[int, int]) -> None:
        """Buffers for frames of ``shape``."""
        g = grid_shape(shape, self.block)
        self.grid = np.empty(g, np.float32)
        self._tmp = np.empty(g, np.float32)
        self.out = np.empty(shape, np.float32)
        self._jb, self._jw = column_weights(int(shape[1]), self.block, g[1])
        self._row = np.empty(g[1] + 1, np.float32)
        self._shape = (int(shape[0]), int(shape[1]))

    def run(self, frame: np.ndarray) -> np.ndarray:
        """The frame minus its background (float32 (rows, cols), a reused buffer); :attr:`grid` holds the
        block levels (frame units)."""
        if self._shape != frame.shape:
            self.allocate(frame.shape)
        block_quantiles(frame, self.block, self.quantile, self._scratch, self.grid)
        smooth_grid(self.grid, self._tmp, self.passes)
        subtract_surface(frame, self.grid, self.block, self._jb, self._jw, self._row, self.out)
        return self.out


class Background(StageBase):
    """Frame stage ``background``: writes ``extras["frame"]`` (the frame minus its smooth background, or the
    frame itself when inactive) and ``extras["background_level"]`` (mean of the subtracted surface, frame units).

    Parameters
    ----------
    mode : {"auto", "on", "off"}
        See :data:`MODES`.
    config : FinderConfig, optional
        Fixed finder parameters (their ``background_px`` sets the block); by default from each series.

    Raises
    ------
    ValueError
        Unknown mode.
    """

    name = "background"
    reads = ("image",)
    writes = ("extras",)

    def __init__(self, mode: str = "auto", config: FinderConfig | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"background mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.config = config
        self.active = mode == "on"
        self.sub: BackgroundSubtractor | None = None

    def prepare(self, meta: FrameMeta) -> None:
        """Decide whether the stage works on this series and size its buffers.

        Raises
        ------
        FrameError
            No scale for the series (from :meth:`FinderConfig.for_meta`).
        """
        from beamloop.edge.stages.find import FinderConfig

        self.active = self.mode == "on" or (self.mode == "auto" and meta.pixel_size_A is None)
        if not self.active:
            return
        cfg = self.config or FinderConfig.for_meta(meta)
        block = max(int(round(BLOCK_PERIODS * cfg.background_px)), 8)
        if self.sub is None or self.sub.block != block:
            self.sub = BackgroundSubtractor(block)
        self.sub.allocate(meta.shape)

    def process(self, ctx: FrameContext) -> None:
        """``extras["frame"]`` from ``ctx.image``."""
        if not self.active or self.sub is None:
            ctx.extras["frame"] = ctx.image
            ctx.extras["background_level"] = 0.0
            return
        ctx.extras["frame"] = self.sub.run(ctx.image)
        ctx.extras["background_level"] = float(self.sub.grid.mean())
