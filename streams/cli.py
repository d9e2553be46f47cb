"""``beamloop receive``, ``beamloop record`` and ``beamloop stream``: detector streams from the command line.

- ``beamloop receive tcp://DCU:9999 [--protocol simplon1|stream2|merlin] [--mode lossless|latest] [--scan 64x64]
  [--bf R] [--adf RIN ROUT] [--out DIR]``: receive and decode, print live counters once a second, and
  with ``--scan`` assemble virtual BF / ADF / centre-of-mass images of every channel (PNG and .npy in ``--out``).
- ``beamloop record tcp://DCU:9999 --out DIR [--format hdf5|zarr] [--prefix NAME] [--frames-per-file N]``:
  lossless recording of every channel to HDF5 (DECTRIS layout, bitshuffle-LZ4) or Zarr; prints one JSON line
  per flush (``{"event": "flushed", "frames": N, ...}``): those frames survive any crash of the recorder.
- ``beamloop stream SOURCE --bind tcp://127.0.0.1:9999 [--protocol simplon1|stream2|merlin] [--rate HZ]``: act as a
  detector: replay a recording (``*_master.h5``, every channel with Stream V2; bitshuffle-LZ4 chunks are sent
  as they are stored; or ``*.zarr``), or with ``SOURCE = sim4d`` a simulated 4D-STEM scan.

This module imports nothing outside :mod:`beamloop.streams`: the live imaging of ``receive --scan`` and the
frames of ``stream sim4d`` come from whoever registers the commands (:func:`register`; the ``beamloop``
command passes those of :mod:`beamloop.edge.cli.stream4d`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from beamloop.streams._cliargs import parse_positive, parse_shape
from beamloop.streams.receivers import PROTOCOL_NAMES

EXIT_OUTPUT = 6
"""Exit status when the output cannot be written (the value ``beamloop`` uses for every command)."""

PROTOCOLS = PROTOCOL_NAMES
"""Protocols the commands offer (``--protocol``): the receiver registry's (:mod:`beamloop.streams.receivers`)."""

FORMATS = ("hdf5", "zarr")
"""Recording formats (``record --format``; :data:`beamloop.streams.dectris.recorder.FORMATS`)."""


class LiveImager(Protocol):
    """Virtual images of a scan, assembled from frame stacks as they arrive (``receive --scan``)."""

    def update_stack(self, stack) -> None:
        """Add the frames of a :class:`beamloop.streams.dectris.series.FrameStack` (first channel) to the images;
        frame ``image_id`` belongs to scan position ``image_id % (rows * cols)`` in raster order."""

    def update(self, frames: np.ndarray, image_ids: np.ndarray) -> None:
        """Add ``frames`` (n, rows, cols) with their ``image_ids`` (n,): one channel of a stack (``receive``
        keeps one imager per channel of a series with several)."""

    @property
    def images(self) -> dict[str, np.ndarray]:
        """The images so far: name -> (rows, cols) array of the scan."""


class LiveImagerFactory(Protocol):
    """Makes the :class:`LiveImager` of a series (the ``live_imager`` of :func:`register`)."""

    def __call__(self, scan_shape: tuple[int, int], detector_shape: tuple[int, int], *,
                 bf_radius: float | None, adf_radii: tuple[float, float] | None,
                 centre: tuple[float, float] | None) -> LiveImager:
        """Parameters: the scan (rows, cols) and detector (rows, cols) shapes in pixels; the virtual
        bright-field disk radius and the annular dark-field radii (inner, outer), detector pixels; the beam
        centre (row, col), detector pixels. None: the provider's default."""


class LiveView(Protocol):
    """A running live view (the web page of ``receive --http``)."""

    url: str

    def stop(self) -> None:
        """Stop serving."""


class LiveViewFactory(Protocol):
    """Starts the live view of ``receive --http`` (the ``live_view`` of :func:`register`)."""

    def __call__(self, http: str, images: Callable[[], dict], counters: Callable[[], dict]) -> LiveView:
        """Parameters: ``HOST:PORT``; a callable giving the live images so far (name -> 2-D float array, NaN where
        not yet scanned) and one giving the receiver's counters (name -> int), both read at the view's own rate."""


