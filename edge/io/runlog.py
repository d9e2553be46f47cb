"""The run file: frames, found columns, ground truth, the beam log and the dwells of one run, in HDF5.

Layout::

    /                       attrs: beamloop_version, created, config, complete, stopped, latency, counters,
                            accuracy (JSON)
    /frames/<k>/image       (rows, cols) detector counts, gzip
    /frames/<k>/columns     table x_px, y_px, intensity, score, class; attrs class_names, pixel_size_A, scan
    /frames/<k>/truth       table x_px, y_px, class (simulated frames)
    /frames/<k>/targets     table x_px, y_px, fx, fy
    /beam_log               table t_ns, call, sent, ok, error, rtt_us, x, y, frame_id, args (JSON); a run's
                            trigger decisions are rows of call ``trigger_decision`` (args: trigger_at,
                            series_id, decision_sample, blank_time_ns)
    /dwells                 table frame_id, fx, fy, reason, trigger_sample, samples, series_id,
                            ejection_sample, end_sample, trigger_at, blank_time_ns, service_trigger_sample
    /events                 JSON text of the scan controller's events (simulator)
    /trace                  per frame: image_id, frame_id, sent/recv/decoded ns, each stage's start, end and
                            CPU ns, gc_ns (:mod:`beamloop.edge.frame.trace`); attrs stages, clock, dropped

NeXus (NeXus Manual, NXdata base class, https://manual.nexusformat.org/classes/base_classes/NXdata.html): the
root is an ``NXroot`` whose ``default`` is ``frames``, ``/frames`` an ``NXentry`` whose ``default`` is its
first frame, and every ``/frames/<k>`` an ``NXdata`` group with ``signal = "image"`` (``units`` counts,
``long_name``, ``interpretation`` image) and ``axes = ["y", "x"]``: when the frame's pixel size is known,
``/frames/<k>/y`` and ``/x`` hold the pixel centres in nm (``units`` nm), else ``axes = [".", "."]``. So
HyperSpy, RosettaSciIO's NeXus reader (``rsciio.nexus``) and other NeXus tools open each frame as a
calibrated image.

Crash and disk safety: the file is written as ``NAME.part`` and renamed to ``NAME`` when it is closed, so a
run file of that name is always a closed, readable HDF5 file (and an older one is only replaced by a
complete new one, or by a readable partial one). Frames are appended and flushed one by one, so a run that
stops early (an interrupt, a lost controller) keeps what it recorded. Before every write the free space of
the file system and the process's file-size limit (``RLIMIT_FSIZE``) are checked against the write plus a
reserve for closing the file: a full disk stops the writing cleanly with :class:`RunLogError`, naming the
file, and the frames written before stay readable (root attribute ``complete`` false, ``stopped`` the
reason). A write that fails anyway (another process filled the disk meanwhile) is reported the same way;
the part file is then kept only if it still opens.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from beamloop.edge.control.client import BeamLogEntry
from beamloop.edge.frame.columns import ColumnTable
from beamloop.streams._disk import space_left

RESERVE_BYTES = 256 * 1024
"""Space kept free for closing the file (its metadata), bytes."""


class RunLogError(OSError):
    """The run file could not be written: no space left, the file-size limit, a read-only or failing disk.

    Its text names the file; ``errno`` is the underlying error number (``ENOSPC``, ``EFBIG``, ...) when known.
    """


def _json(obj) -> str:
    return json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))


class RunLog:
    """Writes one run to an HDF5 file (see the module docstring). Use as a context manager.

    Parameters
    ----------
    path : str or Path
        The run file (written as ``path.part`` until closed).
    config : dict, optional
        Stored as the root's ``config`` attribute (JSON).
    reserve_bytes : int
        Space kept free for closing the file (:data:`RESERVE_BYTES`).

    Attributes
    ----------
    frames_written : int
    error : str
        Why writing stopped, empty while all went well.

    Raises
    ------
    RunLogError
        The file cannot be created (no space, read-only folder, ...).
    """

    def __init__(self, path: str | Path, config: dict | None = None, *, reserve_bytes: int = RESERVE_BYTES) -> None:
        from beamloop.edge import __version__

        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.reserve_bytes = int(reserve_bytes)
        self.error = ""
        self._errno = 0
        self._write_failed = False  # a write raised (not just refused for space): the file may be damaged
        self.frames_written = 0
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._check_space("the new file", 4096)
            self._f = h5py.File(self.part, "w")
        except RunLogError:
            raise
        except OSError as exc:
            raise RunLogError(exc.errno or errno.EIO, f"{self.path}: cannot create the run file: "
                              f"{exc.strerror or exc}") from None
        self._write("the file header", 4096, lambda: self._header(__version__, config))

    def _header(self, version: str, config: dict | None) -> None:
        self._f.attrs["beamloop_version"] = version
        self._f.attrs["created"] = _dt.datetime.now(_dt.UTC).isoformat()
        self._f.attrs["config"] = _json(config or {})
        self._f.attrs["complete"] = False
        self._f.attrs["NX_class"] = "NXroot"
        self._f.attrs["default"] = "frames"
        self._frames = self._f.create_group("frames")
        self._frames.attrs["NX_class"] = "NXentry"

    # guarded writes ------------------------------------------------------------------------------------------
    def _check_space(self, what: str, nbytes: int) -> None:
        folder = self.part.parent
        try:
            left = space_left(folder, self.part)  # the file-size limit counts against the part file's size
        except OSError:
            return  # nothing to tell; the write itself will say
        need = 2 * int(nbytes) + self.reserve_bytes
        if left < need:
            raise RunLogError(errno.ENOSPC, f"{self.path}: no space left (disk full or the file-size limit) for "
                                            f"{what}: {left} bytes left, {need} needed with the reserve for "
                                            "closing the file")

    def _write(self, what: str, nbytes: int, write: Callable[[], None]) -> None:
        """Run ``write`` (and flush) if the space check passes; any failure becomes :class:`RunLogError`."""
        if self.error:
            raise RunLogError(self._errno or errno.EIO, f"{self.path}: not written ({what}): {self.error}")
        if self._closed:
            raise RunLogError(errno.EBADF, f"{self.path}: the run file is closed")
        try:
            self._check_space(what, nbytes)
        except RunLogError as exc:
            self._errno, self.error = exc.errno or errno.ENOSPC, exc.strerror or str(exc)
            raise
        try:
            write()
            self._f.flush()
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            found = re.search(r"errno = (\d+)", str(exc))  # HDF5 names the system error in its message
            code = getattr(exc, "errno", None) or (int(found.group(1)) if found else errno.EIO)
            self._errno, self.error = code, f"writing {what} failed: {exc}"
            self._write_failed = True
            raise RunLogError(code, f"{self.path}: {self.error}") from None

    # the file ------------------------------------------------------------------------------------------------
    def close(self, stopped: str = "") -> None:
        """Flush, close and rename the file to its name (closing twice is harmless).

        Parameters
        ----------
        stopped : str
            Why the run stopped early (stored as the root's ``stopped`` attribute); empty for a complete run.

        Raises
        ------
        RunLogError
            Closing failed and the part file does not open any more (it is removed; the error names the
            file). A file that stopped early on a full disk but opens is kept under its name, silently.
        """
        if self._closed:
            return
        self._closed = True
        closed_ok = not self._write_failed
        if self._f.id.valid:
            if not self._write_failed:  # the file is as the last flush left it: a few bytes of summary fit
                try:
                    self._f.attrs["complete"] = not (stopped or self.error)
                    self._f.attrs["stopped"] = stopped or self.error
                    self._f.attrs["frames_written"] = self.frames_written
                except Exception:  # noqa: BLE001 - the file is closed below whatever happens here
                    closed_ok = False
            try:
                self._f.close()
            except Exception as exc:  # noqa: BLE001 - h5py raises RuntimeError/OSError on a full disk
                closed_ok = False
                self.error = self.error or f"closing failed: {exc}"
        if closed_ok or self._readable():
            os.replace(self.part, self.path)
            return
        try:
            self.part.unlink()
        except OSError:
            pass
        raise RunLogError(self._errno or errno.EIO, f"{self.path}: the run file could not be closed and is "
                                                    f"unreadable ({self.error}); nothing was kept")

    def _readable(self) -> bool:
        """Whether the part file opens and every frame group in it can be listed."""
        try:
            with h5py.File(self.part, "r") as f:
                frames = f["frames"]
                for name in frames:
                    list(frames[name].keys())
                    dict(frames[name].attrs)
                return True
        except Exception:  # noqa: BLE001 - any failure to open or walk it means unreadable
            return False

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(stopped="" if exc is None else f"{type(exc).__name__}: {exc}"[:500])

    # contents ------------------------------------------------------------------------------------------------
    def add_frame(self, image: np.ndarray, columns: ColumnTable, *, pixel_size_A: float | None = None,
                  scan: dict | None = None, truth: tuple[np.ndarray, np.ndarray, tuple] | None = None,
                  targets: list | None = None, attrs: dict | None = None) -> int:
        """Append one frame and what was found in it (flushed at once); returns its index in ``/frames``.

        Raises
        ------
        RunLogError
            Not enough space for it (nothing of it is written), or the write failed.
        """
        nbytes = int(image.nbytes) + 64 * (len(columns) + (0 if truth is None else len(truth[0]))) + 4096

        def write() -> None:
            g = self._frames.create_group(f"{self.frames_written:06d}")
            im = g.create_dataset("image", data=image, compression="gzip", compression_opts=1)
            _nxdata_image(g, im, pixel_size_A)
            if self.frames_written == 0:
                self._frames.attrs["default"] = g.name.rsplit("/", 1)[-1]
            c = g.create_dataset("columns", data=columns.to_records())
            c.attrs["class_names"] = list(columns.class_names)
            if pixel_size_A:
                g.attrs["pixel_size_A"] = float(pixel_size_A)
            if scan:
                g.attrs["scan"] = _json(scan)
            for k, v in (attrs or {}).items():
                g.attrs[k] = v if isinstance(v, (int, float, str)) else _json(v)
            if truth is not None:
                xy, cls, names = truth
                rec = np.zeros(len(xy), dtype=[("x_px", "f4"), ("y_px", "f4"), ("class", "i1")])
                rec["x_px"], rec["y_px"], rec["class"] = xy[:, 0], xy[:, 1], cls
                t = g.create_dataset("truth", data=rec)
                t.attrs["class_names"] = list(names)
            if targets:
                rec = np.zeros(len(targets), dtype=[("x_px", "f4"), ("y_px", "f4"), ("fx", "f8"), ("fy", "f8")])
                for k, tg in enumerate(targets):
                    rec[k] = (tg.x_px, tg.y_px, tg.fx, tg.fy)
                g.create_dataset("targets", data=rec)

        self._write(f"frame {self.frames_written}", nbytes, write)
        self.frames_written += 1
        return self.frames_written - 1

    def write_beam_log(self, entries: list[BeamLogEntry]) -> None:
        """Write the bridge client's log (every call, refused ones included).

        Raises
        ------
        RunLogError
            As :meth:`add_frame`.
        """
        dt = [("t_ns", "i8"), ("call", "S24"), ("sent", "?"), ("ok", "?"), ("error", "S16"), ("rtt_us", "f8"),
              ("x", "f8"), ("y", "f8"), ("frame_id", "i8"), ("args", h5py.string_dtype())]
        rec = np.zeros(len(entries), dtype=dt)
        for k, e in enumerate(entries):
            x, y = e.args.get("x", np.nan), e.args.get("y", np.nan)
            try:
                x, y = float(x), float(y)
            except (TypeError, ValueError, OverflowError):
                x = y = np.nan
            fid = e.args.get("frame_id", -1)
            rec[k] = (e.t_ns, e.call.encode()[:24], e.sent, e.ok, e.error.encode()[:16], e.rtt_ns / 1e3, x, y,
                      fid if isinstance(fid, int) and -(1 << 63) <= fid < 1 << 63 else -1, _json(e.args)[:4096])
        self._write("the beam log", rec.nbytes + 256 * len(entries), lambda: self._f.create_dataset("beam_log",
                                                                                                      data=rec))

    def write_dwells(self, rows: list[dict]) -> None:
        """Write one row per dwell (``frame_id, fx, fy, reason, trigger_sample, samples, series_id`` and
        optional ``ejection_sample``, ``end_sample``, ``trigger_at`` (where the decision was made, ``controller``
        or ``service``), ``blank_time_ns`` (dwell start to blank, ns; NaN: unknown), ``service_trigger_sample``).

        Raises
        ------
        RunLogError
            As :meth:`add_frame`.
        """
        dt = [("frame_id", "i8"), ("fx", "f8"), ("fy", "f8"), ("reason", "S20"), ("trigger_sample", "i8"),
              ("samples", "i8"), ("series_id", "i8"), ("ejection_sample", "i8"), ("end_sample", "i8"),
              ("trigger_at", "S12"), ("blank_time_ns", "f8"), ("service_trigger_sample", "i8")]
        rec = np.zeros(len(rows), dtype=dt)
        for k, r in enumerate(rows):
            rec[k] = (r["frame_id"], r["fx"], r["fy"], r["reason"].encode()[:20], r["trigger_sample"], r["samples"],
                      r["series_id"], r.get("ejection_sample", -1), r.get("end_sample", -1),
                      str(r.get("trigger_at", "")).encode()[:12], r.get("blank_time_ns", np.nan),
                      r.get("service_trigger_sample", -1))
        self._write("the dwells", rec.nbytes, lambda: self._f.create_dataset("dwells", data=rec))

    def write_trace(self, records: np.ndarray, stages: tuple[str, ...], dropped: int = 0) -> None:
        """Write the per-frame trace (:class:`beamloop.edge.frame.trace.FrameTrace` records) as ``/trace``.

        Parameters
        ----------
        records : structured ndarray (n,)
            One record per frame (:func:`beamloop.edge.frame.trace.trace_dtype`), int64 nanoseconds of
            ``time.monotonic_ns()``, -1 where not measured.
        stages : tuple of str
            The stage names, in path order (stored as the attribute ``stages``).
        dropped : int
            Earlier frames the trace's ring no longer held (attribute ``dropped``).

        Raises
        ------
        RunLogError
            As :meth:`add_frame`.
        """
        rec = np.ascontiguousarray(records)

        def write() -> None:
            d = self._f.create_dataset("trace", data=rec)
            d.attrs["stages"] = _json(list(stages))
            d.attrs["clock"] = "time.monotonic_ns (CLOCK_MONOTONIC), nanoseconds; -1: not measured"
            d.attrs["dropped"] = int(dropped)

        self._write("the frame trace", rec.nbytes + 1024, write)

    def set_attrs(self, **attrs) -> None:
        """Store summary objects (latency, counters, accuracy, ...) as JSON attributes of the root.

        Raises
        ------
        RunLogError
            As :meth:`add_frame`.
        """
        texts = {k: _json(v) for k, v in attrs.items()}

        def write() -> None:
            for k, v in texts.items():
                self._f.attrs[k] = v

        self._write("summary attributes", sum(len(v) for v in texts.values()), write)

    def write_text(self, name: str, obj) -> None:
        """Store ``obj`` as a JSON text dataset.

        Raises
        ------
        RunLogError
            As :meth:`add_frame`.
        """
        text = _json(obj)
        self._write(name, len(text), lambda: self._f.create_dataset(name, data=text))


def _nxdata_image(g: h5py.Group, image: h5py.Dataset, pixel_size_A: float | None) -> None:
    """Make frame group ``g`` an NXdata group of the 2-D ``image`` (module docstring): attributes, and the
    ``y`` / ``x`` axes in nm when ``pixel_size_A`` is known."""
    g.attrs["NX_class"] = "NXdata"
    g.attrs["signal"] = "image"
    g.attrs["interpretation"] = "image"
    image.attrs["units"] = "counts"
    image.attrs["long_name"] = "detector counts"
    image.attrs["interpretation"] = "image"
    if image.ndim != 2:
        return
    if pixel_size_A and math.isfinite(pixel_size_A) and pixel_size_A > 0:
        for k, name in enumerate(("y", "x")):
            ax = g.create_dataset(name, data=np.arange(image.shape[k]) * (float(pixel_size_A) / 10.0))
            ax.attrs["units"] = "nm"
            ax.attrs["long_name"] = f"{name} (pixel centres from the top-left pixel's)"
            g.attrs[f"{name}_indices"] = np.int32(k)
        g.attrs["axes"] = ["y", "x"]
    else:
        g.attrs["axes"] = [".", "."]


def write_text_file(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it (never a truncated file).

    Raises
    ------
    RunLogError
        Naming the file, when it cannot be written (no space, read-only, ...).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise RunLogError(exc.errno or errno.EIO, f"{path}: {exc.strerror or exc}") from None
