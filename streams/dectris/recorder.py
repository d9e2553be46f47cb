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
    ``/entry/data/<channel>``: one dataset per channel of the series, named as the series names it (Stream V2
    ``threshold_1``, ``threshold_2``, ``difference``; SIMPLON v1 ``data``), as DECTRIS' file writer keeps one
    dataset per threshold: (n, rows, cols) frames, one HDF5 chunk per frame, compressed with the
    bitshuffle-LZ4 filter (HDF5 filter 32008, as DECTRIS writes; read with ``import hdf5plugin``), attributes
    ``image_nr_low`` / ``image_nr_high`` (1-based, as DECTRIS); ``/entry/data/data`` is the first channel
    (an HDF5 hard link to it when it has another name), so tools that read DECTRIS files find it; and
    ``/entry/data/image_id`` (the stream's 0-based frame ids, so gaps are visible). The master's
    ``/entry/data`` links ``data_000001``, ... to the first channel and, when there are several channels,
    ``<channel>_000001``, ... to each of them; ``/entry/beamloop/channels`` lists the channel names (JSON).

NeXus attributes (NeXus Manual, NXdata base class), so that HyperSpy and RosettaSciIO's NeXus reader
(``rsciio.nexus``) open a recording as a stack of frames: every ``/entry/data`` is an ``NXdata`` group with
``interpretation = "image"`` (the last two axes are the detector's rows and columns); a data file's has
``signal = "data"`` and ``axes = ["image_id", ".", "."]`` (``image_id_indices`` 0), its datasets ``units``
counts and a ``long_name``; the master's has ``signal = "data_000001"``. The detector axes carry no length:
the recording does not know the camera length, so they stay in detector pixels.

A channel name that is not a plain HDF5 link name (empty, ``.``, containing ``/``, or one of ``data``
``image_id`` for a channel other than the first) is stored percent-encoded (``urllib.parse.quote``); the
readers return the names as the series sent them. :mod:`beamloop.streams.dectris.zarr_recorder` writes the
same layout to a Zarr store (``beamloop record --format zarr``); :func:`read_frames`, :func:`read_channels`
and :func:`recording_info` read both.

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

Disk safety. Before every chunk, data file and master the recorder checks the space it may still write
(:func:`beamloop.streams._disk.space_left`: free space and ``RLIMIT_FSIZE``) against twice the write plus a
reserve for closing the file. When it does not fit, the open data file is closed with what it holds (and
reported flushed), the master is written, and :class:`RecorderError` names the file: the recording stays
readable up to the last frame that fitted. (Letting HDF5 meet the full disk instead left a corrupt file and
crashed the process in h5py's clean-up.)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

from beamloop.streams._disk import space_left
from beamloop.streams.dectris import codecs
from beamloop.streams.dectris.series import DetectorSeries, FrameStack, SeriesEnd, SeriesStart
from beamloop.streams.errors import ProtocolError

log = logging.getLogger(__name__)

BITSHUFFLE_FILTER = 32008
"""HDF5 filter id of bitshuffle (registered with The HDF Group)."""
BITSHUFFLE_LZ4_OPTS = (0, 2)
"""Filter options: block size chosen automatically, LZ4 compression (bitshuffle's ``BSHUF_H5_COMPRESS_LZ4``)."""


FORMATS = ("hdf5", "zarr")
"""Recording formats (``beamloop record --format``)."""


def dataset_names(channels: tuple[str, ...]) -> dict[str, str]:
    """Channel name -> the name of its dataset (HDF5 link name, Zarr array name) in a recording.

    Parameters
    ----------
    channels : tuple of str
        The series' channel names, first channel first.

    Returns
    -------
    dict
        The name itself when it is a plain link name, else its percent-encoding (``urllib.parse.quote`` with
        no safe characters; ``%2E`` for ``.``). ``data`` and ``image_id`` are reserved for the first channel
        and the frame ids, so another channel of that name is encoded too (its first letter: ``%64ata``).

    Raises
    ------
    ValueError
        Two channels encode to the same name.
    """
    out = {}
    for k, ch in enumerate(channels):
        plain = ch not in ("", ".", "..", "image_id") and "/" not in ch and "%" not in ch and (k == 0 or ch != "data")
        if plain:
            out[ch] = ch
            continue
        enc = urllib.parse.quote(ch, safe="").replace(".", "%2E") or "%00"
        if enc == ch:  # a reserved name: encode its first character too
            enc = urllib.parse.quote(enc[0], safe="") if not enc[0].isalnum() else f"%{ord(enc[0]):02X}" + enc[1:]
        out[ch] = enc
    if len(set(out.values())) != len(out):
        raise ValueError(f"channel names {list(channels)} do not map to distinct dataset names")
    return out


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


RESERVE_BYTES = 256 * 1024
"""Space kept free for closing a data file and writing the master, bytes."""


def init_recording(rec, directory: str | Path, master_name: str, frames_per_file: int, max_file_seconds: float,
                   on_flush: Callable[[int, dict], None] | None, counters: Callable[[], dict] | None) -> None:
    """The settings every recorder (HDF5 :class:`Recorder`, Zarr) starts with, set on ``rec``.

    Sets ``directory`` (created), ``master_path`` (``directory / master_name``), ``frames_per_file``,
    ``max_file_seconds``, ``on_flush``, ``counters``, ``series`` (None), ``flushed`` and ``written`` (0).

    Raises
    ------
    ValueError
        ``frames_per_file`` < 1 or ``max_file_seconds`` <= 0.
    FileExistsError
        The master exists already (recordings are never overwritten).
    """
    if frames_per_file < 1 or not max_file_seconds > 0:
        raise ValueError(f"frames_per_file must be >= 1 and max_file_seconds > 0, got {frames_per_file}, "
                         f"{max_file_seconds}")
    rec.directory = Path(directory)
    rec.directory.mkdir(parents=True, exist_ok=True)
    rec.master_path = rec.directory / master_name
    if rec.master_path.exists():
        raise FileExistsError(f"{rec.master_path} exists; choose another prefix or directory")
    rec.frames_per_file = int(frames_per_file)
    rec.max_file_seconds = float(max_file_seconds)
    rec.on_flush = on_flush
    rec.counters = counters
    rec.series = None
    rec.flushed = 0
    rec.written = 0


class RecorderError(OSError):
    """The recording stopped: no space left or the file-size limit (``errno`` ENOSPC / EFBIG), or a write that
    failed; the text names the file. Everything flushed before stays readable."""


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

    reserve_bytes : int
        Space kept free for closing the files (:data:`RESERVE_BYTES`).

    Raises
    ------
    FileExistsError
        A master with this prefix exists already (recordings are never overwritten).
    RecorderError
        From :meth:`start` and :meth:`write`: the disk is full (see the module docstring).
    """

    def __init__(self, directory: str | Path, prefix: str = "series", *, frames_per_file: int = 1000,
                 max_file_seconds: float = 1.0, on_flush: Callable[[int, dict], None] | None = None,
                 counters: Callable[[], dict] | None = None, reserve_bytes: int = RESERVE_BYTES) -> None:
        import hdf5plugin  # noqa: F401  registers the bitshuffle filter with h5py

        self.prefix = prefix
        self.series: DetectorSeries | None = None
        init_recording(self, directory, f"{prefix}_master.h5", frames_per_file, max_file_seconds, on_flush, counters)
        self._files: list[dict] = []  # finished data files
        self._h5: h5py.File | None = None
        self._dsets: dict = {}
        self._names: dict[str, str] = {}
        self._ids = None
        self._fill = 0
        self._opened = 0.0
        self._scratch: np.ndarray | None = None
        self._ended = False
        self.reserve_bytes = int(reserve_bytes)
        self.error = ""

    def _check_space(self, what: Path, nbytes: int) -> None:
        """Raise :class:`RecorderError` unless ``2 * nbytes`` plus the reserve fit (module docstring)."""
        try:
            left = space_left(self.directory, what if what.exists() else None)
        except OSError:
            return  # nothing to tell; the write itself will say
        need = 2 * int(nbytes) + self.reserve_bytes
        if left < need:
            raise RecorderError(errno.ENOSPC, f"{what}: no space left (disk full or the file-size limit): "
                                              f"{left} bytes left, {need} needed with the reserve for closing")

    def _stop(self, exc: OSError, what: Path) -> RecorderError:
        """Close what is open with the frames it holds, write the master; the error to raise."""
        err = exc if isinstance(exc, RecorderError) else RecorderError(
            exc.errno or errno.EIO, f"{what}: write failed ({exc.strerror or exc})")
        self.error = str(err)
        if self._h5 is not None and isinstance(exc, RecorderError):  # refused before writing: the file is sound
            if self._fill:
                self._close_file()
            else:
                self._discard_file()
        elif self._h5 is not None:  # HDF5 met the error itself: the part file is not to be trusted
            try:
                self._h5.close()
            except Exception:  # noqa: BLE001 - closing a damaged file; it is removed next
                pass
            self._h5 = None
            self._part.unlink(missing_ok=True)
        self._ended = True
        try:
            self._write_master()
        except OSError:
            pass  # the master of the last flush stays in place
        return err

    # series ------------------------------------------------------------------------------------------------
    def start(self, series: DetectorSeries) -> None:
        """Begin recording ``series`` (every channel) and write the master.

        Raises
        ------
        RuntimeError
            A series was already recorded with this recorder.
        ValueError
            The channel names do not map to distinct dataset names (:func:`dataset_names`).
        """
        if self.series is not None:
            raise RuntimeError("a Recorder records one series; make a new one (another prefix) per series")
        self._names = dataset_names(tuple(series.channels))
        self.series = series
        self._scratch = np.empty(series.shape, series.dtype)
        self._write_master()

    def write(self, stack: FrameStack) -> None:
        """Append a stack of frames, every channel. Blocks while writing: in a lossless receive loop this is
        the back-pressure that slows the sender instead of dropping frames.

        Bitshuffle-LZ4 blobs (little-endian) are written as HDF5 chunks unchanged; other encodings are decoded
        (or taken from ``ChannelStack.frames`` when the receiver decoded them) and re-compressed.
        """
        if self.series is None:
            raise RuntimeError("write() before start()")
        if self._ended:
            raise RecorderError(errno.EIO, f"{self.directory}: the recording stopped earlier ({self.error})")
        chans = [(stack.channels[ch], self._names[ch]) for ch in self.series.channels]
        direct = [c.codec.algorithm == codecs.BSLZ4 and not c.codec.big_endian for c, _ in chans]
        frame_bytes = int(np.prod(self.series.shape)) * np.dtype(self.series.dtype).itemsize * len(chans)
        for i in range(len(stack)):
            target = self._part if self._h5 is not None else self.directory / (
                self._data_name(len(self._files) + 1) + ".part")
            try:
                self._check_space(target, frame_bytes + (65536 if self._h5 is None else 0))
                if self._h5 is None:
                    self._open_file()
                self._write_frame(stack, i, chans, direct)
            except OSError as exc:
                raise self._stop(exc, target) from None
            if self._fill == self.frames_per_file:
                try:
                    self._close_file()
                except OSError as exc:
                    raise self._stop(exc, target) from None
        self.tick()

    def _write_frame(self, stack: FrameStack, i: int, chans: list, direct: list[bool]) -> None:
        """Frame ``i`` of ``stack``, every channel, into the open data file."""
        k = self._fill
        for (ch, name), raw in zip(chans, direct):
            blob = ch.blob(i)
            if not raw:
                if ch.frames is not None:
                    frame = ch.frames[i]
                else:
                    codecs.decode_into(blob, ch.codec, self._scratch)
                    frame = self._scratch
                blob = codecs.encode(np.ascontiguousarray(frame),
                                     codecs.Codec(codecs.BSLZ4, frame.dtype.itemsize))
            self._dsets[name].id.write_direct_chunk((k, 0, 0), blob)
        self._ids[k] = stack.image_ids[i]
        self._fill = k + 1
        self.written += 1

    def tick(self) -> None:
        """Close the open data file if it has been open longer than ``max_file_seconds`` (call when idle)."""
        if self._h5 is not None and self._fill and time.monotonic() - self._opened >= self.max_file_seconds:
            self._close_file()

    def end(self, frames_announced: int | None = None) -> None:
        """Finish the series: close the open data file and write the final master (nothing more after a
        :class:`RecorderError`: the recording was closed then)."""
        if self.error:
            return
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
        d.attrs["signal"] = "data"
        d.attrs["axes"] = ["image_id", ".", "."]
        d.attrs["image_id_indices"] = np.int32(0)
        d.attrs["interpretation"] = "image"
        self._dsets = {}
        for ch in s.channels:
            name = self._names[ch]
            self._dsets[name] = d.create_dataset(
                name, shape=(self.frames_per_file, *s.shape), maxshape=(None, *s.shape), dtype=s.dtype,
                chunks=(1, *s.shape), compression=BITSHUFFLE_FILTER, compression_opts=BITSHUFFLE_LZ4_OPTS)
            self._dsets[name].attrs["units"] = "counts"
            self._dsets[name].attrs["long_name"] = f"detector counts ({ch or 'unnamed channel'})"
            self._dsets[name].attrs["interpretation"] = "image"
        first = self._names[s.channels[0]]
        if first != "data":
            d["data"] = self._dsets[first]  # a hard link: the DECTRIS name of the (first) data set
        self._ids = np.zeros(self.frames_per_file, np.int64)
        self._fill = 0
        self._opened = time.monotonic()
        self._part = part

    def _close_file(self) -> None:
        n = self._fill
        low = self.written - n + 1
        for dset in self._dsets.values():
            dset.resize(n, axis=0)
            dset.attrs["image_nr_low"] = np.uint64(low)
            dset.attrs["image_nr_high"] = np.uint64(low + n - 1)
        ids = self._h5["entry/data"].create_dataset("image_id", data=self._ids[:n])
        ids.attrs["long_name"] = "frame id (0-based, as the stream numbered it)"
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
            data.attrs["interpretation"] = "image"
            for k, info in enumerate(self._files, 1):
                data[f"data_{k:06d}"] = h5py.ExternalLink(info["file"], "/entry/data/data")
                for name in (self._names.values() if len(self._names) > 1 else ()):
                    if name != "data" and f"{name}_{k:06d}" not in data:
                        data[f"{name}_{k:06d}"] = h5py.ExternalLink(info["file"], f"/entry/data/{name}")
            bl = e.create_group("beamloop")
            bl["channels"] = json.dumps(list(s.channels))
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

_DATA_LINK = re.compile(r"^data_\d{6}$")


def is_zarr(recording: str | Path) -> bool:
    """Whether ``recording`` names a Zarr recording (a ``.zarr`` directory) rather than an HDF5 master."""
    path = Path(recording)
    return path.suffix == ".zarr" or path.is_dir()


def data_files(master: str | Path) -> list[Path]:
    """The data files an HDF5 master links, in order (those that exist).

    Raises ``FileNotFoundError`` for a missing master.
    """
    master = Path(master)
    with h5py.File(master, "r") as f:
        names = sorted(k for k in f["entry/data"] if _DATA_LINK.match(k))
        files = [f["entry/data"].get(k, getlink=True).filename for k in names]
    return [master.parent / name for name in files if (master.parent / name).exists()]


def _h5_channels(f: h5py.File) -> list[str]:
    bl = f["entry/beamloop"]
    return json.loads(bl["channels"][()]) if "channels" in bl else ["data"]  # recordings before channels


def read_channels(recording: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every channel of a recording (HDF5 master or Zarr store) and the frame ids.

    Parameters
    ----------
    recording : path
        ``<prefix>_master.h5`` or ``<prefix>.zarr``.

    Returns
    -------
    frames : dict
        Channel name (as the series named it) -> ndarray (n, rows, cols) of the recorded little-endian pixels.
    image_ids : ndarray (n,), int64
        The stream's 0-based frame ids.

    Raises
    ------
    FileNotFoundError
        Missing master or store.
    OSError
        A data file is corrupt (a crash never leaves one: see the module docstring).
    """
    if is_zarr(recording):
        from beamloop.streams.dectris.zarr_recorder import read_zarr

        return read_zarr(recording)
    import hdf5plugin  # noqa: F401

    with h5py.File(recording, "r") as f:
        channels = _h5_channels(f)
    names = dataset_names(tuple(channels))
    frames: dict[str, list] = {ch: [] for ch in channels}
    ids = []
    for path in data_files(recording):
        with h5py.File(path, "r") as f:
            d = f["entry/data"]
            for ch in channels:
                frames[ch].append(d[names[ch]][()])
            ids.append(d["image_id"][()])
    if not ids:
        info = recording_info(recording)
        empty = np.empty((0, *info["shape"]), info["dtype"])
        return {ch: empty.copy() for ch in channels}, np.empty(0, np.int64)
    return {ch: np.concatenate(v) for ch, v in frames.items()}, np.concatenate(ids)


def read_frames(recording: str | Path, channel: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The frames of one channel of a recording (HDF5 master or Zarr store) and their frame ids.

    Parameters
    ----------
    recording : path
        ``<prefix>_master.h5`` or ``<prefix>.zarr``.
    channel : str, optional
        Channel name; default the first channel of the series.

    Returns
    -------
    frames : ndarray (n, rows, cols)
    image_ids : ndarray (n,), int64

    Raises
    ------
    FileNotFoundError
        Missing master or store.
    KeyError
        No channel of that name.
    OSError
        A data file is corrupt.
    """
    frames, ids = read_channels(recording)
    if channel is None:
        return next(iter(frames.values())), ids
    if channel not in frames:
        raise KeyError(f"{recording}: no channel {channel!r}; it has {list(frames)}")
    return frames[channel], ids


def iter_chunks(master: str | Path, channel: str | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(image_id, bslz4 blob)`` for every recorded frame of one channel (default the first) of an
    HDF5 recording, without decompressing (for replay).

    Raises
    ------
    OSError
        A chunk was stored with another filter than bitshuffle-LZ4.
    KeyError
        No channel of that name.
    """
    with h5py.File(master, "r") as f:
        channels = _h5_channels(f)
    if channel is not None and channel not in channels:
        raise KeyError(f"{master}: no channel {channel!r}; it has {channels}")
    name = dataset_names(tuple(channels))[channel or channels[0]]
    for path in data_files(master):
        with h5py.File(path, "r") as f:
            dset = f[f"entry/data/{name}"]
            ids = f["entry/data/image_id"][()]
            for k in range(dset.shape[0]):
                mask, blob = dset.id.read_direct_chunk((k, 0, 0))
                if mask:
                    raise OSError(f"{path}: chunk {k} was stored with filter mask {mask}, not bitshuffle-LZ4")
                yield int(ids[k]), blob


def recording_info(recording: str | Path) -> dict:
    """Shape, dtype, channels, timing and counts of a recording (HDF5 master or Zarr store).

    Returns
    -------
    dict
        ``format`` ("hdf5" or "zarr"), ``shape`` (rows, cols), ``dtype``, ``channels`` (list of names),
        ``count_time`` and ``frame_time`` (s), ``nimages`` (announced), ``frames_recorded``, ``complete``,
        ``config`` (the stream's configuration).
    """
    if is_zarr(recording):
        from beamloop.streams.dectris.zarr_recorder import zarr_info

        return zarr_info(recording)
    with h5py.File(recording, "r") as f:
        det = f["entry/instrument/detector"]
        spec = det["detectorSpecific"]
        bits = int(det["bit_depth_image"][()])
        return {
            "format": "hdf5",
            "shape": (int(spec["y_pixels_in_detector"][()]), int(spec["x_pixels_in_detector"][()])),
            "dtype": np.dtype(f"<u{bits // 8}"),
            "channels": _h5_channels(f),
            "count_time": float(det["count_time"][()]),
            "frame_time": float(det["frame_time"][()]),
            "nimages": int(spec["nimages"][()]),
            "frames_recorded": int(f["entry/beamloop/frames_recorded"][()]),
            "complete": bool(f["entry/beamloop/complete"][()]),
            "config": json.loads(spec["stream_config"][()]),
        }


def make_recorder(fmt: str, directory: str | Path, prefix: str = "series", **kw):
    """A recorder of format ``fmt``: :class:`Recorder` (``"hdf5"``) or
    :class:`beamloop.streams.dectris.zarr_recorder.ZarrRecorder` (``"zarr"``); ``kw`` as :class:`Recorder`'s.

    Raises
    ------
    ValueError
        Unknown format.
    """
    if fmt == "hdf5":
        return Recorder(directory, prefix, **kw)
    if fmt == "zarr":
        from beamloop.streams.dectris.zarr_recorder import ZarrRecorder

        return ZarrRecorder(directory, prefix, **kw)
    raise ValueError(f"unknown recording format {fmt!r}; expected one of {FORMATS}")


def record(receiver, recorder_factory: Callable[[DetectorSeries], Recorder], *, idle_ms: int = 200,
           stop: Callable[[], bool] | None = None, series_limit: int | None = 1) -> list[Path]:
    """Record series from a receiver (:class:`beamloop.streams.dectris.receiver.DetectorReceiver`, lossless,
    ``decode=False``; or :class:`beamloop.streams.merlin.receiver.MerlinReceiver`): every channel of every stack.

    Parameters
    ----------
    recorder_factory : callable(series) -> Recorder
        Makes the recorder of each series (e.g. one prefix per series): a :class:`Recorder`, a
        :class:`beamloop.streams.dectris.zarr_recorder.ZarrRecorder` (:func:`make_recorder`).
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


# spectra: the HyperSpy (hspy) layout -----------------------------------------------------------------------
HSPY_FORMAT_VERSION = "3.3"
"""Version of the HyperSpy HDF5 format written (RosettaSciIO 0.x reads 1.0 .. 3.3; ``rsciio.hspy``)."""


class SpectrumRecorder:
    """Records a series of 1-D spectra (an EELS point series) to one HDF5 file in the HyperSpy layout.

    Layout (the ``hspy`` format of HyperSpy and RosettaSciIO, ``rsciio/hspy/specifications.yaml``): root
    attributes ``file_format = "HyperSpy"``, ``file_format_version``; ``/Experiments/<title>/data`` (n, channels)
    counts, one HDF5 chunk per spectrum, gzip; ``axis-0`` the points (``navigate`` true), ``axis-1`` the energy
    loss (``units`` eV, ``scale`` the dispersion, ``offset`` the energy of channel 0, ``navigate`` false);
    ``metadata/Signal`` ``signal_type = "EELS"``, ``metadata/General`` ``title``,
    ``metadata/Acquisition_instrument/TEM/Detector/EELS`` ``resolution_eV`` when known; ``original_metadata``
    holds the series' ``user_data`` (JSON, attribute ``beamloop_user_data``) and ``probe_positions`` (n, 2) when
    given. HyperSpy (with exspy) opens it as an ``EELSSpectrum`` with the calibrated energy axis; beamloop's own
    :func:`read_spectra` reads it too.

    Crash safety: the file is written as ``<name>.part`` and renamed when :meth:`end` has written the final
    axis sizes; a crash leaves the ``.part`` file, whose ``data`` holds every spectrum written (its ``axis-0``
    size may lag).

    Parameters
    ----------
    path : str or Path
        The file (``.hspy`` or ``.h5``).
    offset_eV, dispersion_eV : float
        Energy of channel 0's centre and eV per channel.
    channels : int
        Channels per spectrum.
    dtype : numpy dtype
        Of the counts (default uint32).
    title : str
        The signal's title (and the group's name under ``/Experiments``).
    resolution_eV : float, optional
    user_data : mapping, optional
        Stored in ``original_metadata`` as JSON.

    Attributes
    ----------
    written : int
        Spectra written.

    Raises
    ------
    ValueError
        A calibration that is not finite, a dispersion <= 0, channels < 1, or a title that is not a plain HDF5
        name.
    OSError
        The file cannot be created.
    """

    def __init__(self, path: str | Path, offset_eV: float, dispersion_eV: float, channels: int, *,
                 dtype=np.uint32, title: str = "EELS", resolution_eV: float | None = None,
                 user_data: dict | None = None) -> None:
        import math

        if not (math.isfinite(offset_eV) and math.isfinite(dispersion_eV) and dispersion_eV > 0):
            raise ValueError(f"energy calibration offset {offset_eV!r} eV, dispersion {dispersion_eV!r} eV must be "
                             "finite with dispersion > 0")
        if not (isinstance(channels, (int, np.integer)) and channels >= 1):
            raise ValueError(f"channels must be a whole number >= 1, got {channels!r}")
        if not title or "/" in title or title in (".", ".."):
            raise ValueError(f"title {title!r} must be a plain HDF5 name (no '/')")
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.channels = int(channels)
        self.title = title
        self.written = 0
        self._positions: list[tuple[float, float]] = []
        self._file = h5py.File(self.part, "w")
        f = self._file
        f.attrs["file_format"] = "HyperSpy"
        f.attrs["file_format_version"] = HSPY_FORMAT_VERSION
        g = f.create_group(f"Experiments/{title}")
        self._data = g.create_dataset("data", shape=(0, self.channels), maxshape=(None, self.channels),
                                      dtype=np.dtype(dtype), chunks=(1, self.channels), compression="gzip")
        self._axis0 = g.create_group("axis-0")
        for k, v in {"name": "point", "units": "", "scale": 1.0, "offset": 0.0, "size": 0, "navigate": True,
                     "is_binned": False}.items():
            self._axis0.attrs[k] = v
        ax1 = g.create_group("axis-1")
        for k, v in {"name": "Energy loss", "units": "eV", "scale": float(dispersion_eV), "offset": float(offset_eV),
                     "size": self.channels, "navigate": False, "is_binned": True}.items():
            ax1.attrs[k] = v
        md = g.create_group("metadata")
        md.create_group("General").attrs["title"] = title
        sig = md.create_group("Signal")
        sig.attrs["signal_type"] = "EELS"
        if resolution_eV is not None:
            md.create_group("Acquisition_instrument/TEM/Detector/EELS").attrs["resolution_eV"] = float(resolution_eV)
        om = g.create_group("original_metadata")
        om.attrs["beamloop_user_data"] = json.dumps(user_data or {}, default=str)
        self._om = om

    def write(self, spectra: np.ndarray, probe_position: tuple[float, float] | None = None) -> None:
        """Append one spectrum (channels,) or several (k, channels); ``probe_position`` ``(x, y)`` (fractions of
        the scan frame) for a single spectrum.

        Raises
        ------
        ValueError
            Another number of channels.
        RuntimeError
            After :meth:`end`.
        """
        if self._file is None:
            raise RuntimeError("SpectrumRecorder.write() after end()")
        s = np.asarray(spectra)
        s = s.reshape(1, -1) if s.ndim == 1 else s
        if s.ndim != 2 or s.shape[1] != self.channels:
            raise ValueError(f"spectra of shape {np.shape(spectra)} do not have {self.channels} channels")
        n = self.written
        self._data.resize(n + len(s), axis=0)
        self._data[n:n + len(s)] = s
        self.written += len(s)
        self._axis0.attrs["size"] = self.written
        if probe_position is not None:
            self._positions.append((float(probe_position[0]), float(probe_position[1])))

    def end(self) -> Path:
        """Write the final sizes, close, ``fsync`` and rename the file into place; returns its path."""
        if self._file is None:
            return self.path
        if self._positions and len(self._positions) == self.written:
            self._om.create_dataset("probe_positions", data=np.asarray(self._positions, np.float64))
        self._file.close()
        self._file = None
        _fsync_path(self.part)
        os.replace(self.part, self.path)
        _fsync_dir(self.path.parent)
        return self.path

    def __enter__(self) -> SpectrumRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.end()


def read_spectra(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """The spectra of a :class:`SpectrumRecorder` file: data (n, channels), energies (channels,) float64 eV (channel
    centres from ``axis-1``), and the signal's metadata (``title``, ``signal_type``, ``user_data``).

    Raises
    ------
    OSError
        Not such a file (no ``/Experiments`` group with one signal).
    """
    with h5py.File(path, "r") as f:
        exps = list(f.get("Experiments", {}))
        if len(exps) != 1:
            raise OSError(errno.EINVAL, f"{path}: expected one signal under /Experiments, found {len(exps)}")
        g = f["Experiments"][exps[0]]
        data = g["data"][()]
        ax = g["axis-1"].attrs
        energy = float(ax["offset"]) + float(ax["scale"]) * np.arange(int(ax["size"]), dtype=np.float64)
        meta = {"title": str(g["metadata/General"].attrs["title"]),
                "signal_type": str(g["metadata/Signal"].attrs["signal_type"]),
                "user_data": json.loads(g["original_metadata"].attrs.get("beamloop_user_data", "{}"))}
    return data, energy, meta


def record_spectra(receiver, path: str | Path, *, title: str = "EELS", timeout_ms: int = 2000,
                   stop: Callable[[], bool] | None = None) -> Path:
    """Record the next spectrum series of a native stream receiver
    (:class:`beamloop.streams.native.receiver.FrameReceiver`) to ``path`` with :class:`SpectrumRecorder`: the
    calibration from its header (:func:`beamloop.streams.native.protocol.energy_axis`), every spectrum of its
    first channel with the image's ``probe_position``, until its ``end`` (or ``timeout_ms`` of silence, or
    ``stop()``: what arrived is kept). Non-spectrum series before it are skipped.

    Raises
    ------
    TimeoutError
        No spectrum series started within ``timeout_ms``.
    beamloop.streams.errors.ProtocolError
        A malformed message (as the receiver raises it).
    """
    from beamloop.streams.events import SeriesEnd as NativeEnd
    from beamloop.streams.events import SeriesStart as NativeStart
    from beamloop.streams.native import protocol as native

    rec: SpectrumRecorder | None = None
    try:
        while stop is None or not stop():
            ev = receiver.recv(timeout_ms)
            if ev is None:
                if rec is None:
                    raise TimeoutError(f"no spectrum series within {timeout_ms} ms")
                break
            if isinstance(ev, NativeStart):
                axis = native.energy_axis(ev.series)
                if axis is None:
                    continue
                if rec is not None:
                    break
                rec = SpectrumRecorder(path, axis.offset_eV, axis.dispersion_eV, axis.channels,
                                       dtype=ev.series.dtype, title=title, resolution_eV=axis.resolution_eV,
                                       user_data=ev.series.user_data)
            elif isinstance(ev, NativeEnd):
                if rec is not None:
                    break
            elif rec is not None and ev.series.user_data.get("kind") == native.SPECTRUM_KIND:
                pos = ev.header.user_data.get("probe_position")
                ok = isinstance(pos, list) and len(pos) == 2 and all(isinstance(v, (int, float)) for v in pos)
                rec.write(ev.spectrum(), tuple(pos) if ok else None)
    finally:
        if rec is not None:
            rec.end()
    return Path(path)