class Sim4DSource(Protocol):
    """Frames of a simulated 4D-STEM scan (the ``sim4d_source`` of :func:`register`)."""

    def __call__(self, scan_shape: tuple[int, int], detector_px: int, electrons: float, seed: int) -> np.ndarray:
        """Returns ``(rows * cols, detector_px, detector_px)`` unsigned-integer diffraction patterns (uint8,
        uint16 or uint32), in raster order, with ``electrons`` electrons per probe position on average;
        the same ``seed`` gives the same frames."""


def register(subparsers, *, live_imager: LiveImagerFactory | None = None,
             sim4d_source: Sim4DSource | None = None, live_view: LiveViewFactory | None = None) -> None:
    """Add the ``receive``, ``record`` and ``stream`` subcommands.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        From ``ArgumentParser.add_subparsers()``.
    live_imager : LiveImagerFactory, optional
        Makes the virtual images of ``receive --scan``; without it ``--scan`` is refused (exit status 2).
    sim4d_source : Sim4DSource, optional
        Simulates the frames of ``stream sim4d``; without it that source is refused (exit status 2).
    live_view : LiveViewFactory, optional
        Serves ``receive --http`` (the live images and counters on a web page and ``/metrics``); without it
        ``--http`` is refused (exit status 2).
    """
    p = subparsers.add_parser("receive", help="receive a DECTRIS detector stream, show live counters and images")
    p.add_argument("endpoint", help="detector endpoint, e.g. tcp://192.168.1.10:9999 (SIMPLON v1) or :31001 (V2)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="simplon1")
    p.add_argument("--bind", action="store_true", help="bind instead of connecting (for senders that connect)")
    p.add_argument("--mode", choices=("lossless", "latest"), default="lossless")
    p.add_argument("--stack", type=int, default=64, help="frames per stack (default 64)")
    p.add_argument("--scan", type=parse_shape, help="scan shape ROWSxCOLS: assemble virtual images")
    p.add_argument("--bf", type=parse_positive, help="virtual BF disk radius, detector pixels (default: disk/1)")
    p.add_argument("--adf", type=parse_positive, nargs=2, metavar=("RIN", "ROUT"), help="virtual ADF radii, pixels")
    p.add_argument("--centre", type=float, nargs=2, metavar=("ROW", "COL"), help="beam centre (default: middle)")
    p.add_argument("--series", type=int, default=1, help="stop after this many series (0: never)")
    p.add_argument("--duration-s", "--duration", dest="duration",
                   type=parse_positive, help="stop after this many seconds")
    p.add_argument("--out", type=Path, help="write live images (PNG, .npy) and counters (JSON) here")
    p.add_argument("--quiet", action="store_true", help="no live counter lines")
    p.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="serve the live images and /metrics there (loopback; needs the web extra)")
    p.set_defaults(func=cmd_receive, live_imager=live_imager, live_view=live_view)

    p = subparsers.add_parser("record", help="record a detector stream losslessly to HDF5 (DECTRIS layout) or Zarr")
    p.add_argument("endpoint")
    p.add_argument("--out", type=Path, required=True, help="directory for <prefix>_master.h5 and data files")
    p.add_argument("--prefix", default="series", help="file name prefix (series number appended after the first)")
    p.add_argument("--format", choices=FORMATS, default="hdf5",
                   help="hdf5: <prefix>_master.h5 and data files; zarr: <prefix>.zarr (default hdf5)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="simplon1")
    p.add_argument("--bind", action="store_true")
    p.add_argument("--frames-per-file", type=int, default=1000)
    p.add_argument("--max-file-s", "--max-file-seconds", dest="max_file_seconds", type=parse_positive, default=1.0,
                   help="close a data file after this long even when not full (bounds loss on a crash)")
    p.add_argument("--series", type=int, default=1, help="stop after this many series (0: never)")
    p.set_defaults(func=cmd_record)

    p = subparsers.add_parser("stream", help="act as a DECTRIS detector: replay a recording or simulate 4D-STEM")
    p.add_argument("source", help="a *_master.h5 recording, or 'sim4d' for a simulated 4D-STEM scan")
    p.add_argument("--bind", default=None,
                   help="endpoint to bind (default loopback: tcp://127.0.0.1:9999 v1, :31001 V2, :6342 merlin; "
                        "tcp://*:PORT serves other machines)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="simplon1")
    p.add_argument("--compression", choices=("bslz4", "lz4", "none"), default="bslz4",
                   help="encoding of simulated frames (recordings are sent bitshuffle-LZ4 as stored)")
    p.add_argument("--rate", type=parse_positive, help="frames per second (default: as fast as the receiver takes)")
    p.add_argument("--wait-s", "--wait", dest="wait",
                   type=float, default=1.0, help="seconds to wait for receivers before the header")
    p.add_argument("--scan", type=parse_shape, default=(32, 32), help="sim4d: scan shape (default 32x32)")
    p.add_argument("--detector", type=int, default=96, help="sim4d: detector pixels per side (default 96)")
    p.add_argument("--electrons", type=parse_positive, default=5000.0, help="sim4d: electrons per probe position")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_stream, sim4d_source=sim4d_source)


# --- receive -----------------------------------------------------------------------------------------------------


class _Stop:
    """Set by SIGINT/SIGTERM so loops end cleanly."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, *_):
        self.flag = True

    def __call__(self) -> bool:
        return self.flag


def _status_line(c: dict, rate: float) -> str:
    return (f"frames {c['frames']:>9d}  {rate:9.0f}/s  decoded {c['decoded']:>9d}  gaps {c['gaps']} "
            f"(missing {c['missing_frames']})  dropped {c['dropped']}  rejected {c['rejected']}  "
            f"saturated {c['saturated']}")


def cmd_receive(a: argparse.Namespace) -> int:
    """``beamloop receive``: receive a detector stream, print live counters, assemble virtual images.

    Returns the exit status: 0, or 2 for ``--scan`` without a live imager registered.
    """
    from beamloop.streams.dectris.series import FrameStack, SeriesEnd, SeriesStart
    from beamloop.streams.errors import ProtocolError
    from beamloop.streams.receivers import open_receiver

    make_imager = getattr(a, "live_imager", None)
    if a.scan and make_imager is None:
        print("receive --scan: no live imager registered (beamloop.streams.cli.register(..., live_imager=...))",
              file=sys.stderr)
        return 2
    make_view = getattr(a, "live_view", None)
    if a.http and make_view is None:
        print("receive --http: no live view registered (beamloop.streams.cli.register(..., live_view=...))",
              file=sys.stderr)
        return 2
    stop = _Stop()
    t_end = time.monotonic() + a.duration if a.duration else None
    imagers: dict = {}
    ended = 0
    with open_receiver(a.endpoint, protocol=a.protocol, bind=a.bind, mode=a.mode, stack_size=a.stack) as rx:
        print(f"receiving {a.protocol} from {rx.endpoint} ({a.mode})", file=sys.stderr, flush=True)
        server = None
        if a.http:
            def images() -> dict:
                ims = dict(imagers)
                if len(ims) == 1:
                    return dict(next(iter(ims.values())).images)
                return {f"{ch}_{n}": v for ch, im in ims.items() for n, v in im.images.items()}

            def counters_now() -> dict:
                c = rx.counters.as_dict()
                return {"frames_received": c.get("frames", 0), "rejected": c.get("rejected", 0),
                        "dropped": c.get("dropped", 0) + c.get("missing_frames", 0)}

            server = make_view(a.http, images, counters_now)
            print(f"live view {server.url}", file=sys.stderr, flush=True)
        last_t, last_n = time.monotonic(), 0
        try:
            while not stop() and (t_end is None or time.monotonic() < t_end):
                try:
                    ev = rx.recv(200)
                except ProtocolError as exc:
                    print(f"rejected: {exc}", file=sys.stderr, flush=True)
                    continue
                if isinstance(ev, SeriesStart):
                    s = ev.series
                    print(f"series {s.series_id}: {s.number_of_images} frames of {s.shape[0]}x{s.shape[1]} {s.dtype}",
                          file=sys.stderr, flush=True)
                    if a.scan:
                        imagers = {ch: make_imager(a.scan, s.shape, bf_radius=a.bf,
                                                   adf_radii=tuple(a.adf) if a.adf else None,
                                                   centre=tuple(a.centre) if a.centre else None) for ch in s.channels}
                elif isinstance(ev, FrameStack) and imagers:
                    if len(imagers) == 1:
                        next(iter(imagers.values())).update_stack(ev)
                    else:  # every channel of the series, each into its own images
                        for ch, imager in imagers.items():
                            imager.update(ev.channels[ch].frames, ev.image_ids)
                elif isinstance(ev, SeriesEnd):
                    print(f"series {ev.series.series_id} ended: {ev.frames} frames, {ev.missing} missing",
                          file=sys.stderr, flush=True)
                    ended += 1
                    if a.series and ended >= a.series:
                        break
                now = time.monotonic()
                if not a.quiet and now - last_t >= 1.0:
                    c = rx.counters.as_dict()
                    print(_status_line(c, (c["frames"] - last_n) / (now - last_t)), file=sys.stderr, flush=True)
                    last_t, last_n = now, c["frames"]
        finally:
            if server is not None:
                server.stop()
        counters = rx.counters.as_dict()
    print(json.dumps(counters))
    if a.out is not None:
        _write_outputs(a.out, counters, imagers)
    return 0


def _write_outputs(out: Path, counters: dict, imagers: dict[str, LiveImager]) -> None:
    """``counters.json``, and with imagers each image as ``<name>.npy`` (``<channel>_<name>.npy`` when the
    series has several channels) and all in ``virtual_images.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "counters.json").write_text(json.dumps(counters, indent=1))
    if not imagers:
        return
    from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend stays as it is

    if len(imagers) == 1:
        imgs = next(iter(imagers.values())).images
    else:
        imgs = {f"{ch}_{name}".replace("/", "_"): img for ch, im in imagers.items() for name, img in im.images.items()}
    fig = Figure(figsize=(3 * len(imgs), 3.2))
    axes = fig.subplots(1, len(imgs))
    for ax, (name, img) in zip(np.atleast_1d(axes), imgs.items()):
        np.save(out / f"{name}.npy", img)
        ax.imshow(img, cmap="gray")
        ax.set_title(name)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "virtual_images.png", dpi=100)


