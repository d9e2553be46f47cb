"""Lossless recording of detector streams to a Zarr store, in the layout of the HDF5 recorder.

``<prefix>.zarr`` (Zarr format 3, ``zarr`` package; Zarr v3 specification, zarr-specs.readthedocs.io):

``entry`` (attributes ``NX_class = NXentry``)
    ``entry/instrument/detector`` (group; attributes as the HDF5 master's NXdetector fields: ``count_time``,
    ``frame_time`` (s), ``bit_depth_image``, ``detectorSpecific`` with ``x_pixels_in_detector``,
    ``y_pixels_in_detector``, ``nimages``, ``stream_protocol``, ``series_id``, ``series_unique_id``,
    ``stream_config``);
    ``entry/data/<channel>``: one (n, rows, cols) array per channel of the series, named as the series names it
    (:func:`beamloop.streams.dectris.recorder.dataset_names`), chunks of ``chunk_frames`` frames (each chunk is
    one file of the store: one per frame, as in HDF5, would cost a file per frame), compressed with Blosc's
    LZ4 and bit shuffle (the Zarr counterpart of the bitshuffle-LZ4 HDF5 filter);
    ``entry/data/image_id``: the stream's 0-based frame ids (int64);
    ``entry/beamloop`` (attributes ``channels``, ``frames_recorded``, ``complete``, ``frames_announced``,
    ``counters``).

Frames are decoded from the stream's encoding (one compiled call per stack,
:func:`beamloop.streams.dectris.codecs.decode_stack`), staged, and written a whole chunk at a time (what is
left of a chunk at a flush is written then, and that chunk rewritten when it fills). What "flushed" means:
Zarr's local store writes every chunk and every metadata document to a temporary file and renames it into
place (an atomic replace), so after each flush (``frames_per_file`` frames, ``max_file_seconds``, or the end of
the series) the arrays' chunks up to ``frames_recorded`` are complete; :func:`read_zarr` reads only those;
frames staged since the last flush were never reported and are lost with the recorder, as the HDF5 recorder's
open ``.part`` file is.
Unlike the HDF5 recorder nothing is ``fsync``-ed: a recorder killed by SIGKILL loses no flushed frame, a
machine that loses power may.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from beamloop.streams.dectris import codecs
from beamloop.streams.dectris.recorder import dataset_names, init_recording
from beamloop.streams.dectris.series import DetectorSeries, FrameStack

log = logging.getLogger(__name__)

_GROW = 256  # frames the arrays grow by at least (each resize rewrites the arrays' metadata)
_ID_CHUNK = 4096  # frame ids per chunk of entry/data/image_id


def _compressor(itemsize: int):
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=itemsize)


class ZarrRecorder:
    """Writes the frames of one detector series, every channel, to ``<directory>/<prefix>.zarr``.

    The interface is :class:`beamloop.streams.dectris.recorder.Recorder`'s (``start``, ``write``, ``tick``,
    ``end``, ``close``, ``flushed``, ``written``, ``master_path``: here the store's directory), so
    :func:`beamloop.streams.dectris.recorder.record` drives either.

    Parameters
    ----------
    directory : path
        Created if missing.
    prefix : str
        Store name prefix.
    frames_per_file : int
        Frames between flushes (the HDF5 recorder's frames per data file).
    max_file_seconds : float
        Flush at least this often while frames arrive, bounding what a crash can lose.
    on_flush : callable(frames, info), optional
        Called after every flush with the number of frames now durable and a dict (``file``,
        ``image_nr_low``, ``image_nr_high``; 1-based, as the HDF5 recorder's).
    counters : callable() -> dict, optional
        Receiver counters to store at each flush.
    chunk_frames : int
        Frames per chunk of the arrays (default 32).

    Raises
    ------
    FileExistsError
        A store with this prefix exists already (recordings are never overwritten).
    ValueError
        ``frames_per_file`` < 1 or ``max_file_seconds`` <= 0.
    """

    def __init__(self, directory: str | Path, prefix: str = "series", *, frames_per_file: int = 1000,
                 max_file_seconds: float = 1.0, on_flush: Callable[[int, dict], None] | None = None,
                 counters: Callable[[], dict] | None = None, chunk_frames: int = 32) -> None:
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.chunk_frames = int(chunk_frames)
        self.prefix = prefix
        self.series: DetectorSeries | None = None
        init_recording(self, directory, f"{prefix}.zarr", frames_per_file, max_file_seconds, on_flush, counters)
        self.decode_errors = 0
        self._root = None
        self._arrays: dict = {}
        self._ids = None
        self._cap = 0
        self._last_flush = 0.0
        self._scratch: np.ndarray | None = None
        self._status: np.ndarray | None = None
        self._stage: dict[str, np.ndarray] = {}  # frames not yet written: staged[ch][:self._staged]
        self._stage_ids = np.zeros(0, np.int64)
        self._staged = 0
        self._stored = 0  # frames written to the store (the staged ones follow)
        self._ended = False

    # series ------------------------------------------------------------------------------------------------
    def start(self, series: DetectorSeries) -> None:
        """Begin recording ``series`` (every channel): create the store, its groups and arrays.

        Raises
        ------
        RuntimeError
            A series was already recorded with this recorder.
        ValueError
            The channel names do not map to distinct array names.
        """
        import zarr

        if self.series is not None:
            raise RuntimeError("a ZarrRecorder records one series; make a new one (another prefix) per series")
        names = dataset_names(tuple(series.channels))
        self.series = series
        root = zarr.open_group(store=str(self.master_path), mode="w-", zarr_format=3)
        entry = root.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        det = entry.create_group("instrument").create_group("detector")
        det.attrs.update({
            "NX_class": "NXdetector", "count_time": float(series.count_time), "frame_time": float(series.frame_time),
            "bit_depth_image": 8 * np.dtype(series.dtype).itemsize,
            "detectorSpecific": {
                "x_pixels_in_detector": int(series.shape[1]), "y_pixels_in_detector": int(series.shape[0]),
                "nimages": int(series.number_of_images), "stream_protocol": series.protocol,
                "series_id": int(series.series_id), "series_unique_id": series.series_unique_id,
                "stream_config": json.dumps(series.config, default=str)}})
        data = entry.create_group("data")
        data.attrs.update({"NX_class": "NXdata", "signal": names[series.channels[0]]})
        self._cap = _GROW
        itemsize = np.dtype(series.dtype).itemsize
        cf = self.chunk_frames
        self._arrays = {ch: data.create_array(names[ch], shape=(self._cap, *series.shape), chunks=(cf, *series.shape),
                                              dtype=np.dtype(series.dtype), compressors=_compressor(itemsize),
                                              fill_value=0)
                        for ch in series.channels}
        self._ids = data.create_array("image_id", shape=(self._cap,), chunks=(max(_ID_CHUNK // cf, 1) * cf,),
                                      dtype=np.int64, fill_value=-1)
        size = 4 * cf
        self._stage = {ch: np.empty((size, *series.shape), series.dtype) for ch in series.channels}
        self._stage_ids = np.empty(size, np.int64)
        # compile the stack decoder for this pixel type now, not on the first frames (numba)
        self._status = np.zeros(1, np.int8)
        self._scratch = np.empty((len(series.channels), 1, *series.shape), series.dtype)
        codecs.decode_stack(np.zeros(1, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64),
                            codecs.Codec(codecs.BSLZ4, itemsize), self._scratch[0], self._status)
        self._root = root
        self._bl = entry.create_group("beamloop")
        self._last_flush = time.monotonic()
        self._write_state()

    def write(self, stack: FrameStack) -> None:
        """Append a stack of frames, every channel (blocks while writing: the lossless back-pressure).

        Frames the receiver did not decode are decoded here; one whose blob fails to decode is left out of
        every channel, counted in :attr:`decode_errors` and logged.
        """
        if self.series is None:
            raise RuntimeError("write() before start()")
        n = len(stack)
        if n == 0:
            return
        s = self.series
        frames = {}
        good = np.ones(n, bool)
        for ch in s.channels:
            c = stack.channels[ch]
            if c.frames is not None:
                frames[ch] = c.frames[:n]
                continue
            if self._scratch is None or self._scratch.shape[1] < n:
                self._scratch = np.empty((len(s.channels), n, *s.shape), s.dtype)
                self._status = np.zeros(n, np.int8)
            out = self._scratch[s.channels.index(ch), :n]
            if codecs.decode_stack(c.arena, c.offsets[:n], c.lengths[:n], c.codec, out, self._status[:n]):
                bad = self._status[:n] != 0
                for i in np.flatnonzero(bad):
                    what = f"frame {stack.image_ids[i]} channel {ch!r}:"
                    log.warning("%s", codecs.status_error(self._status[i], what))
                good &= ~bad
            frames[ch] = out
        ids = stack.image_ids[:n]
        if not good.all():
            self.decode_errors += int((~good).sum())
            frames = {ch: f[good] for ch, f in frames.items()}
            ids = ids[good]
            n = len(ids)
            if n == 0:
                return
        self._put(frames, ids)
        self.written += n
        if self.written - self.flushed >= self.frames_per_file:
            self._flush()
        else:
            self.tick()

    def _put(self, frames: dict, ids: np.ndarray) -> None:
        """Stage ``frames`` (copied: the stack is the receiver's) and write every whole chunk staged."""
        n = len(ids)
        need = self._staged + n
        if need > len(self._stage_ids):  # a stack larger than the staging room: grow it, once
            size = max(need, 2 * len(self._stage_ids))
            for ch, a in self._stage.items():
                b = np.empty((size, *a.shape[1:]), a.dtype)
                b[:self._staged] = a[:self._staged]
                self._stage[ch] = b
            ids_b = np.empty(size, np.int64)
            ids_b[:self._staged] = self._stage_ids[:self._staged]
            self._stage_ids = ids_b
        k = self._staged
        for ch, f in frames.items():
            self._stage[ch][k:k + n] = f
        self._stage_ids[k:k + n] = ids
        self._staged = need
        cf = self.chunk_frames
        whole = ((self._stored + self._staged) // cf) * cf - self._stored  # staged frames that end on a chunk
        if whole > 0:
            self._store(whole)

    def _store(self, m: int) -> None:
        """Write the first ``m`` staged frames to the arrays and keep the rest staged."""
        k0 = self._stored
        s = self.series
        if k0 + m > self._cap:
            self._cap = max(k0 + m, 2 * self._cap, self._cap + _GROW)
            for arr in self._arrays.values():
                arr.resize((self._cap, *s.shape))
            self._ids.resize((self._cap,))
        for ch, arr in self._arrays.items():
            arr[k0:k0 + m] = self._stage[ch][:m]
        self._ids[k0:k0 + m] = self._stage_ids[:m]
        self._stored = k0 + m
        rest = self._staged - m
        if rest:
            for a in self._stage.values():
                a[:rest] = a[m:m + rest]
            self._stage_ids[:rest] = self._stage_ids[m:m + rest]
        self._staged = rest

    def tick(self) -> None:
        """Flush if frames were written more than ``max_file_seconds`` after the last flush (call when idle)."""
        if self.written > self.flushed and time.monotonic() - self._last_flush >= self.max_file_seconds:
            self._flush()

    def end(self, frames_announced: int | None = None) -> None:
        """Finish the series: trim the arrays to the frames written and record the final state."""
        if self.series is None:
            return
        for arr in self._arrays.values():
            arr.resize((self.written, *self.series.shape))
        self._ids.resize((self.written,))
        self._cap = self.written
        self._ended = True
        if self.written > self.flushed:
            self._flush(frames_announced)
        else:
            self._write_state(frames_announced)

    def close(self) -> None:
        """Finish if not finished (safe to call twice)."""
        if self.series is not None and not self._ended:
            self.end()

    def __enter__(self) -> ZarrRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _flush(self, frames_announced: int | None = None) -> None:
        if self._staged:  # what is left of a chunk: written now, rewritten when the chunk fills
            self._store(self._staged)
        low = self.flushed + 1
        self._write_state(frames_announced, frames=self.written)
        self.flushed = self.written
        self._last_flush = time.monotonic()
        if self.on_flush is not None:
            self.on_flush(self.flushed, {"file": self.master_path.name, "image_nr_low": low,
                                         "image_nr_high": self.flushed})

    def _write_state(self, frames_announced: int | None = None, frames: int | None = None) -> None:
        state = {"channels": list(self.series.channels), "frames_recorded": self.flushed if frames is None else frames,
                 "complete": bool(self._ended)}
        if frames_announced is not None:
            state["frames_announced"] = int(frames_announced)
        if self.counters is not None:
            state["counters"] = json.dumps(self.counters())
        self._bl.attrs.update(state)


def zarr_info(store: str | Path) -> dict:
    """:func:`beamloop.streams.dectris.recorder.recording_info` of a Zarr recording.

    Raises
    ------
    FileNotFoundError
        No store at ``store``.
    """
    import zarr

    if not Path(store).exists():
        raise FileNotFoundError(f"no Zarr recording at {store}")
    root = zarr.open_group(store=str(store), mode="r")
    det = dict(root["entry/instrument/detector"].attrs)
    spec = det["detectorSpecific"]
    bl = dict(root["entry/beamloop"].attrs)
    return {
        "format": "zarr",
        "shape": (int(spec["y_pixels_in_detector"]), int(spec["x_pixels_in_detector"])),
        "dtype": np.dtype(f"<u{int(det['bit_depth_image']) // 8}"),
        "channels": list(bl["channels"]),
        "count_time": float(det["count_time"]),
        "frame_time": float(det["frame_time"]),
        "nimages": int(spec["nimages"]),
        "frames_recorded": int(bl["frames_recorded"]),
        "complete": bool(bl["complete"]),
        "config": json.loads(spec["stream_config"]),
    }


def read_zarr(store: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`beamloop.streams.dectris.recorder.read_channels` of a Zarr recording: the flushed frames of
    every channel, ``{name: (n, rows, cols)}``, and their frame ids ``(n,)`` int64.

    Raises
    ------
    FileNotFoundError
        No store at ``store``.
    """
    import zarr

    info = zarr_info(store)
    n = info["frames_recorded"]
    root = zarr.open_group(store=str(store), mode="r")
    data = root["entry/data"]
    names = dataset_names(tuple(info["channels"]))
    frames = {ch: np.asarray(data[names[ch]][:n]) for ch in info["channels"]}
    return frames, np.asarray(data["image_id"][:n], np.int64)
