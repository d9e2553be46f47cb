"""``beamloop serve``: the edge service on a frame stream, optionally driving an experiment.

Exit status (:mod:`beamloop.edge.cli`): 0 done; 3 no frame arrived (an experiment's frame, or any frame
without one); 4 the scan controller was lost; 5 a blank was not confirmed; 6 ``serve.h5`` could not be
written (it keeps what was written before); 128 + the signal after SIGINT/SIGTERM, once the beam was blanked
and the frames so far were written. ``serve.h5`` is written frame by frame.

``--http HOST:PORT`` serves the live view and ``/metrics`` (:func:`beamloop.edge.app.start_monitor`) while it
runs; its stop button ends the service as SIGINT does (exit 130, the beam blanked).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from beamloop.edge.cli.types import parse_count, parse_positive


def _stream_summary(rx, stats) -> str:
    """The receiver's and the service's counters, with a hint when frame ids went missing."""
    c = rx.counters
    text = (f"stream: {c.frames} frames, {c.rejected} rejected ({c.last_error or 'no errors'}), {c.gaps} gaps / "
            f"{c.missing_frames} missing frames; service: {stats.frame_errors} bad frames, {stats.series_rejected} "
            f"series ({stats.frames_rejected} frames) rejected for their metadata")
    if c.gaps or c.missing_frames or c.unexpected:
        text += ("; frames went missing: another consumer on the frame stream? (a PUSH socket deals its "
                 "messages out among all its consumers)")
    return text


def _run(a: argparse.Namespace, service, rl, codes: list[int]) -> str:
    """The experiment, or frames until idle; appends exit statuses to ``codes``; returns why it stopped early
    (empty when it did not)."""
    from beamloop.edge.cli import EXIT_NO_FRAMES, STOP_EXIT, error
    from beamloop.edge.experiments.vacancy_line import ExperimentConfig, ExperimentStopped, vacancy_line
    from beamloop.edge.service import Interrupted, frame_image

    if a.experiment == "vacancy-line":
        exp = ExperimentConfig(rounds=a.rounds, targets_per_frame=a.targets,
                               drift_frames=0 if a.lock_on == "none" else 2)

        def record(rec) -> None:
            rl.add_frame(rec.image, rec.columns, pixel_size_A=rec.pixel_size_A, scan=rec.scan.as_dict(),
                         targets=rec.targets, attrs={"frame_id": rec.scan.frame_id, "round": rec.index})

        try:
            vacancy_line(service, exp, lambda t: print(t, flush=True), on_record=record)
        except ExperimentStopped as exc:
            codes.append(128 + exc.signum if exc.reason == "interrupted" else STOP_EXIT.get(exc.reason, 1))
            error("serve", f"experiment stopped ({exc.reason}): {exc.message}")
            return f"{exc.reason}: {exc.message}"
        return ""
    n, stopped = 0, ""
    try:
        while a.max_frames is None or n < a.max_frames:
            got = service.next_frame(int(a.idle_timeout * 1000))
            if got is None:
                print(f"no frame for {a.idle_timeout} s; stopping", flush=True)
                if n == 0:
                    stopped = "no frame arrived"
                    codes.append(EXIT_NO_FRAMES)
                break
            ev, res, scan = got
            rl.add_frame(frame_image(ev), res.columns, pixel_size_A=res.meta.pixel_size_A if res.meta else None,
                         attrs={"image_id": ev.image_id, "series_id": ev.series.series_id})
            n += 1
            if a.verbose:
                print(f"frame {ev.image_id}: {len(res.columns)} columns", flush=True)
    except Interrupted as exc:
        stopped = str(exc)
        codes.append(128 + exc.signum)
    print(f"processed {n} frames", flush=True)
    return stopped


def _finish(service, bridge, rx, rl, codes: list[int], stopped: str) -> None:
    """Write the beam log and the summary, and close the run file (appending 6 to ``codes`` if that fails)."""
    from beamloop.edge.cli import EXIT_OUTPUT, error
    from beamloop.edge.io.runlog import RunLogError

    try:
        if bridge is not None:
            rl.write_beam_log(bridge.log)
        st = service.stats
        rl.set_attrs(latency=service.latency.summary(), stream_counters=rx.counters.as_dict(),
                     trigger_at={"requested": service.trigger_at_requested, "used": service.trigger_at,
                                 "note": service.trigger_at_note},
                     service={"frame_errors": st.frame_errors, "series_rejected": st.series_rejected,
                              "frames_rejected": st.frames_rejected, "errors": st.errors[-10:]})
    except RunLogError as exc:
        if EXIT_OUTPUT not in codes:
            codes.append(EXIT_OUTPUT)
            error("serve", str(exc))
    try:
        rl.close(stopped=stopped)
    except RunLogError as exc:
        codes.append(EXIT_OUTPUT)
        error("serve", str(exc))


def service_config(a: argparse.Namespace):
    """The :class:`~beamloop.edge.app.ServiceConfig` of ``serve``'s (and ``serve4d``'s) options: a policy and
    drift correction only with ``--experiment vacancy-line``."""
    from beamloop.edge.app import ServiceConfig
    from beamloop.edge.cli.options import drift_correction_options

    line = a.experiment == "vacancy-line"
    return ServiceConfig(a.material, method=a.method, targets_per_frame=a.targets if line else None,
                         trigger=a.trigger, spacing_px=a.spacing_px, precision=a.precision, device=a.device,
                         memory_budget_mib=a.memory_budget_mib, trigger_at=a.trigger_at,
                         lock_on=a.lock_on if line else "none", **drift_correction_options(a))


def serve_until_done(command: str, a: argparse.Namespace, service, bridge, source, rl, codes: list[int],
                     start, after=None, cleanup=None) -> None:
    """Run ``start()`` (warm-up and messages; returns a reason not to serve, or ""), the serve loop, then
    ``after(stopped)`` (may give a new reason); a full disk stops it with the beam blanked (exit status 6); the
    service, the bridge and the run file are finished either way, then ``cleanup()``."""
    from beamloop.edge.cli import EXIT_OUTPUT, error
    from beamloop.edge.io.runlog import RunLogError

    stopped = ""
    try:
        stopped = start()
        if not stopped:
            stopped = _run(a, service, rl, codes)
            if after is not None:
                stopped = after(stopped)
    except RunLogError as exc:  # the disk is full: stop, blank, keep what was written
        if bridge is not None and a.experiment == "vacancy-line":
            service.safe_blank()
        stopped = str(exc)
        codes.append(EXIT_OUTPUT)
        error(command, str(exc))
    finally:
        _finish(service, bridge, source, rl, codes, stopped)
        if cleanup is not None:
            cleanup()
        if bridge is not None:
            bridge.close()


def cmd_serve(a: argparse.Namespace) -> int:
    """``beamloop serve``: the edge service on a frame stream, optionally driving an experiment; exit status
    (see the module docstring)."""
    from beamloop.edge.app import build_service, receiver_ring_bytes, start_monitor, warm_up
    from beamloop.edge.cli import EXIT_USAGE, StopSignals, error, worst_status
    from beamloop.edge.cli.options import client_keys_from_args, http_allowed
    from beamloop.edge.control.client import BridgeClient
    from beamloop.edge.control.keys import check_bind
    from beamloop.edge.io.runlog import RunLog, RunLogError
    from beamloop.streams.native.receiver import FrameReceiver

    if a.experiment == "vacancy-line" and not a.bridge:
        error("serve", "--experiment vacancy-line needs --bridge")
        return EXIT_USAGE
    if a.bind and not a.insecure:
        check_bind(a.frames, None, what="frame stream", insecure_option="--insecure")
    keys = client_keys_from_args(a)
    if a.http and not http_allowed(a.http, keys, "serve"):
        return EXIT_USAGE
    cfg = service_config(a)
    out = Path(a.out)
    codes: list[int] = []
    rl = RunLog(out / "serve.h5", {k: v for k, v in vars(a).items() if k != "func"})
    try:
        with StopSignals() as stop, FrameReceiver(a.frames, bind=a.bind,
                                                  max_ring_bytes=receiver_ring_bytes(cfg)) as rx:
            bridge = BridgeClient(a.bridge, timeout_ms=a.bridge_timeout_ms, keys=keys) if a.bridge else None
            service = build_service(rx, cfg, bridge)
            service.interrupt = stop
            monitor = None

            def start() -> str:
                nonlocal monitor
                if a.http:
                    try:
                        monitor = start_monitor(service, a.http, keys=keys)
                    except (OSError, ImportError) as exc:  # the address cannot be bound, or no web extra
                        codes.append(EXIT_USAGE)
                        error("serve", f"--http {a.http[0]}:{a.http[1]}: {exc}")
                        return f"--http {a.http[0]}:{a.http[1]}: {exc}"
                    print(f"beamloop serve: live view {monitor.url}, metrics {monitor.url.split('?')[0]}metrics",
                          flush=True)
                warm_up(service.path, service.trigger)
                print(f"beamloop serve: frames from {rx.endpoint}" + (f", bridge {a.bridge}" if a.bridge else ""),
                      flush=True)
                return ""

            def after(stopped: str) -> str:
                if monitor is not None and monitor.board.stop_requested:
                    stopped = "the live view's stop button"
                    error("serve", f"stopped by {stopped}" + ("; the beam was blanked" if bridge else ""))
                return stopped

            serve_until_done("serve", a, service, bridge, rx, rl, codes, start, after,
                             cleanup=lambda: monitor.stop() if monitor is not None else None)
            print(service.latency.table())
            print(_stream_summary(rx, service.stats) + f"; wrote {out / 'serve.h5'}", flush=True)
    finally:
        try:
            rl.close(stopped="the service did not start")  # harmless once closed
        except RunLogError:
            pass
    return worst_status(*codes)


def add_service_arguments(v: argparse.ArgumentParser) -> None:
    """The options ``serve`` and ``serve4d`` share: the bridge, the experiment, the trigger, the lock-on and the
    finder's."""
    from beamloop.edge.cli.find import add_finder_arguments
    from beamloop.edge.cli.options import add_drift_correction_arguments, add_lock_on_argument, add_trigger_at_argument
    from beamloop.edge.cli.run import TRIGGER_HELP
    from beamloop.edge.trigger import trigger_names

    v.add_argument("--bridge", default=None, help="scan controller bridge endpoint")
    v.add_argument("--bridge-timeout-ms", type=parse_count, default=2000,
                   help="how long to wait for each bridge reply")
    v.add_argument("--experiment", choices=("none", "vacancy-line"), default="none",
                   help="vacancy-line: write a line of S vacancies atom by atom (needs --bridge)")
    v.add_argument("--rounds", type=parse_count, default=3, help="frames with beam targets (one more verifies)")
    v.add_argument("--targets", type=parse_count, default=4, help="beam targets per frame")
    v.add_argument("--trigger", choices=trigger_names(), default="model", help=TRIGGER_HELP)
    add_trigger_at_argument(v)
    add_lock_on_argument(v)
    add_drift_correction_arguments(v)
    add_finder_arguments(v, default_material="MoS2")


