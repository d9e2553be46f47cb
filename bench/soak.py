"""Soak: the main job's closed loop for a long time, watching memory, latency drift and counters.

It runs what ``beamloop run`` runs (the simulated microscope in its own process,
:func:`beamloop.edge.experiments.closed_loop.start_simulator`; the service with the MoS2 pipeline, the
vacancy-line policy and the trigger; :func:`beamloop.edge.experiments.vacancy_line.vacancy_line`) over and over
for ``duration_s`` (30 minutes by default, 40 s with ``--quick``). When the field of view has no S2 column left
to write, it asks the simulator for a fresh area (``sim_fresh_area``: the removed atoms come back), so the beam
keeps working. Every ``window_s`` it samples:

- resident memory (VmRSS of /proc) of the service process and of the simulator process, MiB; live Python
  objects of the service (:func:`gc.get_objects`); entries kept by the bridge log and the latency recorder
  (both keep everything of a run by design);
- latency per stage in that window (p50, p99, microseconds): find, classify, bridge (set_probe / blank round
  trips), trigger, end to end (frame leaves the detector -> probe parked);
- the machine's 1-minute load average (other work on the shared cores shows up as latency);
- counters: frames, dwells by how they ended, stream rejections, bridge timeouts and errors, heartbeats,
  and the controller's safety counters (watchdog trips, dwell-limit blanks, refused positions).

Summary figures: memory growth as a least-squares slope (MiB per hour) over the windows after the first
(warm-up) one, and the total change; latency drift per stage as the slope of the window p50 (microseconds
per hour) and the ratio of the last window's p50 to the first's.

Hostile mode (``--hostile``): a hostile client runs beside the main job in a process of its own
(:func:`hostile_client`) against the same simulator, on loopback, without keys:

- floods: bursts of thousands of requests per second from several DEALER sockets and client ids (read-only
  calls, refused beam calls, heartbeats of ids nobody owns);
- huge requests: 20 MiB (beyond ``ZMQ_MAXMSGSIZE``: the socket drops the connection unread), 2 MiB (beyond
  the decode bound: refused unread), 0.9 MiB CBOR lists (decoded, refused), and now and then 200 MiB;
- replays: one sequence number reused with other content, older numbers, tag-55799 requests, ``x =
  10**400``, fractional frame shapes, text channels, out-of-range sequence numbers;
- garbage frames: malformed stream messages on a second frame endpoint that the service's receiver also
  connects to (the receiver must reject them all without losing a real frame).

It never sends a request that the guard would admit to move, unblank or blank the beam, nor a valid
``acquire_frame``: those are a key holder's calls (CURVE keeps strangers out of a real bridge). Every
``probe_every_s`` the soak also makes its own bridge client silent with the beam on (parked and
unblanked on the current frame) and watches with another client until the watchdog blanks: the
watchdog's latency under the hostile load. Figures: blanks refused (the main job's ``blank(on=true)``
calls that failed; must be 0), watchdog latency (sim event time of the blank minus the silent client's
last request), watchdog trips other than the probes' (must be 0), frames lost (frames asked for that did not
arrive, plus gaps in the frame ids; must be 0), memory growth of both processes.

Usage: ``python -m beamloop.bench.soak [--quick] [--hostile] [--duration S] [--window S]``; writes
``bench/results/soak.json`` (``soak_quick.json`` with ``--quick``, ``soak_hostile[_quick].json`` and a
``.md`` summary with ``--hostile``) and a PNG beside it. ``run(quick)`` returns the same dict. The
machine has 2 cores shared with other work: figures taken while it is busy are noisy (the JSON records the
load average).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import time
import uuid
from collections import Counter, deque
from dataclasses import asdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("find", "classify", "bridge", "trigger", "end_to_end")


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process (VmRSS in /proc/PID/status), MiB; NaN when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def slope_per_hour(t_s, v) -> float:
    """Least-squares slope of ``v`` against ``t_s`` (seconds), per hour; NaN with fewer than 2 finite points."""
    t, v = np.asarray(t_s, float), np.asarray(v, float)
    ok = np.isfinite(t) & np.isfinite(v)
    if ok.sum() < 2 or np.ptp(t[ok]) == 0:
        return float("nan")
    return float(np.polyfit(t[ok], v[ok], 1)[0] * 3600.0)


def _window_latency(latency, marks: dict) -> dict:
    out = {}
    for stage in STAGES:
        v = latency.since(stage, marks.get(stage, 0)) / 1e3
        out[stage] = ({"n": int(len(v)), "p50_us": float(np.percentile(v, 50)), "p99_us": float(np.percentile(v, 99))}
                      if len(v) else {"n": 0, "p50_us": float("nan"), "p99_us": float("nan")})
        marks[stage] = latency.count(stage)
    return out


def summarize(windows: list[dict]) -> dict:
    """Memory growth and latency drift from the window samples (see the module docstring)."""
    later = windows[1:] if len(windows) > 2 else windows
    t = [w["t_s"] for w in later]
    out = {"memory": {}, "latency_drift": {}}
    for key in ("rss_service_mib", "rss_simulator_mib", "python_objects"):
        vals = [w[key] for w in later]
        out["memory"][key] = {"first": windows[0][key], "last": windows[-1][key],
                              "change": windows[-1][key] - windows[0][key], "slope_per_hour": slope_per_hour(t, vals)}
    for stage in STAGES:
        p50 = [w["latency"][stage]["p50_us"] for w in later]
        first = next((x for x in p50 if np.isfinite(x)), float("nan"))
        last = next((x for x in reversed(p50) if np.isfinite(x)), float("nan"))
        out["latency_drift"][stage] = {"p50_first_us": first, "p50_last_us": last,
                                       "last_over_first": (last / first if first and np.isfinite(first)
                                                           else float("nan")),
                                       "p50_slope_us_per_hour": slope_per_hour(t, p50)}
    return out


# the hostile client -------------------------------------------------------------------------------------------
def _garbage_messages() -> list[list[bytes]]:
    """Stream messages the receiver must reject without changing its state (no valid ``start``)."""
    import cbor2

    ghost = str(uuid.uuid4())
    return [
        [b""], [b"\xff\x00garbage"], [cbor2.dumps([1, 2, 3])], [cbor2.dumps({"type": "nonsense"})],
        [cbor2.dumps({"type": "start"})[:-1]], [b"x" * (1 << 17)],
        [cbor2.dumps({"type": "end", "series_id": 99, "series_unique_id": ghost, "user_data": {}})],
        [cbor2.dumps({"type": "image", "series_id": 99, "series_unique_id": ghost, "image_id": 0,
                      "start_time": [0, 1], "stop_time": [0, 1], "real_time": [0, 1], "user_data": {},
                      "data": {"haadf": {"encoding": "raw", "size": 8}}}), b"\x00" * 8],
    ]


def _hostile_requests() -> list[bytes]:
    """Requests that the guard refuses (never one it would admit to move or blank the beam)."""
    import cbor2

    from beamloop.edge.control.protocol import encode_request

    rid = "hostile-" + uuid.uuid4().hex[:8]
    return [
        encode_request("set_probe", 1000, {"x": 0.2, "y": 0.2, "frame_id": -1}, rid),  # refused, remembered
        encode_request("set_probe", 1000, {"x": 0.9, "y": 0.9, "frame_id": -1}, rid),  # same seq, other content
        encode_request("set_probe", 999, {"x": 0.5, "y": 0.5, "frame_id": -1}, rid),  # older seq
        encode_request("get_state", 1000, {}, rid),  # a read: runs, never from the cache
        cbor2.dumps(cbor2.CBORTag(55799, {"call": "get_capabilities", "seq": 1, "args": {}, "client": rid})),
        encode_request("set_probe", 1001, {"x": 10**400, "y": 0.5, "frame_id": 1}, rid),
        encode_request("acquire_frame", 1002, {"shape": [64.7, 64.2], "fov_nm": [1, 1]}, rid),
        encode_request("acquire_frame", 1003, {"shape": [64, 64], "fov_nm": [1, 1], "channels": "haadf"}, rid),
        cbor2.dumps({"call": "heartbeat", "seq": 2**80, "args": {}, "client": rid}),
        encode_request("queue_points", 1004, {"points": [[0.5, 0.5]], "dwell_us": -1, "frame_id": -1}, rid),
        encode_request("heartbeat", 5, {}, uuid.uuid4().hex),  # someone else's heartbeat: heard by nobody
        b"\xa1", b"garbage", cbor2.dumps("text"),
    ]


def hostile_client(control: str, garbage: str, stop, report, seed: int = 0, flood_period_s: float = 10.0,
                   flood_s: float = 2.0, huge_every_s: float = 15.0, giant_every_s: float = 300.0) -> None:
    """The hostile client of the soak's hostile mode (run in a process of its own until ``stop`` is set).

    Parameters
    ----------
    control : str
        The simulator's bridge endpoint.
    garbage : str
        Endpoint to bind a PUSH socket on, which the service's receiver connects to.
    stop : multiprocessing.Event
    report : multiprocessing.Queue
        Receives one dict of counts at the end.
    seed : int
    flood_period_s, flood_s : float
        A flood of ``flood_s`` seconds every ``flood_period_s``.
    huge_every_s, giant_every_s : float
        Period of the huge requests (20 MiB, 2 MiB, 0.9 MiB) and of the 200 MiB one, seconds.
    """
    import cbor2
    import zmq

    from beamloop.edge.control.protocol import MAX_REQUEST_BYTES, encode_request

    rng = np.random.default_rng(seed)
    parent = os.getppid()
    ctx = zmq.Context()
    counts: Counter = Counter()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 100)
    push.bind(garbage)

    def dealer() -> zmq.Socket:
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.SNDHWM, 64)
        d.connect(control)
        return d

    flooders = [dealer() for _ in range(4)]
    inflight = [0] * len(flooders)
    replayer = dealer()
    big = dealer()
    requests = _hostile_requests()
    garbage_msgs = _garbage_messages()
    seq = 0

    def flood_request() -> bytes:
        """Mostly one client id (so that its rate limit engages), new sequence numbers, sometimes a new id."""
        nonlocal seq
        seq += 1
        who = "flood" if rng.random() < 0.9 else uuid.uuid4().hex
        kind = int(rng.integers(4))
        if kind == 0:
            return encode_request("set_probe", seq, {"x": 0.5, "y": 0.5, "frame_id": -1}, who)
        if kind == 1:
            return encode_request("heartbeat", seq, {}, who)
        if kind == 2:
            return encode_request("get_capabilities", seq, {}, who)
        return encode_request("get_state", seq, {}, who)

    def drain(sock: zmq.Socket) -> int:
        n = 0
        while sock.poll(0):
            parts = sock.recv_multipart()
            try:
                msg = cbor2.loads(parts[-1])
                counts["reply_" + (msg.get("error") or "ok")] += 1
            except Exception:  # noqa: BLE001 - a count, not a check
                counts["reply_unreadable"] += 1
            n += 1
        return n

    t0 = time.monotonic()
    next_huge, next_giant, next_replay, next_garbage = t0 + 1.0, t0 + 5.0, t0, t0
    try:
        while not stop.is_set() and os.getppid() == parent:  # ends with its parent, also one killed
            now = time.monotonic()
            flooding = (now - t0) % flood_period_s < flood_s
            if flooding:
                for k, d in enumerate(flooders):
                    inflight[k] -= drain(d)
                    while inflight[k] < 50:
                        try:
                            d.send_multipart([b"", flood_request()], zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        inflight[k] += 1
                        counts["flood_sent"] += 1
            else:
                for k, d in enumerate(flooders):
                    inflight[k] = max(inflight[k] - drain(d), 0)
                time.sleep(0.005)
            if now >= next_replay:
                replayer.send_multipart([b"", requests[int(rng.integers(len(requests)))]])
                counts["replays_sent"] += 1
                next_replay = now + 0.02
            drain(replayer)
            if now >= next_garbage:
                try:
                    push.send_multipart(garbage_msgs[int(rng.integers(len(garbage_msgs)))], zmq.NOBLOCK)
                    counts["garbage_frames_sent"] += 1
                except zmq.Again:
                    counts["garbage_frames_blocked"] += 1
                next_garbage = now + 0.05
            if now >= next_huge:
                pad = b"p" * (MAX_REQUEST_BYTES + 1024)
                big.send_multipart([b"", cbor2.dumps({"call": "get_state", "seq": 1, "args": {}, "pad": pad})])
                big.send_multipart([b"", cbor2.dumps(list(range(1, 200_000)))])  # about 0.9 MiB: decoded
                over = bytearray(20 << 20)
                over[0] = 0x5A  # a byte string head, its length, then zeros: beyond ZMQ_MAXMSGSIZE
                over[1:5] = (len(over) - 5).to_bytes(4, "big")
                big.send_multipart([b"", over], copy=False)
                counts["huge_sent"] += 3
                next_huge = now + huge_every_s
            if now >= next_giant:
                n = 200 * 2**20  # a CBOR array of 209 M zeros, as in the probe that once held the watchdog
                giant = bytearray(9 + n)
                giant[0] = 0x9B
                giant[1:9] = n.to_bytes(8, "big")
                big.send_multipart([b"", giant], copy=False)
                del giant
                counts["giant_sent"] += 1
                next_giant = now + giant_every_s
            drain(big)
    finally:
        report.put(dict(counts))
        for sock in (*flooders, replayer, big, push):
            sock.close(linger=0)
        ctx.term()


def watchdog_probe(bridge, monitor, fid_xy, timeout_s: float = 10.0) -> dict:
    """Make ``bridge``'s client silent with the beam on, and wait (polling with ``monitor``) until the
    controller blanks it; returns the latency from the client's last request to the blank (sim event time).

    ``fid_xy``: ``(frame_id, x, y)`` of a position on the current frame.
    """
    from beamloop.edge.control.protocol import BridgeError

    fid, x, y = fid_xy
    since = monitor.call("sim_events", since=0, limit=0)["next"]
    start_ns = time.monotonic_ns()
    bridge.set_probe(x, y, fid)
    bridge.blank(False)
    last_ns = time.monotonic_ns()  # just after the reply: the watchdog counts from the request's arrival, earlier
    t_end = time.monotonic() + timeout_s
    blanked = False
    while time.monotonic() < t_end:
        time.sleep(0.02)
        try:
            if monitor.get_state()["blanked"]:
                blanked = True
                break
        except BridgeError:
            continue
    evs = [e for e in monitor.call("sim_events", since=since)["events"] if e.get("type") == "safety"]
    trip = next((e for e in evs if e.get("reason") in ("watchdog", "watchdog backstop")), None)
    latency = (trip["t_ns"] - last_ns) / 1e9 if trip else float("nan")
    bridge.blank(True)
    return {"blanked": blanked, "latency_s": latency, "reason": trip.get("reason") if trip else "",
            "start_ns": start_ns, "end_ns": time.monotonic_ns()}


def run(quick: bool = False, duration_s: float | None = None, window_s: float | None = None,
        out: Path | None = RESULTS, seed: int = 0, progress: bool = True, hostile: bool = False,
        probe_every_s: float | None = None) -> dict:
    """Run the soak and return its results (also written to ``out/soak[_quick].json`` unless ``out`` is None).

    Parameters
    ----------
    quick : bool
        40 s of loop in 4-s windows on 192x192 frames, instead of 30 minutes in 60-s windows on 256x256.
    duration_s, window_s : float, optional
        Override the loop's length and the sampling window, seconds.
    out : Path or None
        Results folder; None writes nothing.
    seed : int
        Simulator seed.
    progress : bool
        Print one line per window.
    hostile : bool
        Run the hostile client beside the main job, and the watchdog probes (see the module docstring).
    probe_every_s : float, optional
        Seconds between watchdog probes (hostile mode; default 60, 8 with ``quick``).

    Raises
    ------
    RuntimeError
        The simulator could not be started.
    """
    from beamloop.edge.app import ServiceConfig, build_service, warm_up
    from beamloop.edge.control.client import BridgeClient
    from beamloop.edge.control.protocol import BridgeError
    from beamloop.edge.experiments.closed_loop import simulator_gone, start_simulator, stop_simulator
    from beamloop.edge.experiments.vacancy_line import ExperimentConfig, ExperimentStopped, vacancy_line
    from beamloop.edge.sim.frames import electrons_per_second
    from beamloop.streams.native.receiver import FrameReceiver

    duration_s = float(duration_s or (40.0 if quick else 1800.0))
    window_s = float(window_s or (4.0 if quick else 60.0))
    probe_every_s = float(probe_every_s or (8.0 if quick else 60.0))
    shape = (192, 192) if quick else (256, 256)
    pixel_size_A, dose, current_pA, targets = 0.15, 1e5, 50.0, 4
    dwell_us = dose * pixel_size_A**2 / electrons_per_second(current_pA) * 1e6
    cfg = ExperimentConfig(rounds=1, shape=shape, fov_nm=shape[1] * pixel_size_A / 10, dwell_us=dwell_us,
                           targets_per_frame=targets, max_dwell_s=2.0)
    proc, ends = start_simulator(["--frames", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
                                  "--seed", str(seed), "--current-pA", str(current_pA)])
    reasons: Counter = Counter()
    windows: list[dict] = []
    totals: dict = {"chunks": 0, "frames": 0, "targets": 0, "fresh_areas": 0, "errors": [], "stops": {}}
    probes: list[dict] = []
    hostile_counts: dict = {}
    stops: Counter = Counter()
    counters: dict = {}
    t_start = time.monotonic()
    mp = multiprocessing.get_context("spawn")
    stop_hostile = mp.Event()
    report_q = mp.Queue()
    hostile_proc = None
    try:
        with FrameReceiver(ends["frames"], ring=8) as rx, \
                BridgeClient(ends["control"], timeout_ms=20000, retries=1,
                             peer_gone=simulator_gone(proc)) as bridge, \
                BridgeClient(ends["control"], timeout_ms=20000, log_limit=0) as monitor:
            service = build_service(rx, ServiceConfig("MoS2", targets_per_frame=targets), bridge)
            latency = service.latency
            sends: deque = deque(maxlen=1 << 20)  # when the main client sent each request (heartbeats too)
            exchange = bridge._exchange

            def timed_exchange(call, args, entry):
                sends.append(time.monotonic_ns())
                return exchange(call, args, entry)

            bridge._exchange = timed_exchange  # type: ignore[method-assign]
            gc_pauses: deque = deque(maxlen=10_000)  # (end ns, seconds, generation) of collections over 20 ms
            gc_start = [0]

            def on_gc(phase, info):
                now = time.perf_counter_ns()
                if phase == "start":
                    gc_start[0] = now
                elif now - gc_start[0] > 20_000_000:
                    gc_pauses.append((time.monotonic_ns(), (now - gc_start[0]) / 1e9, info.get("generation")))

            gc.callbacks.append(on_gc)
            warm_up(service.path, service.trigger, shape=shape, pixel_size_A=pixel_size_A, dtypes=(np.uint16,))
            if hostile:
                garbage = f"ipc:///tmp/beamloop-soak-garbage-{os.getpid()}"
                hostile_proc = mp.Process(target=hostile_client, args=(ends["control"], garbage, stop_hostile,
                                                                        report_q, seed), daemon=True)
                hostile_proc.start()
                rx.socket.connect(garbage)  # the receiver takes the hostile client's garbage frames too
            marks: dict = {}
            t0 = time.monotonic()
            t_window = t_probe = t0

            def sample() -> None:
                state = monitor.get_state()
                gc.collect()
                w = {"t_s": time.monotonic() - t0, "rss_service_mib": rss_mib(),
                     "rss_simulator_mib": rss_mib(proc.pid),
                     "python_objects": len(gc.get_objects()), "bridge_log_entries": len(bridge.log),
                     "load_1min": os.getloadavg()[0],
                     "latency_samples": int(sum(len(latency.samples(s)) for s in latency.summary())),
                     "latency": _window_latency(latency, marks), "frames": totals["frames"],
                     "dwells": dict(reasons), "stream_rejected": rx.counters.rejected,
                     "bridge": asdict(bridge.counters), "safety": state.get("safety", {}).get("counters", {}),
                     "probes": len(probes)}
                if hostile_proc is not None:
                    w["rss_hostile_mib"] = rss_mib(hostile_proc.pid)
                windows.append(w)
                if progress:
                    lat = w["latency"]["end_to_end"]["p50_us"]
                    print(f"soak {w['t_s']:7.1f} s: service {w['rss_service_mib']:.1f} MiB, simulator "
                          f"{w['rss_simulator_mib']:.1f} MiB, frames {w['frames']}, dwells {sum(reasons.values())}, "
                          f"end-to-end p50 {lat:.0f} us, load {w['load_1min']:.1f}, watchdog trips "
                          f"{w['safety'].get('watchdog_trips')} ({len(probes)} probes)", flush=True)

            sample()  # the state after warm-up
            while time.monotonic() - t0 < duration_s:
                try:
                    records = vacancy_line(service, cfg)
                except ExperimentStopped as exc:
                    records = exc.records
                    stops[exc.reason] += 1
                    totals["errors"].append(f"{exc.reason}: {exc.message}")
                    if exc.reason in ("beam_unsafe", "controller_lost"):
                        break
                totals["chunks"] += 1
                totals["frames"] += len(records)
                n_targets = sum(len(r.targets) for r in records)
                totals["targets"] += n_targets
                reasons.update(d.reason for r in records for d in r.dwells)
                if hostile and time.monotonic() - t_probe >= probe_every_s and records:
                    last = records[-1]
                    x, y = (0.5, 0.5) if len(last.columns) == 0 else last.scan.fraction_of_pixel(
                        last.columns.x[0], last.columns.y[0])
                    probes.append(watchdog_probe(bridge, monitor, (last.scan.frame_id, float(x), float(y))))
                    t_probe = time.monotonic()
                del records
                if n_targets == 0:  # nothing left to write here: a fresh area of the crystal
                    try:
                        bridge.call("sim_fresh_area")
                        totals["fresh_areas"] += 1
                    except BridgeError as exc:
                        totals["errors"].append(str(exc))
                if time.monotonic() - t_window >= window_s:
                    sample()
                    t_window = time.monotonic()
            sample()
            if hostile_proc is not None:
                stop_hostile.set()
                try:
                    hostile_counts = report_q.get(timeout=60)
                except Exception:  # noqa: BLE001 - the counts are a report, not a result
                    hostile_counts = {}
                hostile_proc.join(30)
            counters = {"stream": rx.counters.as_dict(), "bridge": asdict(bridge.counters),
                        "service": {"frame_errors": service.stats.frame_errors,
                                    "series_rejected": service.stats.series_rejected,
                                    "protocol_errors": service.stats.protocol_errors,
                                    "heartbeat_errors": service.stats.heartbeat_errors,
                                    "blank_failures": service.stats.blank_failures,
                                    "errors": service.stats.errors[-10:]},
                        "safety": monitor.get_state().get("safety", {}).get("counters", {}),
                        "sim_events": {}}
            events = monitor.call("sim_events", since=0)["events"]
            counters["sim_events"] = dict(Counter(e.get("type", "?") for e in events))
            counters["sim_safety_events"] = [e for e in events if e.get("type") in ("safety", "dropped")][-200:]
            windows_ns = [(p["start_ns"], p["end_ns"]) for p in probes]
            other = [e for e in events if e.get("type") == "safety" and str(e.get("reason", "")).startswith("watchdog")
                     and not any(a <= e["t_ns"] <= b for a, b in windows_ns)]
            sent = np.array(sends, np.int64)

            def owner_silent_s(t_ns: int) -> float:
                """How long the main client had sent nothing (heartbeats included) when the trip came."""
                k = int(np.searchsorted(sent, t_ns)) - 1
                return (t_ns - int(sent[k])) / 1e9 if k >= 0 else float("nan")

            counters["trips_beyond_probes"] = [
                {**e, "owner_silent_s": owner_silent_s(e["t_ns"]),
                 "gc_pauses_s": [p for t, p, g in gc_pauses if e["t_ns"] - 2e9 <= t <= e["t_ns"]],
                 "bridge_before": [(x.call, x.error, (e["t_ns"] - x.t_ns) / 1e9) for x in bridge.log
                                   if x.t_ns < e["t_ns"]][-5:]} for e in other]
            gaps = np.diff(sent) / 1e9 if len(sent) > 1 else np.zeros(0)
            counters["owner_gaps"] = {"max_s": float(gaps.max()) if len(gaps) else float("nan"),
                                      "over_1s": int((gaps > 1.0).sum()),
                                      "gc_pauses_over_20ms": len(gc_pauses),
                                      "gc_pause_max_s": max((p for _, p, _ in gc_pauses), default=0.0)}
            gc.callbacks.remove(on_gc)
            blanks = [e for e in bridge.log if e.call in ("blank", "stop") and e.args.get("on", True) is True]
            counters["blanks"] = {"sent": len(blanks), "refused": sum(not e.ok for e in blanks),
                                  "refused_errors": sorted({e.error for e in blanks if not e.ok})}
            try:
                bridge.stop()
                bridge.call("shutdown")
            except BridgeError:
                pass
    finally:
        if hostile_proc is not None and hostile_proc.is_alive():
            stop_hostile.set()
            hostile_proc.join(10)
            if hostile_proc.is_alive():
                hostile_proc.kill()
        stop_simulator(proc)
    totals["stops"] = dict(stops)
    result = {
        "mode": ("hostile_" if hostile else "") + ("quick" if quick else "full"),
        "config": {"duration_s": duration_s, "window_s": window_s, "shape": list(shape), "pixel_size_A": pixel_size_A,
                   "dose_e_per_A2": dose, "current_pA": current_pA, "targets_per_frame": targets, "seed": seed,
                   "hostile": hostile, "probe_every_s": probe_every_s if hostile else None},
        "wall_s": time.monotonic() - t_start,
        "load_average": list(os.getloadavg()),
        "totals": {**{k: v for k, v in totals.items() if k != "errors"}, "dwells": dict(reasons),
                   "errors": totals["errors"][-10:]},
        "counters": counters,
        "summary": summarize(windows),
        "windows": windows,
    }
    if hostile:
        result["hostile"] = hostile_counts
        result["probes"] = probes
        result["figures"] = hostile_figures(result)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        name = ("soak_hostile" if hostile else "soak") + ("_quick" if quick else "")
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float))
        plot(result, out / f"{name}.png")
        if hostile:
            (out / f"{name}.md").write_text(hostile_markdown(result))
    return result


def false_trips(counters: dict, watchdog_s: float = 1.0) -> int:
    """Watchdog trips outside the probes that came although the main client had sent a request (a heartbeat)
    within the watchdog period before them, by its own clock: trips of a working service. A trip after a
    longer silence of the service (a process paused or starved of CPU) is the watchdog doing its job."""
    return sum(not t["owner_silent_s"] > watchdog_s for t in counters.get("trips_beyond_probes", []))


def hostile_figures(result: dict) -> dict:
    """The hostile soak's figures: blanks refused, watchdog latency, trips beyond the probes, frames lost,
    memory growth (see the module docstring)."""
    c = result["counters"]
    probes = result.get("probes", [])
    lat = np.array([p["latency_s"] for p in probes], float)
    finite = lat[np.isfinite(lat)]
    trips = c["safety"].get("watchdog_trips", 0)
    stream = c["stream"]
    mem = result["summary"]["memory"]
    return {
        "blanks_sent": c["blanks"]["sent"], "blanks_refused": c["blanks"]["refused"],
        "watchdog_probes": len(probes), "watchdog_probes_blanked": sum(p["blanked"] for p in probes),
        "watchdog_latency_s_max": float(finite.max()) if finite.size else float("nan"),
        "watchdog_latency_s_p50": float(np.median(finite)) if finite.size else float("nan"),
        "watchdog_trips": trips, "watchdog_trips_beyond_probes": len(c.get("trips_beyond_probes", [])),
        "watchdog_false_trips": false_trips(c),
        "owner_request_gap_max_s": c.get("owner_gaps", {}).get("max_s", float("nan")),
        "backstop_trips": c["safety"].get("backstop_trips", 0),
        "frames_lost": result["totals"]["stops"].get("no_frames", 0) + stream.get("missing_frames", 0)
        + c["sim_events"].get("dropped", 0),
        "stream_gaps": stream.get("gaps", 0), "garbage_rejected": stream.get("rejected", 0),
        "rate_limited": c["safety"].get("rate_limited", 0),
        "rss_service_mib": {k: mem["rss_service_mib"][k] for k in ("first", "last", "slope_per_hour")},
        "rss_simulator_mib": {k: mem["rss_simulator_mib"][k] for k in ("first", "last", "slope_per_hour")},
        "frames": result["totals"]["frames"], "dwells": sum(result["totals"]["dwells"].values()),
        "bridge_p99_us_last_window": result["windows"][-1]["latency"]["bridge"]["p99_us"],
    }


def hostile_markdown(result: dict) -> str:
    """A short Markdown summary of a hostile soak."""
    f = result["figures"]
    h = result.get("hostile", {})
    rows = [
        ("duration", f"{result['config']['duration_s']:.0f} s (wall {result['wall_s']:.0f} s), load average at the "
                     f"end {result['load_average'][0]:.1f}"),
        ("main job", f"{f['frames']} frames, {f['dwells']} dwells ({result['totals']['dwells']})"),
        ("hostile client", ", ".join(f"{k} {v}" for k, v in sorted(h.items()))),
        ("blanks refused", f"**{f['blanks_refused']}** of {f['blanks_sent']} blank/stop calls of the main job"),
        ("watchdog", f"{f['watchdog_probes_blanked']}/{f['watchdog_probes']} silent-client probes blanked; latency "
                     f"p50 {f['watchdog_latency_s_p50']:.3f} s, **max {f['watchdog_latency_s_max']:.3f} s** (period "
                     f"1 s); trips beyond the probes {f['watchdog_trips_beyond_probes']}, all after the main "
                     f"client itself had been silent for more than the period, but **{f['watchdog_false_trips']}** "
                     f"(trips of a working service); backstop trips {f['backstop_trips']}"),
        ("frames lost", f"**{f['frames_lost']}** (stream gaps {f['stream_gaps']}; garbage messages rejected "
                        f"{f['garbage_rejected']})"),
        ("memory", f"service {f['rss_service_mib']['first']:.0f} -> {f['rss_service_mib']['last']:.0f} MiB "
                   f"({f['rss_service_mib']['slope_per_hour']:+.1f} MiB/h), simulator "
                   f"{f['rss_simulator_mib']['first']:.0f} -> {f['rss_simulator_mib']['last']:.0f} MiB "
                   f"({f['rss_simulator_mib']['slope_per_hour']:+.1f} MiB/h)"),
        ("refused by rate", f"{f['rate_limited']} requests"),
    ]
    lines = [f"# Hostile soak ({result['mode']})", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Memory and window p50 latencies against time (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = result["windows"]
    t = np.array([x["t_s"] for x in w]) / 60
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    a.plot(t, [x["rss_service_mib"] for x in w], "o-", label="service")
    a.plot(t, [x["rss_simulator_mib"] for x in w], "s-", label="simulator")
    a.set_ylabel("resident memory, MiB")
    a.legend()
    for stage in STAGES:
        b.plot(t, [x["latency"][stage]["p50_us"] for x in w], ".-", label=stage)
    b.set_yscale("log")
    b.set_ylabel("p50 in window, us")
    b.set_xlabel("time, minutes")
    b.legend(fontsize=8, ncol=3)
    fig.suptitle(f"soak ({result['mode']}): {result['totals']['frames']} frames, "
                 f"{sum(result['totals']['dwells'].values())} dwells")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    """Command line: ``python -m beamloop.bench.soak [--quick] [--hostile] [--duration S] [--window S] [--out DIR]``."""
    p = argparse.ArgumentParser(prog="python -m beamloop.bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="40 s instead of 30 minutes")
    p.add_argument("--duration", type=float, default=None, help="loop length, seconds")
    p.add_argument("--window", type=float, default=None, help="sampling window, seconds")
    p.add_argument("--hostile", action="store_true", help="a hostile client beside the main job, watchdog probes")
    p.add_argument("--probe-every", type=float, default=None, help="seconds between watchdog probes (hostile)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    r = run(a.quick, a.duration, a.window, Path(a.out), hostile=a.hostile, probe_every_s=a.probe_every)
    s = r["summary"]
    print(json.dumps({"memory": s["memory"], "latency_drift": s["latency_drift"], "totals": r["totals"],
                      **({"figures": r["figures"]} if a.hostile else {})}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
