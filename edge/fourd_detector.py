"""The simulated microscope's 4D mode: a pixelated detector that streams a diffraction pattern per probe position.

:class:`FourDBackend` wraps the simulated microscope's backend (:class:`beamloop.edge.sim.microscope.SimulatedBackend`):
every frame the scan controller acquires is also scanned by the 4D model of the same specimen
(:class:`beamloop.edge.sim.fourd.FourDMicroscope`: ejected atoms show at once) and its patterns are sent as one
DECTRIS Stream V2 series (:class:`beamloop.streams.dectris.stream_v2.Stream2Sender`), whose ``user_data``
states the scan frame, so that :class:`beamloop.edge.fourd_source.FourDFrameSource` hands the service the frame
the controller's ``frame_id`` names. Everything else (the HAADF frame stream, parked-probe samples, the
trigger, damage, ground truth) is the wrapped backend's.

Use: ``FourDBackend.attach(microscope)`` on a :class:`beamloop.edge.sim.microscope.SimulatedMicroscope` before
it serves. The patterns use their own random generator (``seed``), so the wrapped microscope draws the same
numbers as without the 4D mode. Limits: the 4D model has no scan distortion and no drift, so with those on
the 4D frames and the HAADF frames (and the ground truth) part.
"""

from __future__ import annotations

import logging
import queue
import threading

import numpy as np

from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.sim.fourd import FourDConfig, FourDMicroscope

log = logging.getLogger(__name__)


class FourDBackend:
    """A scan backend that also streams each acquired frame's 4D-STEM patterns (Stream V2).

    Parameters
    ----------
    inner : SimulatedBackend
        The backend wrapped; every call but :meth:`acquire` goes to it unchanged.
    endpoint : str
        Where the detector's PUSH socket binds (port 0: the system picks; see :attr:`endpoint`).
    detector_px : int
        Detector pixels per side (the BF disk radius is a sixth of it).
    seed : int
        Seed of the patterns' shot noise.
    compression : {"none", "bslz4", "lz4"}
        Default ``none``: encoding bitshuffle-LZ4 in Python costs more than simulating the patterns.
    send_timeout_ms : int
        A pattern that cannot be sent for this long (no receiver) ends the series early; counted in
        :attr:`dropped`.

    Attributes
    ----------
    endpoint : str
    series_sent, patterns_sent, dropped : int
    """

    def __init__(self, inner, endpoint: str = "tcp://127.0.0.1:0", *, detector_px: int = 32, seed: int = 0,
                 compression: str = "none", send_timeout_ms: int = 10_000) -> None:
        from beamloop.streams.dectris.stream_v2 import Stream2Sender

        if int(detector_px) < 8:
            raise ValueError(f"detector_px must be at least 8, got {detector_px}")
        self.inner = inner
        self.detector_px = int(detector_px)
        self.config = FourDConfig(detector_shape=(self.detector_px, self.detector_px),
                                  disk_radius_px=self.detector_px / 6, df_width_px=self.detector_px / 4)
        self.model = FourDMicroscope(inner.specimen, self.config)
        self.rng = np.random.default_rng(seed)
        self.sender = Stream2Sender(endpoint, compression=compression, send_timeout_ms=send_timeout_ms)
        self.endpoint = self.sender.endpoint
        self.series_sent = self.patterns_sent = self.dropped = 0
        # the detector is its own device: it streams from its own thread, so the scan controller answers the
        # bridge (heartbeats) while the patterns go out, and a slow consumer never blocks it
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._stream, name="beamloop-4d-detector", daemon=True)
        self._thread.start()

    @classmethod
    def attach(cls, microscope, **kw) -> FourDBackend:
        """Wrap ``microscope.backend`` (a :class:`beamloop.edge.sim.microscope.SimulatedMicroscope`) in place;
        returns the wrapper (its :attr:`endpoint` is the 4D detector's)."""
        wrapper = cls(microscope.backend, **kw)
        microscope.backend = wrapper
        return wrapper

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def acquire(self, scan: ScanFrame, channels: tuple[str, ...]):
        """The wrapped backend's acquisition, then the frame's patterns streamed as one Stream V2 series
        (``user_data``: ``scan``, ``pixel_size_A``, ``kind`` ``"frame"``); returns the acquisition."""
        acq = self.inner.acquire(scan, channels)
        electrons = self.inner.electrons_per_s * scan.dwell_us * 1e-6
        pats = self.model.scan(scan, electrons, self.rng).reshape(-1, self.detector_px, self.detector_px)
        try:
            self._queue.put_nowait((scan, pats))
        except queue.Full:
            self.dropped += 1
            log.warning("4D detector: frame %d dropped, %d series still waiting to be sent", scan.frame_id,
                        self._queue.qsize())
        return acq

    def _stream(self) -> None:
        """The detector's thread: send each queued scan as one Stream V2 series."""
        tx = self.sender
        while True:
            item = self._queue.get()
            if item is None:
                return
            scan, pats = item
            ud = {"kind": "frame", "scan": scan.as_dict(), "pixel_size_A": scan.pixel_size_A, "simulated": True}
            try:
                tx.start_series(self.config.detector_shape, pats.dtype, len(pats), count_time=scan.dwell_us * 1e-6,
                                frame_time=scan.dwell_us * 1e-6, config={"user_data": ud})
                for p in pats:
                    tx.send_frame(p)
                    self.patterns_sent += 1
                tx.end_series()
                self.series_sent += 1
            except TimeoutError:
                self.dropped += 1
                log.warning("4D detector: frame %d's patterns could not be sent (no receiver?)", scan.frame_id)

    def close(self) -> None:
        """Stop the detector's thread (after the series queued) and close its socket."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(30)
        self.sender.close()
