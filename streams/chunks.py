"""Chunked reading of a recording, for workers that each read their own part (Dask, several processes).

A recording (:mod:`beamloop.streams.dectris.recorder`: an HDF5 master with data files in the DECTRIS layout,
bitshuffle-LZ4 chunks of one frame each; or a Zarr store) is split into :class:`Partition` objects: a run of
consecutive frames of one data file (HDF5) or of the store (Zarr). A partition is a small picklable
description; :func:`read_partition` opens the file in the process that runs it and reads only those frames
(the recorder's one-frame bitshuffle-LZ4 chunks are read raw and decoded by beamloop's numba decoder, which
releases the GIL; anything else goes through HDF5's ``hdf5plugin`` filter). The layout written is not changed
here: this module only reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from beamloop.streams.dectris.recorder import data_files, dataset_names, is_zarr, recording_info


@dataclass(frozen=True)
class Partition:
    """Frames ``start:stop`` of one data file (or of a Zarr store) of a recording.

    Attributes
    ----------
    path : str
        The HDF5 data file, or the Zarr store.
    dataset : str
        The channel's dataset name in ``entry/data`` (:func:`beamloop.streams.dectris.recorder.dataset_names`).
    start, stop : int
        Frame indices within that file or store.
    index : int
        Position of the partition in the recording (0-based, in order).
    zarr : bool
        Whether ``path`` is a Zarr store.
    """

    path: str
    dataset: str
    start: int
    stop: int
    index: int
    zarr: bool = False

    def __len__(self) -> int:
        return self.stop - self.start


def partitions(recording: str | Path, frames_per_partition: int = 256, channel: str | None = None) -> list[Partition]:
    """Split a recording into partitions of at most ``frames_per_partition`` frames (never across data files).

    Parameters
    ----------
    recording : path
        ``<prefix>_master.h5`` or ``<prefix>.zarr``.
    frames_per_partition : int
        >= 1.
    channel : str, optional
        Channel name; default the series' first.

    Returns
    -------
    list of Partition, in frame order

    Raises
    ------
    ValueError
        ``frames_per_partition`` < 1.
    KeyError
        No channel of that name.
    FileNotFoundError
        No such recording.
    """
    if int(frames_per_partition) < 1:
        raise ValueError(f"frames_per_partition must be >= 1, got {frames_per_partition}")
    step = int(frames_per_partition)
    rec = Path(recording)
    if not rec.exists():
        raise FileNotFoundError(f"no recording at {rec}")
    info = recording_info(rec)
    channels = list(info["channels"])
    ch = channels[0] if channel is None else channel
    if ch not in channels:
        raise KeyError(f"{rec}: no channel {ch!r}; it has {channels}")
    name = dataset_names(tuple(channels))[ch]
    out: list[Partition] = []
    if is_zarr(rec):
        n = int(info["frames_recorded"])
        return [Partition(str(rec), name, a, min(a + step, n), k, True) for k, a in enumerate(range(0, n, step))]
    import h5py

    for path in data_files(rec):
        with h5py.File(path, "r") as f:
            n = int(f["entry/data/image_id"].shape[0])
        for a in range(0, n, step):
            out.append(Partition(str(path), name, a, min(a + step, n), len(out)))
    return out


def read_partition(part: Partition) -> tuple[np.ndarray, np.ndarray]:
    """The frames and frame ids of one partition.

    Returns
    -------
    frames : ndarray (n, rows, cols), the recording's little-endian dtype
    image_ids : ndarray (n,), int64

    Raises
    ------
    OSError
        The file cannot be read (corrupt, missing).
    """
    if part.zarr:
        import zarr

        data: Any = zarr.open_group(store=part.path, mode="r")["entry/data"]
        return (np.asarray(data[part.dataset][part.start:part.stop]),
                np.asarray(data["image_id"][part.start:part.stop], np.int64))
    import h5py
    import hdf5plugin  # noqa: F401  (registers the bitshuffle filter)

    with h5py.File(part.path, "r") as f:
        d = f["entry/data"]
        dset = d[part.dataset]
        ids = np.asarray(d["image_id"][part.start:part.stop], np.int64)
        frames = _direct_bslz4(dset, part.start, part.stop)
        if frames is None:  # chunks of another layout or filter: through HDF5's own filter pipeline
            frames = dset[part.start:part.stop]
        return frames, ids


def _direct_bslz4(dset, start: int, stop: int) -> np.ndarray | None:
    """Frames ``start:stop`` of a dataset chunked one frame per chunk with the bitshuffle-LZ4 filter, read as raw
    chunks (``H5Dread_chunk``) and decoded by one numba call that releases the GIL
    (:func:`beamloop.streams.dectris.codecs.decode_stack`; h5py holds a global lock while HDF5 decompresses, so
    threads reading through the filter pipeline take turns). None when the layout is not that one."""
    from beamloop.streams.dectris import codecs

    if dset.chunks is None or tuple(dset.chunks) != (1, *dset.shape[1:]) or dset.dtype.kind != "u":
        return None
    blobs = []
    for k in range(start, stop):
        mask, blob = dset.id.read_direct_chunk((k, 0, 0))
        if mask:
            return None
        blobs.append(blob)
    lengths = np.fromiter((len(b) for b in blobs), np.int64, len(blobs))
    offsets = np.zeros(len(blobs), np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    arena = np.frombuffer(b"".join(blobs), np.uint8)
    dtype = dset.dtype.newbyteorder("<")
    out = np.empty((len(blobs), *dset.shape[1:]), dtype)
    status = np.zeros(len(blobs), np.int8)
    if codecs.decode_stack(arena, offsets, lengths, codecs.Codec(codecs.BSLZ4, dtype.itemsize), out, status):
        return None  # a chunk that does not decode as the stream's bslz4 framing: let HDF5 try
    return out

