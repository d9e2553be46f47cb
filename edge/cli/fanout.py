"""``beamloop fanout``: one detector stream reduced by N worker processes or machines, merged into live images.

``beamloop fanout merge --scan 64x64 --workers 4 --spawn 4 --detector tcp://DCU:9999 --series 7 --out DIR``
binds the merger's two endpoints (``--results``, ``--control``; ``tcp://*:PORT`` for other machines), starts
``--spawn`` workers on this machine (0: they run elsewhere), arms them with the series (the layout the
detector was armed with: ``--detector-shape``, ``--dtype``, ``--nimages``, and SIMPLON's series number
``--series``), waits for ``--workers`` of them, then writes every scan frame as it closes
(``<out>/frame_<k>_<name>.npy``) and, at the end, ``summary.json`` (counters, per-worker frames, dead workers).

``beamloop fanout worker --detector tcp://DCU:9999 --results tcp://MERGER:5701 --control tcp://MERGER:5702
--name node3`` is one worker (the same code on any machine that reaches the detector and the merger).

See :mod:`beamloop.streams.fanout` and :mod:`beamloop.streams.merge` for the rules (frame ids decide
completeness; a worker whose heartbeats stop is declared dead and its share counted missing).
Exit status: 0 done; 1 the workers did not come up; 3 no frame arrived; 6 the output could not be written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from beamloop.edge.cli.types import parse_count, parse_positive, parse_positive_int, parse_shape


def cmd_merge(a: argparse.Namespace) -> int:
    """``beamloop fanout merge``: see the module docstring; returns the exit status."""
    import numpy as np

    from beamloop.edge.cli import EXIT_NO_FRAMES, EXIT_OUTPUT, StopSignals, error
    from beamloop.edge.fanout_worker import spawn_workers
    from beamloop.streams.dectris.series import DetectorSeries
    from beamloop.streams.merge import FanoutMerger

    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        error("fanout", f"cannot create {out}: {exc.strerror or exc}")
        return EXIT_OUTPUT
    procs = []
    with StopSignals() as stop, FanoutMerger(a.scan, results=a.results, control=a.control,
                                             timeout_s=a.worker_timeout) as m:
        print(f"beamloop fanout merge: results {m.results_endpoint}, control {m.control_endpoint}", flush=True)
        if a.spawn:
            if not a.detector:
                error("fanout", "--spawn needs --detector")
                return 2
            procs = spawn_workers(a.spawn, a.detector, a.protocol, m.results_endpoint, m.control_endpoint,
                                  stack_size=a.stack)
        uid = f"simplon1-{a.series}" if a.protocol == "simplon1" else f"armed-{a.series}"
        series = DetectorSeries(a.protocol, a.series, uid, ("data",), tuple(a.detector_shape), np.dtype(a.dtype),
                                a.nimages)
        m.arm(series)
        try:
            if not m.wait_workers(a.workers, a.start_timeout, series_id=a.series):
                error("fanout", f"{a.workers} workers did not arm within {a.start_timeout:g} s "
                                f"(alive: {m.state.alive()})")
                return 1
            print(f"{a.workers} workers armed with series {a.series}; waiting for the detector", flush=True)
            closed, last, nframes = 0, time.monotonic(), 0
            t0 = None
            while not stop() and (a.frames is None or closed < a.frames):
                got = m.poll(100)
                now = time.monotonic()
                if m.state.counters.frames and t0 is None:
                    t0 = now
                if m.state.counters.frames > nframes:
                    nframes, last = m.state.counters.frames, now
                for r in got:
                    closed += 1
                    try:
                        for name, img in r.images.items():
                            np.save(out / f"frame_{r.index:05d}_{name}.npy", img)
                    except OSError as exc:
                        error("fanout", f"cannot write {out}: {exc.strerror or exc}")
                        return EXIT_OUTPUT
                    lost = f", lost with {', '.join(r.lost_with)}" if r.lost_with else ""
                    print(f"scan frame {r.index}: {r.received}/{r.expected} frames ({r.closed_by}{lost})", flush=True)
                if now - last > a.idle_timeout:
                    print(f"no results for {a.idle_timeout:g} s; stopping", flush=True)
                    break
            wall = (last - t0) if t0 is not None else 0.0
        finally:
            m.stop_workers()
            for _ in range(10):
                m.poll(50)
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.terminate()
        st = m.state
        summary = {"series": a.series, "scan": list(a.scan), "counters": st.counters.as_dict(), "wall_s": wall,
                   "frames_per_s": st.counters.frames / wall if wall > 0 else None,
                   "workers": {w.name: {"frames": w.frames, "alive": w.alive, "left": w.left,
                                        "died_at": w.died_at} for w in st.workers.values()}}
        try:
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
            if "sum_pattern" in st.sums:
                np.save(out / "sum_pattern.npy", st.sums["sum_pattern"])
        except OSError as exc:
            error("fanout", f"cannot write {out}: {exc.strerror or exc}")
            return EXIT_OUTPUT
        c = st.counters
        print(f"{c.closed} scan frames ({c.complete} complete, {c.missing} frames missing, {c.missing_dead} with "
              f"dead workers); {c.frames} frames merged; {c.deaths} worker deaths; wrote {out / 'summary.json'}",
              flush=True)
        return 0 if c.frames else EXIT_NO_FRAMES


def cmd_worker(a: argparse.Namespace) -> int:
    """``beamloop fanout worker``: one worker until the merger stops it (or SIGINT/SIGTERM); exit status 0."""
    from beamloop.edge.fanout_worker import worker_main

    got = worker_main(a.detector, a.protocol, a.results, a.control, a.name or None, stack_size=a.stack)
    print(json.dumps(got), file=sys.stderr)
    return 0


def register(sub) -> None:
    """Add ``fanout merge`` and ``fanout worker`` to the ``beamloop`` subcommands."""
    p = sub.add_parser("fanout", help="spread one detector stream over worker processes or machines, merge the "
                                      "live 4D images")
    fs = p.add_subparsers(dest="fanout_action", required=True)
    m = fs.add_parser("merge", help="the merger (and optionally local workers)")
    m.add_argument("--scan", type=parse_shape, required=True, help="probe positions ROWSxCOLS per scan frame")
    m.add_argument("--results", default="tcp://127.0.0.1:5701", help="endpoint the workers send results to")
    m.add_argument("--control", default="tcp://127.0.0.1:5702", help="endpoint the workers take control from")
    m.add_argument("--workers", type=parse_positive_int, required=True, help="workers to wait for")
    m.add_argument("--spawn", type=parse_count, default=0, help="worker processes to start on this machine")
    m.add_argument("--detector", default=None, help="the detector's endpoint (for --spawn)")
    m.add_argument("--protocol", choices=("simplon1", "stream2"), default="simplon1")
    m.add_argument("--series", type=parse_count, default=1, help="series number the detector was armed with")
    m.add_argument("--detector-shape", type=parse_shape, required=True, help="detector pixels ROWSxCOLS")
    m.add_argument("--dtype", choices=("uint8", "uint16", "uint32"), default="uint16")
    m.add_argument("--nimages", type=parse_count, default=0, help="frames the series announces (0: unknown)")
    m.add_argument("--frames", type=parse_positive_int, default=None, help="stop after this many scan frames")
    m.add_argument("--stack", type=parse_positive_int, default=64, help="frames per worker stack")
    m.add_argument("--worker-timeout-s", "--worker-timeout", dest="worker_timeout", type=parse_positive, default=2.0,
                   help="heartbeat silence after which a worker is dead, s")
    m.add_argument("--start-timeout-s", "--start-timeout", dest="start_timeout", type=parse_positive, default=120.0,
                   help="how long to wait for the workers, s")
    m.add_argument("--idle-timeout-s", "--idle-timeout", dest="idle_timeout",
                   type=parse_positive, default=30.0, help="stop after this long without results")
    m.add_argument("--out", default="out/fanout", help="output folder")
    m.set_defaults(func=cmd_merge)
    w = fs.add_parser("worker", help="one worker: PULL a share of the detector stream, reduce, report")
    w.add_argument("--detector", required=True, help="the detector's endpoint")
    w.add_argument("--protocol", choices=("simplon1", "stream2"), default="simplon1")
    w.add_argument("--results", required=True, help="the merger's results endpoint")
    w.add_argument("--control", required=True, help="the merger's control endpoint")
    w.add_argument("--name", default="", help="worker name (default host-pid)")
    w.add_argument("--stack", type=parse_positive_int, default=64, help="frames per stack")
    w.set_defaults(func=cmd_worker)