def register(sub) -> None:
    """Add ``serve`` to the ``beamloop`` subcommands."""
    from beamloop.edge.cli.options import (
        add_client_key_arguments,
        add_http_argument,
    )
    from beamloop.edge.path import DEFAULT_MEMORY_BUDGET

    v = sub.add_parser("serve", help="the edge service: receive frames, find columns, drive the beam")
    v.add_argument("--frames", default="tcp://127.0.0.1:5555", help="frame stream endpoint")
    v.add_argument("--bind", action="store_true", help="bind the frame endpoint (for senders that connect); only "
                                                      "loopback or ipc:// unless --insecure")
    v.add_argument("--insecure", action="store_true",
                   help="allow binding the frame stream beyond loopback: it is neither encrypted nor "
                        "authenticated, and its frames decide where the beam goes")
    add_service_arguments(v)
    v.add_argument("--max-frames", type=parse_count, default=None, help="stop after this many frames")
    v.add_argument("--idle-timeout-s", "--idle-timeout", dest="idle_timeout", type=parse_positive, default=30.0,
                   help="stop after this many seconds without frames")
    v.add_argument("--memory-budget-mib", type=parse_positive, default=DEFAULT_MEMORY_BUDGET / 2**20,
                   help="working memory the frame path and the receive ring may each need for one series, MiB; "
                        "larger series are rejected")
    v.add_argument("--out", default="out/serve", help="output folder (serve.h5)")
    v.add_argument("--verbose", action="store_true", help="a line per frame")
    add_client_key_arguments(v)
    add_http_argument(v)
    v.set_defaults(func=cmd_serve)
