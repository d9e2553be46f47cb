"""The contract between a DECTRIS detector receiver and its protocol adapters.

A *protocol adapter* (:class:`ProtocolAdapter`: :class:`beamloop.streams.dectris.simplon.SimplonAdapter`,
:class:`beamloop.streams.dectris.stream_v2.Stream2Adapter`) reads one message at a time from a PULL socket,
validates it, and writes what it carries through a :class:`RingSink`: the public interface of the
receiver's preallocated ring of frame stacks, which :class:`beamloop.streams.dectris.receiver.DetectorReceiver`
implements. An adapter never touches the receiver otherwise.

Per image an adapter calls, in this order::

    series = sink.check_image(image_id, series_id)       # raises when no series is open or it is foreign
    sink.set_codec(channel, codec, what)                 # per channel: how its blob is encoded
    view = sink.slot_view(channel)                       # per channel: read or copy the blob into it
    sink.set_blob_nbytes(channel, n)                     # per channel: the blob's length
    sink.commit_image(image_id, start_ns, stop_ns, real_ns)

and nothing else (an exception raised before ``commit_image`` leaves the slot free for the next image).
Series messages go to :meth:`RingSink.begin_series` and :meth:`RingSink.end_series`; bytes and messages an
adapter reads are added to ``sink.counters`` by the adapter. An adapter that receives many images in one call
(SIMPLON v1's compiled loop, :mod:`beamloop.streams.dectris.zmqfast`) asks for :meth:`RingSink.free_slots`
and commits them with :meth:`RingSink.commit_run`.

A new protocol is added with :func:`beamloop.streams.dectris.register_protocol`.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np
import zmq

from beamloop.streams.counters import StreamCounters
from beamloop.streams.dectris.codecs import Codec
from beamloop.streams.dectris.series import DetectorSeries, SeriesEnd, SeriesStart


class FreeSlots(NamedTuple):
    """The unfilled slots of the stack being filled, for an adapter that receives several images at once.

    Attributes
    ----------
    arena : ndarray (slots * capacity,), uint8
        The channel's blob arena; slot ``k`` is ``arena[k * capacity:(k + 1) * capacity]``.
    capacity : int
        Bytes per slot (the largest blob any codec may produce for one frame).
    first_slot : int
        Arena slot of the first free slot.
    room : int
        Free slots in the stack (0: it is full).
    lengths, image_ids : ndarray (room,), int64
        Write each image's blob length and id here (views into the ring).
    times : ndarray (room, 3), int64
        Write each image's ``start_time``, ``stop_time``, ``real_time`` here, nanoseconds.
    next_id : int
        The id the next image must have to be committed by :meth:`RingSink.commit_run`.
    series_id : int
        The open series.
    """

    arena: np.ndarray
    capacity: int
    first_slot: int
    room: int
    lengths: np.ndarray
    image_ids: np.ndarray
    times: np.ndarray
    next_id: int
    series_id: int


class RingSink(Protocol):
    """Where a protocol adapter puts series and images: the receiver's ring of preallocated frame stacks.

    Attributes
    ----------
    counters : StreamCounters
        The receiver's counters. Adapters add the ``bytes`` they read (and the ``messages`` of images
        they commit with :meth:`commit_run`); the sink counts everything else.
    """

    counters: StreamCounters

    @property
    def series(self) -> DetectorSeries | None:
        """The open series, None between series."""

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one channel's slot in the ring (the blob bound); 0 before the first series."""

    def begin_series(self, series: DetectorSeries) -> SeriesStart:
        """Open ``series``: size the ring for it (reusing the buffers when the layout is the same).

        Frames of a previous series still in the stack are delivered first, under that series' name; a
        series that had not ended is counted as ``unexpected``.

        Raises
        ------
        OversizedMessage
            The ring for ``series`` would exceed the receiver's ``max_ring_bytes``; nothing was allocated.
        """

    def end_series(self, series_id: int) -> SeriesEnd:
        """Close the open series; frames announced and never received are counted as missing.

        Raises
        ------
        UnexpectedMessage
            No series is open, or ``series_id`` is not the open one.
        """

    def check_image(self, image_id: int, series_id: object) -> DetectorSeries:
        """Get ready to receive image ``image_id`` of series ``series_id`` into the current slot.

        Returns
        -------
        DetectorSeries
            The open series, which the image must match.

        Raises
        ------
        MalformedMessage
            ``image_id`` is beyond :data:`beamloop.streams._ids.MAX_ID` (the ring holds int64 ids).
        UnexpectedMessage
            No series is open, or the image belongs to another one.
        """

    def set_codec(self, channel: str, codec: Codec, what: str) -> None:
        """Record how ``channel``'s blob of this image is encoded.

        Raises
        ------
        FrameMismatch
            It differs from the codec of the frames already in the stack (one stack is decoded by one
            call); ``what`` names the image and the encoding in the message.
        """

    def slot_view(self, channel: str) -> memoryview:
        """The current slot of ``channel``: ``slot_nbytes`` writable bytes for the image's blob."""

    def set_blob_nbytes(self, channel: str, nbytes: int) -> None:
        """The blob of ``channel`` in the current slot is ``nbytes`` long (at most ``slot_nbytes``)."""

    def commit_image(self, image_id: int, start_ns: int, stop_ns: int, real_ns: int) -> None:
        """The current slot holds a complete, valid image: account for its id and advance the slot.

        Parameters
        ----------
        image_id : int
            Its id (0-based within the series).
        start_ns, stop_ns, real_ns : int
            Its ``start_time``, ``stop_time`` and ``real_time``, nanoseconds (0 .. 2**63 - 1).
        """

    def free_slots(self, channel: str) -> FreeSlots:
        """The free slots of the stack being filled, for receiving several images of ``channel`` at once.

        Only in lossless mode, with a series open; images written there count once :meth:`commit_run`
        commits them.
        """

    def commit_run(self, n: int) -> None:
        """Commit the first ``n`` slots of the last :meth:`free_slots`: images with the consecutive ids
        ``next_id .. next_id + n - 1`` whose lengths, ids and times were written there."""


class ProtocolAdapter(Protocol):
    """Reads one detector protocol from a PULL socket into a :class:`RingSink`.

    Constructed by the receiver as ``adapter(socket, sink, max_header_bytes=..., verify_hash=...)``.
    Every message it rejects raises a :class:`beamloop.streams.errors.ProtocolError`; the receiver then
    calls :meth:`discard_rest` and counts the error.

    An adapter may also have ``fast_read() -> int | None``, which the receiver calls in lossless mode while
    a series is open: receive many images into :meth:`RingSink.free_slots` and return
    ``beamloop.streams.dectris.zmqfast.FULL`` / ``EMPTY`` / ``DEVIATE`` (then :meth:`read` finishes the
    message it stopped at), or None when it cannot (see
    :meth:`beamloop.streams.dectris.simplon.SimplonAdapter.fast_read`).
    """

    def __init__(self, socket: zmq.Socket, sink: RingSink, *, max_header_bytes: int,
                 verify_hash: bool) -> None: ...

    def read(self, flags: int = 0) -> SeriesStart | SeriesEnd | None:
        """Read one message (``flags=zmq.NOBLOCK``: raise ``zmq.Again`` when none waits, consuming nothing).

        Returns the series event it was, or None for an image (committed to the sink) or a message part
        that needs more parts to mean something.
        """

    def discard_rest(self) -> None:
        """Read and drop the remaining parts of the current message."""