# --- record ------------------------------------------------------------------------------------------------------


def cmd_record(a: argparse.Namespace) -> int:
    """``beamloop record``: record every channel of a detector stream losslessly to HDF5 (DECTRIS layout) or
    Zarr; exit status."""
    from beamloop.streams._disk import check_writable
    from beamloop.streams.dectris.recorder import RecorderError, make_recorder, record
    from beamloop.streams.receivers import open_receiver

    if a.frames_per_file < 1:
        print("--frames-per-file must be >= 1", file=sys.stderr)
        return 2
    try:
        check_writable(a.out)  # before listening: a detector's series must not start into a folder we cannot use
    except OSError as exc:
        print(f"beamloop record: error: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_OUTPUT
    stop = _Stop()
    count = [0]

    def emit(event: str, **kw) -> None:
        print(json.dumps({"event": event, **kw}), flush=True)

    fmt = getattr(a, "format", "hdf5")
    with open_receiver(a.endpoint, protocol=a.protocol, bind=a.bind, mode="lossless", decode=False) as rx:
        def factory(series):
            count[0] += 1
            prefix = a.prefix if count[0] == 1 else f"{a.prefix}_{count[0]:03d}"
            emit("series", series_id=series.series_id, prefix=prefix, nimages=series.number_of_images,
                 shape=list(series.shape), dtype=str(series.dtype), channels=list(series.channels))
            return make_recorder(fmt, a.out, prefix, frames_per_file=a.frames_per_file,
                                 max_file_seconds=a.max_file_seconds,
                                 on_flush=lambda n, info: emit("flushed", frames=n, **info),
                                 counters=rx.counters.as_dict)

        emit("listening", endpoint=rx.endpoint, protocol=a.protocol, format=fmt)
        try:
            masters = record(rx, factory, stop=stop, series_limit=a.series or None)
        except RecorderError as exc:
            emit("stopped", error=str(exc), counters=rx.counters.as_dict())
            print(f"beamloop record: error: {exc}; the frames flushed before are readable", file=sys.stderr)
            return EXIT_OUTPUT
        emit("done", masters=[str(m) for m in masters], counters=rx.counters.as_dict())
    return 0


# --- stream -------------------------------------------------------------------------------------------------------


def cmd_stream(a: argparse.Namespace) -> int:
    """``beamloop stream``: send a recording (every channel with Stream V2, the first with SIMPLON v1 and Merlin),
    or a simulated 4D-STEM scan, as SIMPLON v1, Stream V2 or a Merlin's MIB stream; exit status (2: missing
    recording, or ``sim4d`` without a simulator registered)."""
    from beamloop.streams.dectris import codecs

    endpoint = a.bind or {"simplon1": "tcp://127.0.0.1:9999", "stream2": "tcp://127.0.0.1:31001",
                          "merlin": "tcp://127.0.0.1:6342"}[a.protocol]  # loopback unless --bind says otherwise
    blobs = None  # channel -> iterator of stored bslz4 chunks (HDF5 recordings, sent as they are stored)
    if a.source == "sim4d":
        if a.sim4d_source is None:
            print("stream sim4d: no simulator registered (beamloop.streams.cli.register(..., sim4d_source=...))",
                  file=sys.stderr)
            return 2
        frames = a.sim4d_source(tuple(a.scan), a.detector, a.electrons, a.seed)
        chans = {"threshold_1": frames}
        shape, dtype, ct, n = frames.shape[1:], frames.dtype, 1e-4, len(frames)
        compression = a.compression
    else:
        from beamloop.streams.dectris.recorder import is_zarr, iter_chunks, read_channels, recording_info

        try:
            info = recording_info(a.source)
        except (OSError, KeyError) as exc:
            print(f"cannot read recording {a.source}: {exc}", file=sys.stderr)
            return 2
        shape, dtype, ct, n = info["shape"], info["dtype"], info["count_time"] or 1e-4, info["frames_recorded"]
        names = info["channels"] if a.protocol == "stream2" else info["channels"][:1]
        if a.protocol == "merlin" or is_zarr(a.source):
            chans = {ch: f for ch, f in read_channels(a.source)[0].items() if ch in names}
            compression = a.compression
        else:
            blobs = {ch: iter_chunks(a.source, ch) for ch in names}
            chans = dict.fromkeys(names)
            compression = codecs.BSLZ4
    if a.protocol == "merlin":
        return _stream_merlin(endpoint, next(iter(chans.values())), a)
    from beamloop.streams.dectris.simplon import SimplonSender
    from beamloop.streams.dectris.stream_v2 import Stream2Sender

    v1 = a.protocol == "simplon1"
    if v1:
        tx = SimplonSender(endpoint, encoding={"bslz4": "bslz4", "lz4": "lz4<", "none": "<"}[compression])
    else:
        tx = Stream2Sender(endpoint, compression=compression)
    with tx:
        print(f"streaming {n} frames of {shape[0]}x{shape[1]} {dtype} ({len(chans)} channel(s)) as {a.protocol} "
              f"on {tx.endpoint}", file=sys.stderr, flush=True)
        time.sleep(a.wait)
        if v1:
            tx.start_series(tuple(shape), dtype, n, count_time=ct, frame_time=ct)
        else:
            tx.start_series(tuple(shape), dtype, n, count_time=ct, frame_time=ct, channels=tuple(chans))
        period = 1.0 / a.rate if a.rate else 0.0
        t0 = time.monotonic()
        for i in range(n):
            if blobs is None:
                tx.send_frame(next(iter(chans.values()))[i] if v1 else {ch: f[i] for ch, f in chans.items()})
            elif v1:
                tx.send_blob(next(next(iter(blobs.values())))[1])
            else:
                tx.send_blobs({ch: next(it)[1] for ch, it in blobs.items()})
            if period:
                delay = t0 + (i + 1) * period - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        tx.end_series()
        rate = n / max(time.monotonic() - t0, 1e-9)
        print(f"sent {n} frames ({rate:.0f}/s)", file=sys.stderr, flush=True)
    return 0


def _stream_merlin(endpoint: str, frames: np.ndarray, a: argparse.Namespace) -> int:
    """Serve ``frames`` as one Merlin acquisition (counting mode) to the first receiver that connects."""
    from beamloop.streams.merlin.sender import MerlinServer, counting_mode

    try:
        ptype, depth = counting_mode(frames)
    except ValueError as exc:
        print(f"stream --protocol merlin: {exc}", file=sys.stderr)
        return 2
    with MerlinServer(endpoint) as tx:
        print(f"serving {len(frames)} frames of {frames.shape[1]}x{frames.shape[2]} as Merlin {ptype} "
              f"({depth}-bit) on {tx.endpoint}", file=sys.stderr, flush=True)
        tx.accept()
        t0 = time.monotonic()
        tx.send_acquisition(frames, ptype, depth, scan=tuple(a.scan) if a.source == "sim4d" else None)
        print(f"sent {len(frames)} frames ({len(frames) / max(time.monotonic() - t0, 1e-9):.0f}/s)",
              file=sys.stderr, flush=True)
    return 0
