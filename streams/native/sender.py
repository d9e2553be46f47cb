"""Sending the native beamloop stream (:mod:`beamloop.streams.native.protocol`) over a ZeroMQ PUSH socket."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import zmq

from beamloop.streams._socket import SocketOwner, open_push
from beamloop.streams.native import protocol


class FrameSender(SocketOwner):
    """A PUSH socket that sends series of frames in the native beamloop stream.

    Frames are handed to ZeroMQ without copying (``raw`` encoding): do not modify an array after
    passing it to :meth:`send_frame` unless you passed ``track=True`` and waited on the tracker.

    Parameters
    ----------
    endpoint : str
        ZeroMQ endpoint, e.g. ``"tcp://127.0.0.1:5555"`` or ``"tcp://*:0"`` (a free port; read
        :attr:`endpoint` afterwards).
    bind : bool
        Bind (as a detector does) rather than connect.
    encoding : {"raw", "lz4"}
        Blob encoding for every frame.
    sndhwm : int
        ZeroMQ send high-water mark in messages; when reached, :meth:`send_frame` blocks
        (back-pressure) or raises ``TimeoutError`` after ``send_timeout_ms``.
    send_timeout_ms : int or None
        Give up a blocked send after this many milliseconds (``None``: wait for ever).
    linger_ms : int
        How long :meth:`close` waits for queued messages to leave.
    context : zmq.Context, optional

    Raises
    ------
    zmq.ZMQError
        The endpoint cannot be bound or connected (the message names it).
    ValueError
        Unknown encoding.

    Examples
    --------
    >>> with FrameSender("tcp://127.0.0.1:0") as tx:            # doctest: +SKIP
    ...     tx.start_series(["haadf"], (256, 256), np.uint16)
    ...     tx.send_frame(frame)
    ...     tx.end_series()
    """

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool = True,
        encoding: str = "raw",
        sndhwm: int = 1000,
        send_timeout_ms: int | None = None,
        linger_ms: int = 1000,
        context: zmq.Context | None = None,
    ) -> None:
        if encoding not in protocol.ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; expected one of {protocol.ENCODINGS}")
        self.encoding = encoding
        SocketOwner.__init__(self, *open_push(endpoint, bind=bind, sndhwm=sndhwm, linger_ms=linger_ms,
                                              send_timeout_ms=send_timeout_ms, context=context))
        self.series: protocol.SeriesHeader | None = None
        self._next_series_id = 0
        self._next_image_id = 0
        self._armed_ns = 0
        self.frames_sent = 0

    # series --------------------------------------------------------------------------------------
    def start_series(
        self,
        channels: list[str] | tuple[str, ...],
        shape: tuple[int, int],
        dtype,
        *,
        number_of_images: int = 0,
        count_time: float = 0.0,
        frame_time: float = 0.0,
        user_data: Mapping | None = None,
    ) -> protocol.SeriesHeader:
        """Send a ``start`` message and make it the current series (ending an open one first).

        Returns the :class:`beamloop.streams.native.protocol.SeriesHeader` sent. Raises ``ValueError`` for bad fields
        (see :func:`beamloop.streams.native.protocol.new_series`) and ``TimeoutError`` if the send times out.
        """
        if self.series is not None:
            self.end_series()
        series = protocol.new_series(
            self._next_series_id,
            channels,
            shape,
            dtype,
            number_of_images=number_of_images,
            count_time=count_time,
            frame_time=frame_time,
            user_data=user_data,
        )
        return self._open(series)

    def _open(self, series: protocol.SeriesHeader) -> protocol.SeriesHeader:
        """Send ``series``' start message and make it the current series (its image ids count from 0)."""
        self._send([protocol.encode_start(series)])
        self._next_series_id += 1
        self._next_image_id = 0
        self._armed_ns = time.monotonic_ns()
        self.series = series
        return series

    def send_frame(
        self,
        frame: np.ndarray | Mapping[str, np.ndarray],
        *,
        user_data: Mapping | None = None,
        image_id: int | None = None,
        exposure_ns: int | None = None,
        track: bool = False,
    ):
        """Send one frame of the current series.

        Parameters
        ----------
        frame : ndarray (rows, cols) or mapping channel -> ndarray
            Pixels in the series' dtype and shape; a bare array is allowed for one-channel series.
        user_data : mapping, optional
            Per-image metadata; ``sent_ns`` (``time.monotonic_ns()``) is added.
        image_id : int, optional
            Defaults to the next id (0, 1, 2, ...); pass one to resend or skip ids.
        exposure_ns : int, optional
            Counting time of this frame; defaults to the series' ``count_time``. ``stop_time`` is when
            the message leaves and ``start_time`` that minus the exposure, never before the series was
            armed (the start message).
        track : bool
            Return a :class:`zmq.MessageTracker` that is done once ZeroMQ no longer needs the buffers.

        Raises
        ------
        RuntimeError
            No open series.
        ValueError
            Missing channel, wrong shape or dtype, or a negative ``exposure_ns``.
        TimeoutError
            The send timed out (peer gone or too slow, ``send_timeout_ms``).
        """
        series = self.series
        if series is None:
            raise RuntimeError("send_frame() called with no open series; call start_series() first")
        if not isinstance(frame, Mapping):
            if len(series.channels) != 1:
                raise ValueError(f"series has channels {series.channels}; pass a mapping channel -> frame")
            frame = {series.channels[0]: frame}
        parts, blobs = [], []
        for ch in series.channels:
            if ch not in frame:
                raise ValueError(f"frame lacks channel {ch!r} of the series")
            arr = np.asarray(frame[ch])
            if arr.shape != series.shape:
                raise ValueError(f"channel {ch!r}: shape {arr.shape}, series announced {series.shape}")
            if arr.dtype != series.dtype:
                raise ValueError(f"channel {ch!r}: dtype {arr.dtype}, series announced {series.dtype}")
            blob = protocol.encode_blob(np.ascontiguousarray(arr), self.encoding)
            blobs.append((self.encoding, blob.nbytes if isinstance(blob, np.ndarray) else len(blob)))
            parts.append(blob)
        iid = self._next_image_id if image_id is None else int(image_id)
        now = time.monotonic_ns()
        stop = now - self._armed_ns
        exp = int(series.count_time * 1e9) if exposure_ns is None else int(exposure_ns)
        ud = dict(user_data or {})
        ud["sent_ns"] = now
        header = protocol.encode_image_header(
            series, iid, blobs, start_time_ns=max(stop - exp, 0), stop_time_ns=stop, real_time_ns=exp, user_data=ud
        )
        tracker = self._send([header, *parts], track=track)
        self._next_image_id = iid + 1
        self.frames_sent += 1
        return tracker

    def start_spectrum_series(
        self,
        energy: protocol.EnergyAxis,
        channels: list[str] | tuple[str, ...] = ("eels",),
        dtype=np.uint32,
        *,
        number_of_images: int = 0,
        count_time: float = 0.0,
        frame_time: float = 0.0,
        user_data: Mapping | None = None,
    ) -> protocol.SeriesHeader:
        """Start a series of 1-D spectra (:func:`beamloop.streams.native.protocol.spectrum_series`: frames of
        shape (1, ``energy.channels``), the calibration in the header); send them with :meth:`send_spectrum`.

        Raises ``ValueError`` for bad fields and ``TimeoutError`` if the send times out.
        """
        if self.series is not None:
            self.end_series()
        series = protocol.spectrum_series(self._next_series_id, channels, energy, dtype,
                                          number_of_images=number_of_images, count_time=count_time,
                                          frame_time=frame_time, user_data=user_data)
        return self._open(series)

    def send_spectrum(self, spectrum: np.ndarray | Mapping[str, np.ndarray], *, user_data: Mapping | None = None,
                      **kw):
        """Send one spectrum per channel of the current spectrum series: ``(channels,)`` arrays in the series'
        dtype (sent without copying, as (1, channels) frames); other arguments as :meth:`send_frame`.

        Raises
        ------
        RuntimeError
            No open series, or the open one is not a spectrum series.
        ValueError
            A spectrum of another length or dtype (see :meth:`send_frame`).
        """
        series = self.series
        if series is None or series.user_data.get("kind") != protocol.SPECTRUM_KIND:
            raise RuntimeError("send_spectrum() needs an open spectrum series; call start_spectrum_series() first")
        if not isinstance(spectrum, Mapping):
            spectrum = {series.channels[0]: spectrum} if len(series.channels) == 1 else {}
        frames = {}
        for ch, s in spectrum.items():
            a = np.asarray(s)
            if a.ndim != 1:
                raise ValueError(f"channel {ch!r}: a spectrum is 1-D (channels,), got shape {a.shape}")
            frames[ch] = a.reshape(1, -1)
        return self.send_frame(frames, user_data=user_data, **kw)

    def end_series(self, user_data: Mapping | None = None) -> None:
        """Send the ``end`` message of the current series (no-op when none is open)."""
        if self.series is None:
            return
        self._send([protocol.encode_end(self.series, user_data)])
        self.series = None

    def send_raw(self, parts: list) -> None:
        """Send arbitrary message parts unchanged (for replaying captures and for tests of bad input)."""
        self._send(list(parts))

    def _send(self, parts: list, track: bool = False):
        try:
            return self._sock.send_multipart(parts, copy=False, track=track)
        except zmq.Again:
            raise TimeoutError(f"send to {self.endpoint} timed out (receiver gone or too slow)") from None
