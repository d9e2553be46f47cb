"""Acting as a Merlin on its data port: serve acquisitions of frames as MIB messages over TCP (for tests and
``beamloop stream --protocol merlin``); the format is :mod:`beamloop.streams.merlin.mib`'s."""

from __future__ import annotations

import socket

import numpy as np

from beamloop.streams.merlin import mib
from beamloop.streams.merlin.receiver import parse_endpoint


def counting_mode(frames: np.ndarray) -> tuple[str, int]:
    """The narrowest Merlin counting mode (pixel type, counter depth) that holds every pixel of ``frames``.

    Raises
    ------
    ValueError
        A pixel of 2**24 or more (beyond Merlin's 24-bit counters), or frames that are not unsigned integers.
    """
    if frames.dtype.kind != "u":
        raise ValueError(f"Merlin frames are unsigned integers, got {frames.dtype}")
    top = int(frames.max()) if frames.size else 0
    for ptype, depth in (("U08", 6), ("U16", 12), ("U32", 24)):
        if top < 1 << depth:
            return ptype, depth
    raise ValueError(f"pixel value {top} exceeds Merlin's 24-bit counters")


class MerlinServer:
    """A listening data port that sends acquisitions to the receiver that connects, as a Merlin does.

    Parameters
    ----------
    endpoint : str
        ``tcp://HOST:PORT`` to listen on (``tcp://*:6342`` as a Merlin; port 0: a free one, see :attr:`endpoint`).

    Raises
    ------
    OSError
        The address cannot be bound (the message names it).
    """

    def __init__(self, endpoint: str = f"tcp://*:{mib.DATA_PORT}") -> None:
        host, port = parse_endpoint(endpoint)
        try:
            self._listener = socket.create_server((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot bind {endpoint!r}: {exc.strerror}") from None
        self.endpoint = f"tcp://{host}:{self._listener.getsockname()[1]}"
        self._conn: socket.socket | None = None

    def accept(self, timeout_s: float | None = None) -> None:
        """Wait for a receiver to connect (``socket.timeout`` after ``timeout_s``)."""
        self._listener.settimeout(timeout_s)
        self._conn, _ = self._listener.accept()

    def send_acquisition(self, frames: np.ndarray, pixel_type: str | None = None, counter_depth: int | None = None,
                         *, scan: tuple[int, int] | None = None, chunk_frames: int = 256) -> None:
        """Send one acquisition: its header, then every frame (``frames``: (n, rows, cols) unsigned integers).

        ``pixel_type`` and ``counter_depth`` default to :func:`counting_mode`. Blocks while the receiver is
        behind (TCP back-pressure). Raises ``RuntimeError`` before :meth:`accept`.
        """
        if self._conn is None:
            raise RuntimeError("send_acquisition() before accept()")
        if pixel_type is None or counter_depth is None:
            pixel_type, counter_depth = counting_mode(frames)
        hdr = mib.acquisition_header(len(frames), counter_depth=counter_depth, raw=pixel_type == mib.RAW, scan=scan)
        self._conn.sendall(mib.mpx_prefix(len(hdr)) + hdr)
        for k in range(0, len(frames), chunk_frames):
            part = frames[k:k + chunk_frames]
            self._conn.sendall(b"".join(mib.frame_messages(part, pixel_type, counter_depth, first_seq=k + 1)))

    def close(self) -> None:
        """Close the connection and the listening socket; idempotent."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._listener.close()

    def __enter__(self) -> MerlinServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
