"""beamloop's Python API for notebooks and scripts: find columns, run a frame path, open a receiver,
drive the closed loop. Every name here is also available as ``beamloop.<name>``.

Examples
--------
Columns of an array (a simulated MoS2 frame here) and of a file::

    >>> import beamloop
    >>> frame = beamloop.simulated_frame(shape=(128, 128), pixel_size_A=0.15, seed=1)
    >>> cols = beamloop.find_columns(frame.counts, pixel_size_A=0.15, material="MoS2")
    >>> sorted(set(cols.class_labels())) <= ["Mo", "S1", "S2", "vacancy"]
    True
    >>> tables = beamloop.find_in_file("image.tif")           # doctest: +SKIP

A frame path run frame by frame (the service's own stages, with their latency)::

    >>> path = beamloop.frame_path("classical", "MoS2")
    >>> ctx = path.run(frame.counts, 0.15)
    >>> path.names
    ('background', 'preprocess', 'find', 'classify', 'vacancies', 'ood')

Live frames from a detector stream, and the closed loop on the simulated microscope::

    >>> with beamloop.open_receiver("tcp://127.0.0.1:5555") as rx:   # doctest: +SKIP
    ...     ev = rx.recv(1000)
    >>> report = beamloop.run_closed_loop("out/run", rounds=1)     # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from beamloop.edge.batch_find import find_columns as _find_columns
from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.path import frame_path

__all__ = ["find_columns", "find_in_file", "frame_path", "open_receiver", "connect_bridge", "run_closed_loop",
           "simulated_frame"]


def find_columns(image: np.ndarray, pixel_size_A: float | None = None, material: str = "generic",
                 method: str = "classical", spacing_px: float | None = None) -> ColumnTable:
    """Atomic columns of one 2-D image, found and classified by a frame path.

    Parameters
    ----------
    image : ndarray (rows, cols), integer or float32/float64
        HAADF/ADF counts or intensities.
    pixel_size_A : float, optional
        Angstrom per pixel. With ``material="MoS2"`` it sets the physical scale; otherwise (or without it)
        the lattice period and column width are estimated from the image's autocorrelation.
    material : {"generic", "MoS2"}
    method : {"classical", "unet"}
        ``unet``: the shipped U-Net ensemble on ONNX Runtime (CPU, or CUDA/TensorRT where available).
    spacing_px : float, optional
        Lattice period in pixels instead of the estimate.

    Returns
    -------
    ColumnTable
        ``x``, ``y`` (pixels), ``intensity``, ``score``, ``cls`` (into ``class_names``); ``to_records()`` and
        ``write_csv()`` give other forms.

    Raises
    ------
    beamloop.edge.frame.stage.FrameError
        Not 2-D, unsupported dtype, non-finite pixels, or no estimable scale.
    ValueError
        Unknown method or material.
    """
    return _find_columns(image, pixel_size_A, material, method, spacing_px)[0]


def find_in_file(path: str | Path, pixel_size_A: float | None = None, material: str = "generic",
                 method: str = "classical", spacing_px: float | None = None) -> list[ColumnTable]:
    """Columns of every frame of an image file (TIFF, PNG, .npy, HyperSpy .hspy), one table per frame.

    The pixel size comes from the file's calibration unless ``pixel_size_A`` is given.

    Raises
    ------
    beamloop.edge.io.imageio.ImageReadError
        The file cannot be read.
    beamloop.edge.frame.stage.FrameError
        A frame cannot be processed (see :func:`find_columns`).
    """
    from beamloop.edge.io.imageio import read_image

    img = read_image(Path(path))
    size = pixel_size_A or img.pixel_size_A
    path_ = frame_path(method, material, period_px=spacing_px)
    return [_find_columns(f, size, material, method, spacing_px, path=path_)[0] for f in img.frames]


def open_receiver(endpoint: str, *, bind: bool = False, ring: int = 8):
    """A receiver of the native beamloop frame stream (use it as a context manager).

    Parameters
    ----------
    endpoint : str
        ZeroMQ endpoint, e.g. ``"tcp://127.0.0.1:5555"``.
    bind : bool
        Bind instead of connecting (for senders that connect).
    ring : int
        Frames held in the receive ring.

    Raises
    ------
    zmq.ZMQError
        The endpoint cannot be bound or connected.
    """
    from beamloop.streams.native.receiver import FrameReceiver

    return FrameReceiver(endpoint, bind=bind, ring=ring)


def connect_bridge(endpoint: str, *, timeout_ms: int = 2000):
    """A client of a scan controller's control bridge (use it as a context manager); positions it is asked
    to send are checked before they leave (finite, inside the current scan frame)."""
    from beamloop.edge.control import client

    return client.BridgeClient(endpoint, timeout_ms=timeout_ms)


def run_closed_loop(out: str | Path = "out/run", **options) -> dict:
    """The main job: the vacancy-line experiment on the simulated microscope, with its report (the same as
    ``beamloop run``; options as :func:`beamloop.edge.experiments.closed_loop.run`).

    Raises
    ------
    RuntimeError
        The simulated microscope could not be started.
    """
    from beamloop.edge.experiments.closed_loop import run

    return run(Path(out), quiet=options.pop("quiet", True), **options)


def simulated_frame(shape: tuple[int, int] = (256, 256), pixel_size_A: float = 0.15, dose_e_per_A2: float = 1e5,
                    seed: int = 0):
    """A simulated HAADF frame of MoS2 with point defects and its ground truth
    (:func:`beamloop.edge.sim.frames.mos2_frame`: ``counts``, ``truth_xy``, ``truth_cls``, ...)."""
    from beamloop.edge.sim.frames import mos2_frame

    return mos2_frame(shape=shape, pixel_size_A=pixel_size_A, dose_e_per_A2=dose_e_per_A2, seed=seed)
