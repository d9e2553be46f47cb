"""The run file: frames, found columns, ground truth, the beam log and the dwells of one run, in HDF5.

Layout::

    /                       attrs: beamloop_version, created, config, latency, counters, accuracy (JSON)
    /frames/<k>/image       (rows, cols) detector counts, gzip
    /frames/<k>/columns     table x_px, y_px, intensity, score, class; attrs class_names, pixel_size_A, scan
    /frames/<k>/truth       table x_px, y_px, class (simulated frames)
    /frames/<k>/targets     table x_px, y_px, fx, fy
    /beam_log               table t_ns, call, sent, ok, error, rtt_us, x, y, frame_id, args (JSON)
    /dwells                 table frame_id, fx, fy, reason, trigger_sample, samples, series_id
    /events                 JSON text of the scan controller's events (simulator)
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import h5py
import numpy as np

from beamloop.edge.control.client import BeamLogEntry
from beamloop.edge.frame.columns import ColumnTable


def _json(obj) -> str:
    return json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))


class RunLog:
    """Writes one run to an HDF5 file (see the module docstring). Use as a context manager.

    Raises
    ------
    OSError
        The file cannot be created.
    """

    def __init__(self, path: str | Path, config: dict | None = None) -> None:
        from beamloop.edge import __version__

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = h5py.File(self.path, "w")
        self._f.attrs["beamloop_version"] = __version__
        self._f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
        self._f.attrs["config"] = _json(config or {})
        self._frames = self._f.create_group("frames")
        self._n = 0

    def close(self) -> None:
        """Flush and close the file."""
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_frame(self, image: np.ndarray, columns: ColumnTable, *, pixel_size_A: float | None = None,
                  scan: dict | None = None, truth: tuple[np.ndarray, np.ndarray, tuple] | None = None,
                  targets: list | None = None, attrs: dict | None = None) -> int:
        """Append one frame and what was found in it; returns its index in ``/frames``."""
        g = self._frames.create_group(f"{self._n:06d}")
        g.create_dataset("image", data=image, compression="gzip", compression_opts=1)
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
            for k, t in enumerate(targets):
                rec[k] = (t.x_px, t.y_px, t.fx, t.fy)
            g.create_dataset("targets", data=rec)
        self._n += 1
        return self._n - 1

    def write_beam_log(self, entries: list[BeamLogEntry]) -> None:
        """Write the bridge client's log (every call, refused ones included)."""
        dt = [("t_ns", "i8"), ("call", "S24"), ("sent", "?"), ("ok", "?"), ("error", "S16"), ("rtt_us", "f8"),
              ("x", "f8"), ("y", "f8"), ("frame_id", "i8"), ("args", h5py.string_dtype())]
        rec = np.zeros(len(entries), dtype=dt)
        for k, e in enumerate(entries):
            x, y = e.args.get("x", np.nan), e.args.get("y", np.nan)
            try:
                x, y = float(x), float(y)
            except (TypeError, ValueError):
                x = y = np.nan
            fid = e.args.get("frame_id", -1)
            rec[k] = (e.t_ns, e.call.encode()[:24], e.sent, e.ok, e.error.encode()[:16], e.rtt_ns / 1e3, x, y,
                      fid if isinstance(fid, int) else -1, _json(e.args))
        self._f.create_dataset("beam_log", data=rec)

    def write_dwells(self, rows: list[dict]) -> None:
        """Write one row per dwell (``frame_id, fx, fy, reason, trigger_sample, samples, series_id`` and
        optional ``ejection_sample``, ``end_sample``)."""
        dt = [("frame_id", "i8"), ("fx", "f8"), ("fy", "f8"), ("reason", "S20"), ("trigger_sample", "i8"),
              ("samples", "i8"), ("series_id", "i8"), ("ejection_sample", "i8"), ("end_sample", "i8")]
        rec = np.zeros(len(rows), dtype=dt)
        for k, r in enumerate(rows):
            rec[k] = (r["frame_id"], r["fx"], r["fy"], r["reason"].encode()[:20], r["trigger_sample"], r["samples"],
                      r["series_id"], r.get("ejection_sample", -1), r.get("end_sample", -1))
        self._f.create_dataset("dwells", data=rec)

    def set_attrs(self, **attrs) -> None:
        """Store summary objects (latency, counters, accuracy, ...) as JSON attributes of the root."""
        for k, v in attrs.items():
            self._f.attrs[k] = _json(v)

    def write_text(self, name: str, obj) -> None:
        """Store ``obj`` as a JSON text dataset."""
        self._f.create_dataset(name, data=_json(obj))
