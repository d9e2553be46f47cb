"""The reductions a fan-out worker runs (:mod:`beamloop.streams.fanout`), and worker processes to run them.

:class:`FourDReducer` reduces each frame stack of a 4D-STEM stream to per-frame virtual detector signals
(bright field, annular dark field) and centre of mass, with the kernels of
:mod:`beamloop.edge.analysis.live4d`, plus the summed diffraction pattern; the merger
(:class:`beamloop.streams.merge.FanoutMerger`) assembles them into scan images. :func:`worker_main` is one
worker (a process, or the body of a process on another machine); :func:`spawn_workers` starts N of them on
this machine.

Virtual detectors and CoM: see :mod:`beamloop.edge.analysis.live4d` for the sources (Müller et al., Nat.
Commun. 5, 5653 (2014) for CoM; Dekkers & de Lang, Optik 41, 452 (1974) for segmented DPC).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from dataclasses import dataclass

import numpy as np

from beamloop.edge.analysis import live4d
from beamloop.streams.dectris.series import DetectorSeries, FrameStack
from beamloop.streams.fanout import DEFAULT_HEARTBEAT_S


@dataclass(frozen=True)
class DetectorGeometry:
    """Virtual detectors of a 4D-STEM reduction, in detector pixels (None: the default for the detector).

    Attributes
    ----------
    bf_radius : float or None
        Virtual bright-field disk radius (default a sixth of the smaller detector side, the simulated
        microscope's BF disk).
    adf_radii : (inner, outer) or None
        Virtual annular dark-field radii (default 1.25 x the BF radius to half the smaller side).
    centre : (row, col) or None
        Beam centre (default the detector's middle).
    com : bool
        Also compute the centre of mass (within 1.5 x the BF radius) and the total counts.
    adf_inner_bf : float
        Without ``adf_radii``: the ADF annulus starts at this multiple of the BF radius (1.25, a dark-field
        annulus next to the disk, as ``receive --scan``; 2 or more keeps the disk's edge out when the pattern
        shifts, for Z-contrast images like HAADF: :data:`HAADF_GEOMETRY`).
    """

    bf_radius: float | None = None
    adf_radii: tuple[float, float] | None = None
    centre: tuple[float, float] | None = None
    com: bool = True
    adf_inner_bf: float = 1.25

    def resolve(self, shape: tuple[int, int]) -> tuple[float, tuple[float, float], tuple[float, float]]:
        """``(bf_radius, (adf_inner, adf_outer), centre)`` for a detector of ``shape`` (rows, cols).

        Raises ``ValueError`` for a non-positive shape or radii, or an annulus with outer <= inner.
        """
        rows, cols = (int(v) for v in shape)
        if rows <= 0 or cols <= 0:
            raise ValueError(f"detector shape must be positive, got {shape}")
        centre = tuple(self.centre) if self.centre else ((rows - 1) / 2, (cols - 1) / 2)
        half = min(rows, cols) / 2
        bf = self.bf_radius or half / 3
        rin, rout = self.adf_radii if self.adf_radii else (bf * self.adf_inner_bf, half)
        if not (bf > 0 and 0 <= rin < rout):
            raise ValueError(f"bad virtual detectors: BF radius {bf}, ADF radii {rin}, {rout}")
        return float(bf), (float(rin), float(rout)), (float(centre[0]), float(centre[1]))


DEFAULT_GEOMETRY = DetectorGeometry()
"""The default virtual detectors (BF disk, ADF annulus from 1.25 x its radius, CoM on), scaled to each detector."""

HAADF_GEOMETRY = DetectorGeometry(adf_inner_bf=2.0)
"""Virtual detectors for Z-contrast scan images (the closed loop's frames): the ADF annulus from twice the BF
radius to the detector edge, clear of the bright-field disk when the specimen's field shifts it (in the
simulated microscope's 4D mode by up to 1.5 detector pixels; :class:`beamloop.edge.sim.fourd.FourDConfig`)."""


class FourDReducer:
    """Per-frame BF, ADF (and CoM) of frame stacks, and their summed diffraction pattern: a
    :class:`beamloop.streams.fanout.Reducer`.

    Parameters
    ----------
    geometry : DetectorGeometry
    sum_pattern : bool
        Keep the summed diffraction pattern (``sums()["sum_pattern"]``, float64 (det_rows, det_cols), counts).

    Notes
    -----
    Buffers are allocated when a series of a new detector shape opens and grow with the largest stack seen;
    nothing is allocated per stack otherwise.
    """

    def __init__(self, geometry: DetectorGeometry = DetectorGeometry(), *, sum_pattern: bool = True) -> None:
        self.geometry = geometry
        self.sum_pattern = bool(sum_pattern)
        self._shape: tuple[int, int] | None = None
        self._names: tuple[str, ...] = ()

    def names(self, series: DetectorSeries) -> tuple[str, ...]:
        """``("bf", "adf")`` plus ``("com_sum", "com_row", "com_col")`` with CoM; prepares the masks for the
        series' detector shape.

        Raises ``ValueError`` for virtual detectors that do not fit the detector.
        """
        self._prepare((int(series.shape[0]), int(series.shape[1])))
        return self._names

    @property
    def result_names(self) -> tuple[str, ...]:
        """The names of :meth:`reduce_frames`' columns for the detector prepared last (empty before any)."""
        return self._names

    def warm_up(self, dtypes=(np.uint8, np.uint16, np.uint32, np.float32)) -> None:
        """Compile (or load from numba's cache) the kernels for frames of ``dtypes`` before the first stack,
        so that a worker's first stack does not silence its heartbeats; the summed pattern is left as it was."""
        shape = self._shape or (8, 8)
        keep = self.sum_pattern
        self.sum_pattern = False
        for dt in dtypes:
            self.reduce_frames(np.zeros((1, *shape), dt))
        self.sum_pattern = keep

    def _prepare(self, shape: tuple[int, int]) -> None:
        if shape == self._shape:
            return
        bf, (rin, rout), centre = self.geometry.resolve(shape)
        self.masks = live4d.SparseMasks.from_dense({"bf": live4d.disk_mask(shape, bf, centre),
                                                    "adf": live4d.annulus_mask(shape, rin, rout, centre)})
        self.centre = centre
        r = np.hypot(*np.mgrid[0:shape[0], 0:shape[1]] - np.asarray(centre)[:, None, None])
        self._com_pix = np.flatnonzero(r.ravel() <= bf * 1.5).astype(np.int64)
        self._names = ("bf", "adf") + (("com_sum", "com_row", "com_col") if self.geometry.com else ())
        self._shape = shape
        self._cap = 0
        self._sum = np.zeros(shape, np.float64)
        self._tmp = np.zeros(shape, np.float64)
        self._grow(64)

    def _grow(self, n: int) -> None:
        self._cap = max(n, self._cap)
        self._v = np.empty((self._cap, 2), np.float64)
        self._c = np.empty((self._cap, 3), np.float64)
        self._out = np.empty((self._cap, len(self._names)), np.float64)

    def reduce_frames(self, frames: np.ndarray) -> np.ndarray:
        """Per-frame results of ``frames`` (n, det_rows, det_cols), unsigned integer or float32 counts.

        Returns
        -------
        ndarray (n, K), float64
            Columns in the order of :meth:`names`; a view into a buffer reused by the next call.
        """
        n = frames.shape[0]
        self._prepare((int(frames.shape[1]), int(frames.shape[2])))
        if n > self._cap:
            self._grow(n)
        out = self._out[:n]
        live4d.virtual_stack(frames, self.masks, self._v[:n])
        out[:, :2] = self._v[:n]
        if self.geometry.com:
            live4d.com_stack(frames, self.centre, self._com_pix, self._c[:n])
            out[:, 2:] = self._c[:n]
        if self.sum_pattern and n:
            np.sum(frames, axis=0, dtype=np.float64, out=self._tmp)
            self._sum += self._tmp
        return out

    def reduce(self, stack: FrameStack) -> np.ndarray:
        """:meth:`reduce_frames` of the stack's first channel; ``ValueError`` for a stack without decoded frames
        (a receiver opened with ``decode=False``)."""
        frames = stack.frames
        if frames is None:
            raise ValueError("frame stack without decoded frames (receiver opened with decode=False)")
        return self.reduce_frames(frames)

    def sums(self) -> dict[str, np.ndarray]:
        """``{"sum_pattern": ...}`` summed since the last call (then reset); empty without ``sum_pattern``."""
        if not self.sum_pattern or self._shape is None:
            return {}
        out = {"sum_pattern": self._sum.copy()}
        self._sum[:] = 0.0
        return out


def worker_main(detector: str, protocol: str, results: str, control: str, worker: str | None, *,
                geometry: DetectorGeometry = DetectorGeometry(), sum_pattern: bool = True, stack_size: int = 64,
                heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> dict:
    """One fan-out worker: connect a receiver to ``detector``, reduce, report to the merger, until stopped
    (a ``stop`` control message, SIGTERM or SIGINT).

    Parameters
    ----------
    detector : str
        The detector's PUSH endpoint (``tcp://DCU:31001`` for Stream V2).
    protocol : str
        ``stream2`` or ``simplon1`` (PUSH protocols: the frames are dealt out over the workers).
    results, control : str
        The merger's endpoints (:class:`beamloop.streams.merge.FanoutMerger`).
    worker : str or None
        This worker's name (None: ``<host>-<pid>``).
    geometry : DetectorGeometry
        Virtual detectors.
    sum_pattern : bool
        Also send the summed diffraction pattern with each part.
    stack_size : int
        Frames per receive stack (one ``part`` message per stack).
    heartbeat_s : float
        Heartbeat period, seconds.

    Returns
    -------
    dict
        The worker's :class:`beamloop.streams.fanout.WorkerStats` and its receiver's counters.

    Raises
    ------
    ValueError
        ``protocol`` is not a PUSH protocol.
    """
    from beamloop.streams.fanout import WorkerLink, run_worker
    from beamloop.streams.receivers import open_receiver

    if protocol not in ("stream2", "simplon1"):
        raise ValueError(f"fan-out needs a PUSH stream (stream2 or simplon1), got {protocol!r}")
    stopped = [False]

    def _stop(*_):
        stopped[0] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, _stop)
        except ValueError:  # not the main thread (a worker run in a thread)
            break
    reducer = FourDReducer(geometry, sum_pattern=sum_pattern)
    reducer.warm_up()
    warm_up_decoder()
    with open_receiver(detector, protocol=protocol, mode="lossless", stack_size=stack_size) as rx, \
            WorkerLink(results, control, worker) as link:
        stats = run_worker(rx, reducer, link, heartbeat_s=heartbeat_s, stop=lambda: stopped[0])
        return {"stats": vars(stats), "counters": rx.counters.as_dict()}


def warm_up_decoder() -> None:
    """Compile (or load from numba's cache) the receiver's stack decoder for uint8/16/32 frames now, before the
    worker says hello, as :class:`beamloop.streams.dectris.receiver.DetectorReceiver` otherwise does when a
    series opens (a silent worker for that long could be declared dead)."""
    from beamloop.streams.dectris import codecs

    empty = np.zeros(0, np.int64)
    for dt in (np.uint8, np.uint16, np.uint32):
        codecs.decode_stack(np.zeros(16, np.uint8), empty, empty, codecs.Codec(codecs.BSLZ4, np.dtype(dt).itemsize),
                            np.zeros((0, 1, 1), dt), np.zeros(1, np.int8))


def _process_body(*args, **kw) -> None:
    """A spawned worker process: :func:`worker_main` with the receiver's per-gap warnings silenced."""
    import logging

    # each worker's receiver sees every N-th frame id: its gap warnings are not losses (the merger counts those)
    logging.getLogger("beamloop.streams.dectris.receiver").setLevel(logging.ERROR)
    worker_main(*args, **kw)


def spawn_workers(n: int, detector: str, protocol: str, results: str, control: str, *, prefix: str = "w",
                  **kw) -> list:
    """Start ``n`` worker processes on this machine (``multiprocessing`` spawn context), named
    ``<prefix>0`` ... ; keyword arguments go to :func:`worker_main`.

    Returns
    -------
    list of multiprocessing.Process
        Started; stop them with the merger's ``stop_workers()`` and ``join()`` (or ``terminate()``).

    Raises
    ------
    ValueError
        ``n`` < 1.
    """
    if n < 1:
        raise ValueError(f"need at least one worker, got {n}")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_process_body, args=(detector, protocol, results, control, f"{prefix}{k}"),
                         kwargs=kw, daemon=True, name=f"beamloop-fanout-{prefix}{k}") for k in range(n)]
    for p in procs:
        p.start()
    return procs
