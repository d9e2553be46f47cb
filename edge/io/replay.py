"""``beamloop replay``: stream recorded frames (an image stack or a folder of images) to a running service."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from beamloop.edge.io.imageio import image_files, read_image
from beamloop.streams.native import protocol
from beamloop.streams.native.sender import FrameSender

log = logging.getLogger("beamloop.replay")


def load_frames(path: str | Path) -> tuple[list[np.ndarray], float | None]:
    """Frames of an image stack file or of every image in a folder, and the pixel size if recorded.

    Raises
    ------
    beamloop.edge.io.imageio.ImageReadError
        A file cannot be read.
    ValueError
        No frames, or frames of different shapes.
    """
    frames, size = [], None
    for f in image_files([path]):
        img = read_image(f)
        size = size or img.pixel_size_A
        frames.extend(img.frames)
    if not frames:
        raise ValueError(f"{path}: no image frames found")
    shapes = {fr.shape for fr in frames}
    if len(shapes) > 1:
        raise ValueError(f"{path}: frames of different shapes {sorted(shapes)}; replay needs one shape")
    return frames, size


def as_stream_dtype(frame: np.ndarray) -> np.ndarray:
    """The frame in a stream dtype: unsigned integers as they are (up to 32 bits), others as float32."""
    if frame.dtype in (np.uint8, np.uint16, np.uint32):
        return np.ascontiguousarray(frame, frame.dtype.newbyteorder("<"))
    return np.ascontiguousarray(frame, "<f4")


def replay(path: str | Path, to: str, rate_hz: float = 10.0, *, repeat: int = 1, pixel_size_A: float | None = None,
           encoding: str = "raw", bind: bool = False, linger_ms: int = 5000) -> int:
    """Send every frame of ``path`` to ``to`` as one series, paced at ``rate_hz``; returns frames sent.

    Parameters
    ----------
    to : str
        Endpoint of the service's receiver (it binds; replay connects) or, with ``bind``, our own.
    rate_hz : float
        Frames per second (0: as fast as possible).
    repeat : int
        Times to send the whole set.
    pixel_size_A : float, optional
        Overrides the pixel size recorded in the files.

    Raises
    ------
    ValueError
        Negative rate, bad frames (see :func:`load_frames`).
    """
    if rate_hz < 0:
        raise ValueError(f"rate must be >= 0 Hz, got {rate_hz}")
    frames, size = load_frames(path)
    size = pixel_size_A or size
    frames = [as_stream_dtype(f) for f in frames]
    ud = {"kind": "frame", "source": str(path)}
    if size:
        ud["pixel_size_A"] = float(size)
    n = 0
    period = 1.0 / rate_hz if rate_hz > 0 else 0.0
    with FrameSender(to, bind=bind, encoding=encoding, linger_ms=linger_ms) as tx:
        time.sleep(0.2)  # let the connection come up before the first message
        tx.start_series([protocol.DEFAULT_CHANNEL], frames[0].shape, frames[0].dtype,
                        number_of_images=len(frames) * repeat,
                        frame_time=period, user_data=ud)
        t_next = time.monotonic()
        for _ in range(repeat):
            for fr in frames:
                if period:
                    time.sleep(max(t_next - time.monotonic(), 0.0))
                    t_next += period
                tx.send_frame(fr)
                n += 1
        tx.end_series()
    log.info("replayed %d frames from %s to %s", n, path, to)
    return n
