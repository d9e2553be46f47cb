"""Series events shared by every stream receiver: :class:`SeriesStart` and :class:`SeriesEnd`.

Every protocol here frames a series the way DECTRIS Stream V2 does (``start``, ``image``..., ``end``
messages; SIMPLON v1's ``dheader`` and ``dseries_end`` mean the same). Both receivers return these two
events; what comes between differs: the native :class:`beamloop.streams.native.receiver.FrameReceiver`
returns one :class:`beamloop.streams.native.receiver.ImageEvent` per image, the DECTRIS
:class:`beamloop.streams.dectris.receiver.DetectorReceiver` a
:class:`beamloop.streams.dectris.series.FrameStack` per batch of images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from beamloop.streams.native.protocol import EndHeader


class SeriesDescription(Protocol):
    """What both series descriptions provide (:class:`beamloop.streams.native.protocol.SeriesHeader` and
    :class:`beamloop.streams.dectris.series.DetectorSeries`), with DECTRIS Stream V2's field names."""

    @property
    def series_id(self) -> int:
        """Series number."""

    @property
    def series_unique_id(self) -> str:
        """Unique id of the series."""

    @property
    def channels(self) -> tuple[str, ...]:
        """Channel names; every image carries one frame per channel."""

    @property
    def shape(self) -> tuple[int, int]:
        """Frame shape (rows, cols), pixels."""

    @property
    def dtype(self) -> Any:
        """Pixel type (a little-endian ``numpy.dtype``)."""

    @property
    def number_of_images(self) -> int:
        """Images announced; 0 when unknown."""


@dataclass
class SeriesStart:
    """A series began.

    Attributes
    ----------
    series : SeriesHeader or DetectorSeries
        What every image of the series will look like (:class:`SeriesDescription`).
    recv_ns : int
        ``time.monotonic_ns()`` at receipt.
    """

    series: SeriesDescription
    recv_ns: int


@dataclass
class SeriesEnd:
    """A series ended.

    Attributes
    ----------
    series : SeriesHeader or DetectorSeries
        The series that ended.
    frames : int
        Images received in it.
    missing : int
        Images announced (``number_of_images``) but never received; 0 when none were announced.
    recv_ns : int
        ``time.monotonic_ns()`` at receipt.
    header : EndHeader or None
        The native stream's decoded ``end`` message (its ``user_data``); None for DECTRIS streams.
    """

    series: SeriesDescription
    frames: int
    missing: int
    recv_ns: int
    header: EndHeader | None = None
