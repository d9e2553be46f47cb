"""The frame-stage contract: what every stage of a frame path declares and implements.

A stage is one small class in the spirit of LiberTEM's UDFs (``libertem.udf.base.UDFFrameMixin``): it says
what it computes and leaves when and where to the runner (:class:`beamloop.edge.path.FramePath`).

======================  ================================================================================
``name``                the stage's latency key (unique within a path)
``reads``, ``writes``   slot names of :class:`~beamloop.edge.frame.context.FrameContext` it takes and fills;
                        the path checks at construction that every slot read is written earlier
``prepare(meta)``       when shape, dtype, pixel size, material or scale change: allocate buffers, derive
                        the configuration, compile kernels; may raise :class:`FrameError` for a series the
                        stage cannot take (e.g. frames smaller than its kernel)
``process(ctx)``        per frame, without per-frame buffer allocation: read the declared slots, write
                        the declared slots; raises :class:`FrameError` to reject the frame
``reset()``             at the start of a new series (e.g. the policy forgets its row)
======================  ================================================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import numpy as np

from beamloop.edge.kernels.smooth import count_nonfinite

if TYPE_CHECKING:
    from beamloop.edge.frame.context import FrameContext, FrameMeta


class FrameError(ValueError):
    """A frame that cannot be processed: wrong number of dimensions, empty, unsupported pixel type,
    non-finite pixels, smaller than a stage's kernel, or with no estimable scale."""


@runtime_checkable
class FrameStage(Protocol):
    """One step of a frame path (see the module docstring for the contract)."""

    @property
    def name(self) -> str:
        """The stage's latency key."""

    @property
    def reads(self) -> tuple[str, ...]:
        """Slots the stage takes."""

    @property
    def writes(self) -> tuple[str, ...]:
        """Slots the stage fills."""

    def prepare(self, meta: FrameMeta) -> None:
        """Get ready for frames described by ``meta``."""

    def process(self, ctx: FrameContext) -> None:
        """Read the declared slots of ``ctx`` and write the declared slots."""

    def reset(self) -> None:
        """Forget what was learned from earlier frames (a new series starts)."""


class StageBase:
    """Defaults for a :class:`FrameStage`: nothing to prepare or reset."""

    name: ClassVar[str] = ""
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    def prepare(self, meta: FrameMeta) -> None:
        """Nothing to prepare."""

    def reset(self) -> None:
        """Nothing to forget."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Largest pixel magnitude the stages (float32 arithmetic) take."""


def check_frame(image: np.ndarray) -> None:
    """Check that ``image`` is a frame the frame path can take, once per frame.

    Parameters
    ----------
    image : ndarray
        Must be 2-D, non-empty, of an integer type or float32/float64, with finite pixels of magnitude at
        most :data:`FLOAT32_MAX`.

    Raises
    ------
    FrameError
        Naming what is wrong: dimensions, size, dtype, byte order, or the number of NaN/infinite pixels.
    """
    if not isinstance(image, np.ndarray):
        raise FrameError(f"frame must be a numpy array, got {type(image).__name__}")
    if image.ndim != 2:
        raise FrameError(f"frame must be 2-D (rows, cols), got shape {image.shape}")
    if image.size == 0:
        raise FrameError(f"frame is empty, shape {image.shape}")
    dt = image.dtype
    if dt.kind not in "uif" or dt.itemsize > 8 or dt == np.float16:
        raise FrameError(f"frame dtype {dt} is not supported: use an integer type, float32 or float64")
    if not dt.isnative:
        raise FrameError(f"frame dtype {dt.str} is not in the machine's byte order; convert it first "
                         "(e.g. image.astype(image.dtype.newbyteorder('=')))")
    if dt.kind == "f":
        bad = count_nonfinite(image)
        if bad:
            raise FrameError(f"frame has {bad} non-finite pixels (NaN or infinity)")
        if dt.itemsize == 8:  # the stages work in float32: larger magnitudes would overflow to infinity
            big = max(float(image.max()), -float(image.min()))
            if big > FLOAT32_MAX:
                raise FrameError(f"frame values reach {big:.3g}, beyond float32's range ({FLOAT32_MAX:.3g}) that "
                                 "the stages compute in; rescale the frame")
