"""Lossless, crash-safe recording of detector streams to HDF5 in the DECTRIS file-writer layout.

Layout (as a DECTRIS DCU's file writer and NeXus NXmx write it, so DECTRIS users and their tools find
their way):

``<prefix>_master.h5``
    ``/entry`` (NXentry) with ``/entry/instrument/detector`` (NXdetector: ``count_time``, ``frame_time``,
    ``bit_depth_image``, ``detectorSpecific/{x,y}_pixels_in_detector``, ``nimages``, the stream's
    configuration as JSON) and ``/entry/data`` (NXdata) holding external links ``data_000001``,
    ``data_000002``, ... to the data files' ``/entry/data/data``; ``/entry/beamloop`` holds the receiver's
    counters and the number of frames recorded.
``<prefix>_data_000001.h5``, ...
    ``/entry/data/data``: (n, rows, cols) frames, one HDF5 chunk per frame, compressed with the
    bitshuffle-LZ4 filter (HDF5 filter 32008, as DECTRIS writes; read with ``import hdf5plugin``), attributes
    ``image_nr_low`` / ``image_nr_high`` (1-based, as DECTRIS), and ``/entry/data/image_id`` (the stream's
    0-based frame ids, so gaps are visible).

Frames that arrive bit-shuffled and LZ4-compressed are written as HDF5 chunks unchanged
(``write_direct_chunk``): the bslz4 stream framing *is* the filter's chunk format, so recording is
bit-exact by construction and costs no compression. Other encodings are decoded and re-compressed.

Crash safety (what "flushed" means). A data file is written under a temporary name (``.h5.part``),
closed, ``fsync``-ed and renamed to its final name when it holds ``frames_per_file`` frames, when it
has been open ``max_file_seconds``, or when the series ends. Then the master is rewritten under a
temporary name, fsync-ed and renamed over the old master (an atomic replace), linking every finished data
file. Only then are the frames reported as flushed (:attr:`Recorder.flushed`, the ``on_flush`` callback,
and the ``{"event": "flushed", ...}`` lines of ``beamloop record``). A recorder killed at any instant, even
with SIGKILL, leaves a master and data files in which every reported frame is readable and intact; at
most the frames of the one open ``.part`` file are lost, and those were never reported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

from beamloop.streams.dectris import codecs
from beamloop.streams.dectris.series import DetectorSeries, FrameStack, SeriesEnd, SeriesStart
from beamloop.streams.errors import ProtocolError

log = logging.getLogger(__name__)

BITSHUFFLE_FILTER = 32008
"""HDF5 filter id of bitshuffle (registered with The HDF Group)."""
BITSHUFFLE_LZ4_OPTS = (0, 2)
"""Filter options: block size chosen automatically, LZ4 compression (bitshuffle's ``BSHUF_H5_COMPRESS_LZ4``)."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_path(path)
    except OSError:  # some file systems cannot fsync a directory
        pass


class Recorder:
    """Writes the frames of one detector series to ``<directory>/<prefix>_master.h5`` and data files.

    Parameters
    ----------
    directory : path
        Created if missing.
    prefix : str
        File name prefix (DECTRIS ``name_pattern``).
    frames_per_file : int
        Frames per data file (DECTRIS ``nimages_per_file``).
    max_file_seconds : float
        Close a data file after this long even when not full, bounding how much a crash can lose.
    on_flush : callable(frames, info), optional
        Called after every flush with the number of frames now durable and a dict (``file``,
        ``image_nr_low``, ``image_nr_high``).
    counters : callable() -> dict, optional
        Receiver counters to store in the master at each flush.

    Raises
    ------
    FileExistsError
        A master with this prefix exists already (recordings are never overwritten).
    """

    def __init__(self, directory: str | Path, prefix: str = "series", *, frames_per_file: int = 1000,
                 max_file_seconds: float = 1.0, on_flush: Callable[[int, dict], None] | None = None,
                 counters: Callable[[], dict] | None = None) -> None:
        import hdf5plugin  # noqa: F401  registers the bitshuffle filter with h5py

        if frames_per_file < 1 or not max_file_seconds > 0:
            raise ValueError(f"frames_per_file must be >= 1 and max_file_seconds > 0, got {frames_per_file}, "
                             f"{max_file_seconds}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.master_path = self.directory / f"{prefix}_master.h5"
        if self.master_path.exists():
            raise FileExistsError(f"{self.master_path} exists; choose another prefix or directory")
        self.frames_per_file = int(frames_per_file)
        self.max_file_seconds = float(max_file_seconds)
        self.on_flush = on_flush
        self.counters = counters
        self.series: DetectorSeries | None = None
        self.flushed = 0
        self.written = 0
        self._files: list[dict] = []  # finished data files
        self._h5: h5py.File | None = None
        self._dset = None
        self._ids = None
        self._fill = 0
        self._opened = 0.0
        self._scratch: np.ndarray | None = None
        self._ended = False

    # series ------------------------------------------------------------------------------------------------
    def start(self, series: DetectorSeries) -> None:
        """Begin recording ``series`` (first channel) and write the master. Raises ``RuntimeError`` when a
        series was already recorded with this recorder."""
        if self.series is not None:
            raise RuntimeError("a Recorder records one series; make a new one (another prefix) per series")
        self.series = series
        self._scratch = np.empty(series.shape, series.dtype)
        self._write_master()

    def write(self, stack: FrameStack) -> None:
        """Append a stack of frames (its first channel). Blocks while writing: in a lossless receive loop
        this is the back-pressure that slows the sender instead of dropping frames."""
        if self.series is None:
            raise RuntimeError("write() before start()")
        ch = stack.channels[self.series.channels[0]]
        codec = ch.codec
        direct = codec.algorithm == codecs.BSLZ4 and not codec.big_endian
        for i in range(len(stack)):
            if self._h5 is None:
                self._open_file()
            blob = ch.blob(i)
            if not direct:
                if ch.frames is not None:
                    frame = ch.frames[i]
                else:
                    codecs.decode_into(blob, codec, self._scratch)
                    frame = self._scratch
                blob = codecs.encode(np.ascontiguousarray(frame), codecs.Codec(codecs.BSLZ4, frame.dtype.itemsize))
            k = self._fill
            self._dset.id.write_direct_chunk((k, 0, 0), blob)
            self._ids[k] = stack.image_ids[i]
            self._fill = k + 1
            self.written += 1
            if self._fill == self.frames_per_file:
                self._close_file()
        self.tick()

    def tick(self) -> None:
        """Close the open data file if it has been open longer than ``max_file_seconds`` (call when idle)."""
        if self._h5 is not None and self._fill and time.monotonic() - self._opened >= self.max_file_seconds:
            self._close_file()

    def end(self, frames_announced: int | None = None) -> None:
        """Finish the series: close the open data file and write the final master."""
        if self._h5 is not None:
            if self._fill:
                self._close_file()
            else:
                self._discard_file()
        self._ended = True
        self._write_master(frames_announced)

    def close(self) -> None:
        """Finish if not finished (safe to call twice)."""
        if self.series is not None and not self._ended:
            self.end()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # data files --------------------------------------------------------------------------------------------
    def _data_name(self, k: int) -> str:
        return f"{self.prefix}_data_{k:06d}.h5"

    def _open_file(self) -> None:
        s = self.series
        k = len(self._files) + 1
        part = self.directory / (self._data_name(k) + ".part")
        self._h5 = h5py.File(part, "w", libver=("v110", "latest"))
        g = self._h5.create_group("entry")
        g.attrs["NX_class"] = "NXentry"
        d = g.create_group("data")
        d.attrs["NX_class"] = "NXdata"
        self._dset = d.create_dataset("data", shape=(self.frames_per_file, *s.shape), maxshape=(None, *s.shape),
                                      dtype=s.dtype, chunks=(1, *s.shape), compression=BITSHUFFLE_FILTER,
                                      compression_opts=BITSHUFFLE_LZ4_OPTS)
        self._ids = np.zeros(self.frames_per_file, np.int64)
        self._fill = 0
        self._opened = time.monotonic()
        self._part = part

    def _close_file(self) -> None:
        n = self._fill
        low = self.written - n + 1
        self._dset.resize(n, axis=0)
        self._dset.attrs["image_nr_low"] = np.uint64(low)
        self._dset.attrs["image_nr_high"] = np.uint64(low + n - 1)
        self._h5["entry/data"].create_dataset("image_id", data=self._ids[:n])
        self._h5.close()
        self._h5 = None
        _fsync_path(self._part)
        final = self.directory / self._data_name(len(self._files) + 1)
        os.replace(self._part, final)
        self._files.append({"file": final.name, "file_frames": n, "image_nr_low": low, "image_nr_high": low + n - 1})
        self._write_master()
        self.flushed = low + n - 1
        if self.on_flush is not None:
            self.on_flush(self.flushed, dict(self._files[-1]))

    def _discard_file(self) -> None:
        self._h5.close()
        self._h5 = None
        self._part.unlink(missing_ok=True)

    def _write_master(self, frames_announced: int | None = None) -> None:
        s = self.series
        tmp = self.directory / (self.master_path.name + ".part")
        with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
            e = f.create_group("entry")
            e.attrs["NX_class"] = "NXentry"
            inst = e.create_group("instrument")
            inst.attrs["NX_class"] = "NXinstrument"
            det = inst.create_group("detector")
            det.attrs["NX_class"] = "NXdetector"
            det["count_time"] = s.count_time
            det["count_time"].attrs["units"] = "s"
            det["frame_time"] = s.frame_time
            det["frame_time"].attrs["units"] = "s"
            det["bit_depth_image"] = np.uint32(8 * np.dtype(s.dtype).itemsize)
            spec = det.create_group("detectorSpecific")
            spec["x_pixels_in_detector"] = np.uint32(s.shape[1])
            spec["y_pixels_in_detector"] = np.uint32(s.shape[0])
            spec["nimages"] = np.uint64(s.number_of_images)
            spec["stream_protocol"] = s.protocol
            spec["series_id"] = np.uint64(s.series_id)
            spec["series_unique_id"] = s.series_unique_id
            spec["stream_config"] = json.dumps(s.config, default=str)
            data = e.create_group("data")
            data.attrs["NX_class"] = "NXdata"
            data.attrs["signal"] = "data_000001"
            for k, info in enumerate(self._files, 1):
                data[f"data_{k:06d}"] = h5py.ExternalLink(info["file"], "/entry/data/data")
            bl = e.create_group("beamloop")
            bl["frames_recorded"] = np.uint64(sum(i["file_frames"] for i in self._files))
            bl["complete"] = bool(self._ended)
            if frames_announced is not None:
                bl["frames_announced"] = np.uint64(frames_announced)
            if self.counters is not None:
                bl["counters"] = json.dumps(self.counters())
        _fsync_path(tmp)
        os.replace(tmp, self.master_path)
        _fsync_dir(self.directory)


# --- reading ------------------------------------------------------------------------------------------------


def data_files(master: str | Path) -> list[Path]:
    """The data files a master links, in order (those that exist).

    Raises ``FileNotFoundError`` for a missing master.
    """
    master = Path(master)
    with h5py.File(master, "r") as f:
        names = sorted(k for k in f["entry/data"] if k.startswith("data_"))
        files = [f["entry/data"].get(k, getlink=True).filename for k in names]
    return [master.parent / name for name in files if (master.parent / name).exists()]


def read_frames(master: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All frames of a recording and their frame ids.

    Returns
    -------
    frames : ndarray (n, rows, cols)
    image_ids : ndarray (n,), int64

    Raises
    ------
    FileNotFoundError
        Missing master.
    OSError
        A data file is corrupt (a crash never leaves one: see the module docstring).
    """
    import hdf5plugin  # noqa: F401

    frames, ids = [], []
    for path in data_files(master):
        with h5py.File(path, "r") as f:
            frames.append(f["entry/data/data"][()])
            ids.append(f["entry/data/image_id"][()])
    if not frames:
        with h5py.File(master, "r") as f:
            d = f["entry/instrument/detector/detectorSpecific"]
            shape = (int(d["y_pixels_in_detector"][()]), int(d["x_pixels_in_detector"][()]))
            bits = int(f["entry/instrument/detector/bit_depth_image"][()])
        return np.empty((0, *shape), f"<u{bits // 8}"), np.empty(0, np.int64)
    return np.concatenate(frames), np.concatenate(ids)


def iter_chunks(master: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(image_id, bslz4 blob)`` for every recorded frame without decompressing (for replay)."""
    for path in data_files(master):
        with h5py.File(path, "r") as f:
            dset = f["entry/data/data"]
            ids = f["entry/data/image_id"][()]
            for k in range(dset.shape[0]):
                mask, blob = dset.id.read_direct_chunk((k, 0, 0))
                if mask:
                    raise OSError(f"{path}: chunk {k} was stored with filter mask {mask}, not bitshuffle-LZ4")
                yield int(ids[k]), blob


def recording_info(master: str | Path) -> dict:
    """Shape, dtype, timing and counts of a recording (from its master)."""
    with h5py.File(master, "r") as f:
        det = f["entry/instrument/detector"]
        spec = det["detectorSpecific"]
        bits = int(det["bit_depth_image"][()])
        return {
            "shape": (int(spec["y_pixels_in_detector"][()]), int(spec["x_pixels_in_detector"][()])),
            "dtype": np.dtype(f"<u{bits // 8}"),
            "count_time": float(det["count_time"][()]),
            "frame_time": float(det["frame_time"][()]),
            "nimages": int(spec["nimages"][()]),
            "frames_recorded": int(f["entry/beamloop/frames_recorded"][()]),
            "complete": bool(f["entry/beamloop/complete"][()]),
            "config": json.loads(spec["stream_config"][()]),
        }


def record(receiver, recorder_factory: Callable[[DetectorSeries], Recorder], *, idle_ms: int = 200,
           stop: Callable[[], bool] | None = None, series_limit: int | None = 1) -> list[Path]:
    """Record series from a :class:`beamloop.streams.dectris.receiver.DetectorReceiver` (lossless, ``decode=False``).

    Parameters
    ----------
    recorder_factory : callable(series) -> Recorder
        Makes the recorder of each series (e.g. one prefix per series).
    idle_ms : int
        Receive timeout; on each timeout the open data file is closed if it is old enough.
    stop : callable() -> bool, optional
        Polled between events; recording stops (finishing the open series) when it returns True.
    series_limit : int or None
        Stop after this many series ended (None: never).

    Returns the master files written. Protocol errors are counted by the receiver and logged; they never
    stop the recording.
    """
    rec: Recorder | None = None
    masters: list[Path] = []
    ended = 0
    try:
        while stop is None or not stop():
            try:
                ev = receiver.recv(idle_ms)
            except ProtocolError as exc:
                log.warning("rejected message: %s", exc)
                continue
            if ev is None:
                if rec is not None:
                    rec.tick()
                continue
            if isinstance(ev, SeriesStart):
                if rec is not None:
                    rec.end()
                rec = recorder_factory(ev.series)
                rec.start(ev.series)
                masters.append(rec.master_path)
            elif isinstance(ev, SeriesEnd):
                if rec is not None:
                    rec.end(ev.series.number_of_images)
                    rec = None
                ended += 1
                if series_limit is not None and ended >= series_limit:
                    break
            elif rec is not None:
                rec.write(ev)
    finally:
        if rec is not None:
            rec.end()
    return masters
