"""The main job (``beamloop run``, ``make run``): the closed loop on the simulated microscope, end to end.

It starts the simulated microscope in its own process (``beamloop sim``), connects the service to its
frame stream and control bridge, writes a line of S vacancies atom by atom
(:func:`beamloop.edge.experiments.vacancy_line.vacancy_line`),
then scores every frame against the simulator's ground truth and prints the per-stage latency, the
accuracy per class, and the atoms removed. The ejection trigger decides at the simulated scan controller
(``trigger_at="controller"``, the default: it blanks the beam at the decision sample plus its logic's
latency) or in the service (``"service"``); every dwell, the beam log and the report record where.
Outputs in ``--out``: ``run.h5`` (:mod:`beamloop.edge.io.runlog`), ``overlay.png`` and ``report.json``.

Specimen drift (``drift_A_per_s``, :mod:`beamloop.edge.sim.drift`) and lock-on (``lock_on``,
:data:`beamloop.edge.service.LOCK_ON`): the report's ``drift`` section gives the simulated drift (from the
simulator's ground truth), the service's estimate, and the probe-to-column distance at the start of each
dwell (p50, p90, pm: the probe's position on the specimen when the beam went on, from the simulator's
``probe_landed`` event, to the rest position of the column the target was in its frame's ground truth), and
the fraction of targets written by ground truth (that column's class in the verification frame).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from beamloop.edge.analysis.scoring import combine, match, score_frame
from beamloop.edge.app import ServiceConfig, build_path, build_service, receiver_ring_bytes, start_monitor, warm_up
from beamloop.edge.control.client import BeamLogEntry, BridgeClient
from beamloop.edge.control.protocol import BridgeError
from beamloop.edge.experiments.vacancy_line import ExperimentConfig, ExperimentStopped, RoundRecord, vacancy_line
from beamloop.edge.frame.latency import LatencyRecorder
from beamloop.edge.io.overlay import save_overlay
from beamloop.edge.io.runlog import RunLog, RunLogError, write_text_file
from beamloop.edge.physics import electrons_per_second
from beamloop.edge.sim.microscope import decode_ground_truth
from beamloop.streams.native.receiver import FrameReceiver

SIM_STOP_WAIT_S = 3.0
"""How long the simulator child gets to stop by itself (after ``shutdown``, then after SIGTERM), seconds."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to send the child SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), so that a
    ``beamloop run`` killed with SIGKILL leaves no simulator behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the parent's own cleanup still stops it
        pass


def start_simulator(args: list[str], timeout_s: float = 120.0) -> tuple[subprocess.Popen, dict]:
    """Start ``beamloop sim --announce`` in a subprocess and wait for the line giving its endpoints.

    The child runs in a session of its own (a terminal's Ctrl-C reaches only the parent, which blanks the
    beam through the bridge before it stops the child) and is sent SIGTERM if the parent dies.

    Returns the process and the announced ``{"frames": ..., "control": ...}``.

    Raises
    ------
    RuntimeError
        The simulator exited or did not announce itself within ``timeout_s`` (it is stopped then).
    """
    cmd = [sys.executable, "-m", "beamloop.edge.cli", "sim", "--announce", *args]
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, start_new_session=True,
                            preexec_fn=preexec)
    t_end = time.monotonic() + timeout_s
    try:
        while time.monotonic() < t_end:
            line = proc.stdout.readline() if proc.stdout is not None else ""
            if not line:
                if proc.poll() is not None:
                    raise RuntimeError(f"simulator exited with status {proc.returncode} before announcing its "
                                       "endpoints")
                continue
            if line.startswith("BEAMLOOP-SIM "):
                return proc, json.loads(line.split(" ", 1)[1])
        raise RuntimeError(f"simulator did not announce its endpoints within {timeout_s} s")
    except BaseException:
        stop_simulator(proc)
        raise


def stop_simulator(proc: subprocess.Popen, wait_s: float = SIM_STOP_WAIT_S) -> int:
    """Stop a simulator child: wait ``wait_s`` for it to exit (after a ``shutdown`` call), then SIGTERM (it
    blanks and exits), then SIGKILL. Returns its exit status."""
    for step in (None, proc.terminate, proc.kill):
        if step is not None:
            try:
                step()
            except ProcessLookupError:
                pass
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def simulator_gone(proc: subprocess.Popen):
    """A ``peer_gone`` callable for the bridge client and the service: why the child cannot answer, or None."""
    def gone() -> str | None:
        code = proc.poll()
        return None if code is None else f"the simulator process exited with status {code}"

    return gone


def dwell_rows(records: list[RoundRecord], events: list[dict], sample_time_us: float = math.nan) -> list[dict]:
    """One row per dwell, joined with the simulator's record of the same parked series (ejection and
    end sample), so that detection delay and overdose can be measured against ground truth.

    Parameters
    ----------
    records : list of RoundRecord
    events : list of dict
        The simulator's events (``sim_events``).
    sample_time_us : float
        Parked-probe sample time, microseconds (for the blank time of a service-side decision).

    Returns
    -------
    list of dict
        Per dwell: target, ``reason``, ``trigger_at`` (where the decision was made), ``trigger_sample`` (the
        decision sample), ``service_trigger_sample`` (the service's own trigger), ``blank_time_ns`` (from the
        dwell's start to the blank, nanoseconds: the controller's logic blank, or for the service the
        controller's sample clock at its ``blank``), ``ejection_sample``, ``end_sample`` (first sample with the
        beam off), ``ejections``, ``samples``, ``series_id``, ``baseline_rate``.
    """
    ends = {e["series_id"]: e for e in events if e["type"] == "dwell_end"}
    rows = []
    for rec in records:
        for d in rec.dwells:
            e = ends.get(d.series_id, {})
            ej = e.get("ejection_samples", [])
            end = e.get("beam_off_sample", -1)
            blank = d.blank_time_ns
            if math.isnan(blank) and end >= 0:
                blank = end * sample_time_us * 1e3
            rows.append({"frame_id": d.target.frame_id, "fx": d.target.fx, "fy": d.target.fy, "x_px": d.target.x_px,
                         "y_px": d.target.y_px, "reason": d.reason, "trigger_at": d.trigger_at,
                         "trigger_sample": d.trigger_sample, "service_trigger_sample": d.service_trigger_sample,
                         "blank_time_ns": blank, "samples": d.samples, "series_id": d.series_id,
                         "ejection_sample": ej[0] if ej else -1, "end_sample": end,
                         "ejections": len(ej), "baseline_rate": d.baseline_rate})
    return rows


def decision_log(records: list[RoundRecord]) -> list[BeamLogEntry]:
    """One beam-log entry (call ``trigger_decision``, not a bridge call) per dwell decided by a trigger: where
    it was made, the decision sample and the blank time, at ``t_ns`` = when it was acted on."""
    out = []
    for rec in records:
        for d in rec.dwells:
            if d.reason == "trigger":
                args = {"x": d.target.fx, "y": d.target.fy, "frame_id": d.target.frame_id, "trigger_at": d.trigger_at,
                        "series_id": d.series_id, "decision_sample": d.trigger_sample,
                        "blank_time_ns": None if math.isnan(d.blank_time_ns) else d.blank_time_ns}
                out.append(BeamLogEntry(d.decision_t_ns, "trigger_decision", args, False, True))
    return out


def dwell_summary(rows: list[dict], sample_time_us: float, electrons_per_s: float = math.nan,
                  trigger_at: str = "") -> dict:
    """Trigger performance against ground truth: detections, misses, false triggers, delay, overdose.

    Parameters
    ----------
    rows : list of dict
        :func:`dwell_rows`.
    sample_time_us : float
        Parked-probe sample time, microseconds.
    electrons_per_s : float
        Probe electrons per second (for the extra electrons after an ejection; NaN: not reported).
    trigger_at : str
        Where the run's decisions were made (:data:`beamloop.edge.service.TRIGGER_AT`).

    Returns
    -------
    dict
        Counts (``dwells``, ``ejections_seen``, ``detected``, ``false_triggers``, ``no_event``), delays and
        beam-on times after the ejection in samples (``*_p50``, ``*_max``), ``extra_electrons_after_ejection_*``
        (electrons from the start of the ejection's sample to the blank), ``trigger_at``,
        ``decisions_at_controller``, ``service_check_agrees`` (controller decisions the service's own trigger
        made on the same sample).
    """
    ejected = [r for r in rows if r["ejection_sample"] >= 0]
    detected = [r for r in ejected if r["reason"] == "trigger" and r["trigger_sample"] >= r["ejection_sample"]]
    false = [r for r in rows if r["reason"] == "trigger" and (r["ejection_sample"] < 0
                                                               or r["trigger_sample"] < r["ejection_sample"])]
    delay = np.array([r["trigger_sample"] - r["ejection_sample"] for r in detected], float)
    over = np.array([r["end_sample"] - r["ejection_sample"] for r in detected if r["end_sample"] >= 0], float)
    extra = np.array([(r.get("blank_time_ns", math.nan) * 1e-3 - r["ejection_sample"] * sample_time_us) * 1e-6
                      * electrons_per_s for r in detected], float)
    extra = extra[np.isfinite(extra)]
    at_ctl = [r for r in rows if r["reason"] == "trigger" and r.get("trigger_at") == "controller"]
    pct = lambda v, q: float(np.percentile(v, q)) if len(v) else float("nan")  # noqa: E731
    return {
        "trigger_at": trigger_at,
        "decisions_at_controller": len(at_ctl),
        "service_check_agrees": sum(r.get("service_trigger_sample") == r["trigger_sample"] for r in at_ctl),
        "dwells": len(rows),
        "ejections_seen": len(ejected),
        "detected": len(detected),
        "false_triggers": len(false),
        "no_event": sum(r["reason"] == "max_dwell" for r in rows),
        "detection_delay_samples_p50": pct(delay, 50),
        "detection_delay_samples_max": float(delay.max()) if len(delay) else float("nan"),
        "detection_delay_us_p50": pct(delay, 50) * sample_time_us,
        "samples_after_ejection_p50": pct(over, 50),
        "samples_after_ejection_max": float(over.max()) if len(over) else float("nan"),
        "extra_electrons_after_ejection_p50": pct(extra, 50),
        "extra_electrons_after_ejection_mean": float(extra.mean()) if len(extra) else float("nan"),
        "extra_electrons_after_ejection_max": float(extra.max()) if len(extra) else float("nan"),
        "sample_time_us": sample_time_us,
    }


def target_columns(records: list[RoundRecord], raw: dict[int, dict]) -> list[tuple]:
    """The specimen column each dwell aimed at: the column nearest its target in its frame's ground truth.

    Parameters
    ----------
    records : list of RoundRecord
    raw : dict
        Frame index -> ``sim_ground_truth`` reply.

    Returns
    -------
    list of (DwellResult, int, ndarray or None)
        Per dwell: the dwell, the column's specimen index (-1 when its frame has no ground truth or no
        column lies within 0.8 A) and its rest position ``(x, y)`` (A).
    """
    out = []
    for rec in records:
        g = raw.get(rec.index)
        for d in rec.dwells:
            if g is None or not g.get("rest_xy_A"):
                out.append((d, -1, None))
                continue
            n = int(g["n"])
            xy = np.frombuffer(g["xy"], "<f8").reshape(n, 2)
            idx = np.frombuffer(g["index"], "<i8")
            rest = np.frombuffer(g["rest_xy_A"], "<f8").reshape(n, 2)
            dist = np.hypot(xy[:, 0] - d.target.x_px, xy[:, 1] - d.target.y_px) if n else np.zeros(0)
            k = int(np.argmin(dist)) if n else -1
            if k < 0 or dist[k] * rec.pixel_size_A > 0.8:
                out.append((d, -1, None))
            else:
                out.append((d, int(idx[k]), rest[k]))
    return out


def drift_section(records: list[RoundRecord], raw: dict[int, dict], events: list[dict], estimate: dict,
                  drift_A_per_s: float) -> dict:
    """The report's ``drift`` section (module docstring).

    Returns
    -------
    dict
        ``drift_A_per_s`` (asked for), ``simulated`` (velocity and speed from the ground truth of the first
        and last frames, A/s; None without drift), ``estimate`` (the service's), ``landing_distance_pm``
        (``p50``, ``p90``, ``mean``, ``n``: probe to target column at each dwell's start; each one in
        ``landing_all_pm``), ``written_truth``
        (targets whose column holds at most one S atom in the verification frame's ground truth, of
        ``targets``), ``skipped_uncertain`` (dwells the uncertainty gate skipped).
    """
    landed = {e["series_id"]: e for e in events if e.get("type") == "probe_landed"}
    dists, written, aimed = [], 0, 0
    last = raw.get(records[-1].index) if len(records) >= 2 else None
    final = {}
    if last is not None:
        names = list(last["class_names"])
        for i, c in zip(np.frombuffer(last["index"], "<i8"), np.frombuffer(last["cls"], "i1")):
            final[int(i)] = names[int(c)]
    for d, col, rest in target_columns(records[:-1] if len(records) >= 2 else records, raw):
        if d.reason == "uncertain":
            continue
        aimed += 1
        ev = landed.get(d.series_id)
        if rest is not None and ev is not None:
            dists.append(float(np.hypot(ev["probe_A"][0] - rest[0], ev["probe_A"][1] - rest[1]) * 100))
        if col >= 0 and final.get(col) in ("S1", "vacancy"):
            written += 1
    sim = None
    times = [g for g in raw.values() if "t_start_s" in g]
    if len(times) >= 2:
        a, b = min(times, key=lambda g: g["t_start_s"]), max(times, key=lambda g: g["t_start_s"])
        dt = b["t_start_s"] - a["t_start_s"]
        if dt > 0:
            v = [(b["drift_A"][i] - a["drift_A"][i]) / dt for i in (0, 1)]
            sim = {"velocity_A_per_s": v, "speed_A_per_s": math.hypot(*v), "nominal_A_per_s": b["drift_A_per_s"]}
    arr = np.array(dists)
    pct = (lambda q: float(np.percentile(arr, q))) if len(arr) else (lambda q: float("nan"))
    n_targets = sum(len(rec.dwells) for rec in records[:-1]) if len(records) >= 2 else 0
    return {"drift_A_per_s": drift_A_per_s, "simulated": sim, "estimate": estimate,
            "landing_distance_pm": {"p50": pct(50), "p90": pct(90), "mean": float(arr.mean()) if len(arr) else
                                    float("nan"), "n": len(arr)}, "landing_all_pm": dists,
            "written_truth": written, "targets": n_targets, "aimed": aimed,
            "fraction_written_truth": written / n_targets if n_targets else float("nan"),
            "skipped_uncertain": sum(d.reason == "uncertain" for rec in records for d in rec.dwells)}


def truth_at_targets(records: list[RoundRecord], truth: dict[int, tuple]) -> dict:
    """Ground-truth classes of the targeted columns in the final (verification) frame.

    Parameters
    ----------
    records : list of RoundRecord
    truth : dict
        Frame index -> ``(xy, cls, class_names)`` (:func:`beamloop.edge.sim.microscope.decode_ground_truth`).

    Returns
    -------
    dict
        ``targets``, ``classes`` (class name -> targets whose nearest true column, within 0.8 A, has it; ``not
        found``), ``fraction_s1`` and ``fraction_vacancy`` (of the targets: one S atom left, or none, a
        di-vacancy); ``{"targets": 0}`` without a verification frame or its truth.
    """
    if len(records) < 2 or records[-1].index not in truth:
        return {"targets": 0}
    last = records[-1]
    targets = np.array([[d.target.fx, d.target.fy] for rec in records[:-1] for d in rec.dwells], float)
    if len(targets) == 0 or last.scan is None:
        return {"targets": 0}
    txy, tcls, names = truth[last.index]
    tx, ty = last.scan.pixel_of_fraction(targets[:, 0], targets[:, 1])
    ti, _, _ = match(np.asarray(txy, float), np.stack([tx, ty], 1), 0.8 / max(last.pixel_size_A, 1e-9))
    labels = np.array(names)[np.asarray(tcls)[ti]] if len(ti) else np.array([], str)
    classes = {name: int((labels == name).sum()) for name in names}
    classes["not found"] = int(len(targets) - len(ti))
    n = len(targets)
    return {"targets": n, "classes": classes, "fraction_s1": classes.get("S1", 0) / n,
            "fraction_vacancy": classes.get("vacancy", 0) / n}


def verify_written(records: list[RoundRecord]) -> dict:
    """Classes found at the targeted positions in the final (verification) frame.

    A target whose column reads ``S1`` (or ``vacancy``) afterwards was written."""
    if len(records) < 2:
        return {"targets": 0}
    last = records[-1]
    targets = np.array([[d.target.fx, d.target.fy] for rec in records[:-1] for d in rec.dwells], float)
    if len(targets) == 0 or last.scan is None:
        return {"targets": 0}
    tx, ty = last.scan.pixel_of_fraction(targets[:, 0], targets[:, 1])
    if last.drift is not None:  # a registered path: the targets moved with the specimen since their frame
        moved = np.array([np.subtract(last.drift["displacement_px"], rec.drift["displacement_px"])
                          if rec.drift is not None else (0.0, 0.0) for rec in records[:-1] for d in rec.dwells], float)
        if len(moved):
            tx, ty = tx + moved[:, 0], ty + moved[:, 1]
    # frames differ by their own drift, so a target is looked for within 0.8 A (neighbours are 1.8 A away)
    fi, ti, _ = match(last.columns.xy, np.stack([tx, ty], 1), 0.8 / max(last.pixel_size_A, 1e-9))
    labels = np.array(last.columns.class_labels())
    now = {name: int((labels[fi] == name).sum()) for name in last.columns.class_names}
    now["not found"] = int(len(targets) - len(ti))
    return {"targets": int(len(targets)), "classes_after": now,
            "written": int(now.get("S1", 0) + now.get("vacancy", 0)), "target_xy_px": np.stack([tx, ty], 1).tolist()}


def print_report(latency: LatencyRecorder, accuracy, per_frame: list, trig: dict, verify: dict, sim_events: list,
                 counters: dict, stats, out: Path, drift: dict | None = None) -> None:
    """Print the latency table, accuracy per class, trigger figures, atoms removed and (``drift``: the
    report's section) the drift and the probe-to-column distances."""
    print()
    print(latency.table("latency per stage, microseconds (end_to_end: frame leaves the detector -> probe parked)"))
    print()
    print(f"accuracy against ground truth ({len(per_frame)} frames, matched within 0.5 A, 0.5 A edge margin)")
    print(f"  columns: recall {accuracy.recall:.4f}  precision {accuracy.precision:.4f}  RMS {accuracy.rms_pm:.1f} pm"
          f"  ({accuracy.n_matched}/{accuracy.n_true} true, {accuracy.n_found} found)")
    print(f"  {'class':<9}{'true':>6}{'found':>7}{'recall':>9}{'correct':>9}{'precision':>11}{'RMS pm':>9}")
    for name, c in accuracy.per_class.items():
        print(f"  {name:<9}{c['n_true']:>6}{c['n_found']:>7}{c['recall']:>9.3f}{c['correct']:>9.3f}"
              f"{c['precision']:>11.3f}{c['rms_pm']:>9.1f}")
    print()
    parked = [e for e in sim_events if e["type"] == "ejection" and e.get("cause") == "parked"]
    scan = [e for e in sim_events if e["type"] == "ejection" and e.get("cause") == "scan"]
    print(f"atoms removed: {len(parked)} S atoms under the parked beam, {len(scan)} by scanning frames")
    print(f"  decisions at the {trig['trigger_at'] or 'service'}; dwells {trig['dwells']}: trigger fired after an "
          f"ejection {trig['detected']}, false triggers {trig['false_triggers']}, no event {trig['no_event']}")
    print(f"  detection delay p50 {trig['detection_delay_samples_p50']:.0f} samples "
          f"({trig['detection_delay_us_p50']:.0f} us at {trig['sample_time_us']:g} us/sample), "
          f"beam on after ejection p50 {trig['samples_after_ejection_p50']:.0f} samples, max "
          f"{trig['samples_after_ejection_max']:.0f}; extra electrons after the ejection p50 "
          f"{trig['extra_electrons_after_ejection_p50']:.0f}")
    if verify.get("targets"):
        print(f"  verification frame: {verify['written']} of {verify['targets']} targets now read S1 or vacancy "
              f"({verify['classes_after']})")
    if drift is not None:
        est = (drift.get("estimate") or {}).get("estimate") or {}
        sim = drift.get("simulated") or {}
        land = drift["landing_distance_pm"]
        lock = (drift.get("estimate") or {}).get("lock_on")
        print(f"drift: simulated {sim.get('speed_A_per_s', 0.0):.3f} A/s, estimated "
              f"{est.get('speed_A_per_s', float('nan')):.3f} A/s (lock-on {lock}); probe to column at dwell start "
              f"p50 {land['p50']:.1f} pm, p90 {land['p90']:.1f} pm ({land['n']} dwells)"
              f"; written by ground truth {drift['written_truth']} of {drift['targets']}, "
              f"{drift['skipped_uncertain']} skipped as uncertain")
    hint = ("; frames went missing: another consumer on the frame stream? (a PUSH socket deals its messages out "
            "among all its consumers)") if counters.get("gaps") or counters.get("unexpected") else ""
    print(f"stream: {counters['frames']} frames, {counters['rejected']} rejected, {counters['missing_frames']} missing;"
          f" service: {stats.frame_errors} bad frames, {stats.series_rejected} series ({stats.frames_rejected} frames)"
          f" rejected for their metadata, {stats.protocol_errors} protocol errors{hint}")
    print(f"wrote {out / 'run.h5'}, {out / 'overlay.png'}, {out / 'report.json'}")


def check_options(*, rounds: int, shape: tuple[int, int], pixel_size_A: float, dose_e_per_A2: float,
                  targets_per_frame: int, current_pA: float, max_dwell_s: float) -> tuple[float, float]:
    """Check the main job's options against the simulated microscope before anything starts.

    Returns ``(dwell_us, fov_nm)``: the pixel dwell the dose needs at the current, and the field of view.

    Raises
    ------
    ValueError
        One line naming the option and its range: rounds or targets below 0, a frame size outside the
        simulator's, a pixel size outside :data:`beamloop.edge.frame.context.PIXEL_SIZE_A` or a field of view
        beyond the simulated specimen, a dose whose pixel dwell is outside the simulator's limits, a
        longest dwell beyond its parked-beam limit.
    """
    from beamloop.edge.frame.context import PIXEL_SIZE_A
    from beamloop.edge.sim.frames import electrons_per_second
    from beamloop.edge.sim.microscope import MicroscopeConfig

    sim = MicroscopeConfig()
    if not (isinstance(rounds, int) and rounds >= 0):
        raise ValueError(f"--rounds {rounds!r} must be a whole number >= 0")
    if not (isinstance(targets_per_frame, int) and targets_per_frame >= 0):
        raise ValueError(f"--targets {targets_per_frame!r} must be a whole number >= 0")
    lo, hi = MicroscopeConfig.LIMITS["shape"]
    if not all(isinstance(v, int) and lo <= v <= hi for v in shape):
        raise ValueError(f"--shape {shape[0]}x{shape[1]} is outside the simulator's {lo} .. {hi} pixels per side")
    plo, phi = PIXEL_SIZE_A
    if not (math.isfinite(pixel_size_A) and plo <= pixel_size_A <= phi):
        raise ValueError(f"--pixel-size {pixel_size_A:g} A is outside {plo:g} .. {phi:g} A")
    fov_nm = shape[1] * pixel_size_A / 10
    max_fov = sim.specimen_size_A / 10 / math.sqrt(2) - 1.0
    if max(shape) * pixel_size_A / 10 > max_fov:
        raise ValueError(f"a {shape[0]}x{shape[1]} frame of {pixel_size_A:g} A pixels spans "
                         f"{max(shape) * pixel_size_A / 10:.3g} nm, more than the simulated specimen's "
                         f"{max_fov:.3g} nm")
    if not (math.isfinite(current_pA) and 0 < current_pA <= 1e6):
        raise ValueError(f"--current-pA {current_pA:g} is outside (0, 1e6] pA")
    dwell_us = dose_e_per_A2 * pixel_size_A**2 / electrons_per_second(current_pA) * 1e6
    dlo, dhi = MicroscopeConfig.LIMITS["dwell_us"]
    if not (math.isfinite(dwell_us) and dlo <= dwell_us <= dhi):
        raise ValueError(f"--dose {dose_e_per_A2:g} e/A^2 needs a pixel dwell of {dwell_us:.3g} us at "
                         f"{current_pA:g} pA and {pixel_size_A:g} A pixels, outside the simulator's {dlo:g} .. "
                         f"{dhi:g} us")
    if not (math.isfinite(max_dwell_s) and 0 < max_dwell_s <= sim.max_park_s):
        raise ValueError(f"--max-dwell {max_dwell_s:g} s is outside (0, {sim.max_park_s:g}] s (the simulator's "
                         "parked-beam limit)")
    return dwell_us, fov_nm


@contextlib.contextmanager
def _frame_source(ends: dict, svc_cfg: ServiceConfig, detector: str, shape: tuple[int, int], fov_nm: float):
    """The service's frame receiver, and its latency recorder (None: the path's own): the simulator's frame
    stream, or with ``sim4d`` the 4D frame source on its detector stream (the frame stream then gives the
    parked-probe samples)."""
    rx = FrameReceiver(ends["frames"], ring=8, max_ring_bytes=receiver_ring_bytes(svc_cfg))
    if detector != "sim4d":
        with rx:
            yield rx, None
        return
    from beamloop.edge.fourd_source import STAGES_4D, FourDFrameSource
    from beamloop.edge.frame.scanframe import ScanFrame
    from beamloop.edge.service import latency_keys
    from beamloop.streams.receivers import open_receiver

    latency = LatencyRecorder(latency_keys(build_path(svc_cfg)) + STAGES_4D)
    det = open_receiver(ends["detector"], protocol="stream2", max_ring_bytes=receiver_ring_bytes(svc_cfg))
    with FourDFrameSource(det, ScanFrame(0, tuple(shape), (fov_nm, fov_nm)), latency=latency,
                          point_stream=rx) as source:
        source.warm_up()
        yield source, latency


def run(out: Path, *, rounds: int = 3, shape: tuple[int, int] = (256, 256), pixel_size_A: float = 0.15,
        dose_e_per_A2: float = 1e5, targets_per_frame: int = 4, seed: int = 0, current_pA: float = 50.0,
        trigger: str = "model", max_dwell_s: float = 2.0, quiet: bool = False,
        interrupt: Callable[[], int] | None = None, trigger_at: str = "controller", drift_A_per_s: float = 0.0,
        lock_on: str | None = None, http: tuple[str, int] | None = None, detector: str = "haadf",
        detector_px: int = 32, drift_correction: dict | None = None) -> dict:
    """Run the main job and return the report (also written to ``out/report.json``).

    Frames are written to ``out/run.h5`` as they are done, so a run that stops early (see ``outcome``)
    keeps what it recorded; the report, the overlay and the run file's summary are written on the way out
    whatever happened.

    Parameters
    ----------
    out : Path
        Output folder (created).
    rounds : int
        Frames with targets (one more verifies).
    shape : (rows, cols)
        Frame size, pixels.
    pixel_size_A : float
        Angstrom per pixel.
    dose_e_per_A2 : float
        Frame dose; sets the pixel dwell time from the probe current.
    targets_per_frame : int
    seed : int
        Simulator seed.
    current_pA : float
        Probe current.
    trigger : {"model", "cusum", "window"}
        Ejection trigger (:func:`beamloop.edge.trigger.make_trigger`); ``"model"`` is the quantized network shipped in
        ``edge/models/trigger/`` (integer arithmetic, bit-exact with its QONNX graph).
    max_dwell_s : float
        Longest dwell per target.
    quiet : bool
        No progress bar, no printed report.
    interrupt : callable() -> int, optional
        Asked while waiting; a non-zero signal number stops the experiment cleanly
        (:class:`beamloop.edge.service.Interrupted`), e.g. :class:`beamloop.edge.cli.StopSignals`.
    trigger_at : {"controller", "service"}
        Where the trigger decides: at the simulated scan controller (it offers the shipped models), or in the
        service. The report's ``trigger.trigger_at`` says where it did.
    drift_A_per_s : float
        Specimen drift of the simulator, A/s (0: none, the simulator as before drift was modelled).
    lock_on : {"none", "predict"}, optional
        The service's drift correction (:data:`beamloop.edge.service.LOCK_ON`); ``predict`` also scans two
        frames first to measure the drift (``ExperimentConfig.drift_frames``). Default: ``predict`` on a
        drifting specimen, ``none`` at ``drift_A_per_s`` 0 (the simulator then keeps its per-frame stand-in scan
        drift, random from frame to frame, and puts the probe on the column the frame showed: there is no motion
        to predict, and the registration would read those frame-to-frame jumps as one; bench/results/drift.md).
    http : (host, port), optional
        Serve the live view and ``/metrics`` there while the loop runs (a loopback address: the simulator's
        bridge has no keys; :func:`beamloop.edge.app.start_monitor`); its stop button stops the run as an
        interrupt does (``outcome.reason`` ``interrupted``, the beam blanked).
    detector : {"haadf", "sim4d"}
        Where the service's frames come from: the simulator's HAADF frame stream, or its 4D mode (a
        pixelated detector streaming a diffraction pattern per probe position, Stream V2), each frame's
        virtual ADF image assembled by :class:`beamloop.edge.fourd_source.FourDFrameSource`; the report's
        latency then has the 4D stages (``reduce4d``, ``assemble4d``).
    detector_px : int
        Detector pixels per side of ``sim4d``.
    drift_correction : dict, optional
        The refinements of lock-on predict/rescan (:class:`beamloop.edge.app.ServiceConfig` fields
        ``match_columns``, ``rescan_updates``, ``recentre_s``, ``recentre_decline``); all off by default.

    Returns
    -------
    dict
        The report; its ``outcome`` says how the run ended: ``complete`` (bool), ``reason`` (empty, or a
        reason of :data:`beamloop.edge.experiments.vacancy_line.STOP_REASONS`), ``message``, ``signum``,
        ``output_errors`` (files that could not be written, with why).

    Raises
    ------
    ValueError
        An option outside its range (:func:`check_options`), before anything starts.
    RuntimeError
        The simulator could not be started.
    beamloop.edge.monitor.auth.MonitorAuthError
        ``http`` is not a loopback address.
    OSError
        ``http`` cannot be bound (the simulator is stopped then).
    beamloop.edge.io.runlog.RunLogError
        The run file cannot be created (before the simulator starts).
    """
    out = Path(out)
    dwell_us, fov_nm = check_options(rounds=rounds, shape=shape, pixel_size_A=pixel_size_A,
                                     dose_e_per_A2=dose_e_per_A2, targets_per_frame=targets_per_frame,
                                     current_pA=current_pA, max_dwell_s=max_dwell_s)
    from beamloop.edge.service import LOCK_ON

    if not (isinstance(drift_A_per_s, (int, float)) and math.isfinite(drift_A_per_s) and 0 <= drift_A_per_s <= 100):
        raise ValueError(f"--drift-A-per-s {drift_A_per_s!r} must be a number in [0, 100] A/s")
    if lock_on is None:
        lock_on = "predict" if drift_A_per_s > 0 else "none"
    if detector not in ("haadf", "sim4d"):
        raise ValueError(f"--detector {detector!r} must be haadf or sim4d")
    if lock_on not in LOCK_ON:
        raise ValueError(f"--lock-on {lock_on!r} must be one of {', '.join(LOCK_ON)}")
    if http is not None:
        from beamloop.edge.monitor.auth import MonitorAuthError, is_loopback

        if not is_loopback(http[0]):
            raise MonitorAuthError(f"--http {http[0]}:{http[1]}: the main job's live view binds loopback only "
                                   "(the simulated microscope's bridge has no keys to derive its token from)")
    config = {"rounds": rounds, "shape": list(shape), "pixel_size_A": pixel_size_A, "dose_e_per_A2": dose_e_per_A2,
              "dwell_us": dwell_us, "targets_per_frame": targets_per_frame, "seed": seed, "current_pA": current_pA,
              "trigger": trigger, "trigger_at": trigger_at, "drift_A_per_s": drift_A_per_s, "lock_on": lock_on,
              "detector": detector, **({"detector_px": detector_px} if detector == "sim4d" else {})}
    exp_cfg = ExperimentConfig(rounds=rounds, shape=shape, fov_nm=fov_nm, dwell_us=dwell_us,
                               targets_per_frame=targets_per_frame, max_dwell_s=max_dwell_s,
                               drift_frames=0 if lock_on == "none" else 2)
    svc_cfg = ServiceConfig("MoS2", targets_per_frame=targets_per_frame, trigger=trigger, trigger_at=trigger_at,
                            lock_on=lock_on, **(drift_correction or {}))
    out.mkdir(parents=True, exist_ok=True)
    rl = RunLog(out / "run.h5", config)
    outcome: dict = {"complete": False, "reason": "", "message": "", "signum": 0, "output_errors": []}
    records: list[RoundRecord] = []
    truth: dict[int, tuple] = {}
    raw_truth: dict[int, dict] = {}
    events: list[dict] = []
    safety: dict = {}
    caps: dict = {}
    counters: dict = {}
    bridge = service = None
    monitor = None

    def output_error(exc: Exception) -> None:
        outcome["output_errors"].append(str(exc))

    try:
        proc, ends = start_simulator(["--frames", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
                                      "--seed", str(seed), "--current-pA", str(current_pA),
                                      *(["--drift-A-per-s", repr(float(drift_A_per_s))] if drift_A_per_s else []),
                                      *(["--detector-4d", "tcp://127.0.0.1:*", "--detector-px", str(detector_px)]
                                        if detector == "sim4d" else [])])
    except BaseException:
        rl.close(stopped="the simulator did not start")
        raise
    gone = simulator_gone(proc)
    try:
        with _frame_source(ends, svc_cfg, detector, shape, fov_nm) as (rx, latency), \
                BridgeClient(ends["control"], timeout_ms=20000, peer_gone=gone) as bridge:
            service = build_service(rx, svc_cfg, bridge, latency=latency)
            service.interrupt = interrupt
            if http is not None:
                monitor = start_monitor(service, http)
                if not quiet:
                    print(f"live view {monitor.url}, metrics {monitor.url}metrics", flush=True)
            caps = bridge.get_capabilities()
            service.choose_trigger_at(caps)
            warm_up(service.path, service.trigger, shape=shape, pixel_size_A=pixel_size_A, dtypes=(np.uint16,))
            service.trace_frames(capacity=4096)  # per-frame stage timestamps for run.h5 (/trace), the last 4096

            def on_record(rec: RoundRecord) -> None:
                records.append(rec)
                try:
                    raw_truth[rec.index] = g = bridge.call("sim_ground_truth", frame_id=rec.scan.frame_id)
                    truth[rec.index] = decode_ground_truth(g)
                except BridgeError as exc:
                    service.stats.note(f"no ground truth for frame {rec.scan.frame_id}: {exc}")
                rl.add_frame(rec.image, rec.columns, pixel_size_A=rec.pixel_size_A, scan=rec.scan.as_dict(),
                             truth=truth.get(rec.index), targets=rec.targets,
                             attrs={"frame_id": rec.scan.frame_id, "round": rec.index})

            steps = rounds + 1 + rounds * targets_per_frame
            with tqdm(total=steps, desc="closed loop", unit="step", disable=quiet) as bar:
                def progress(text: str) -> None:
                    bar.set_postfix_str(text)
                    bar.update(1)

                try:
                    vacancy_line(service, exp_cfg, progress, on_record)
                    outcome["complete"] = True
                except ExperimentStopped as exc:
                    outcome.update(reason=exc.reason, message=exc.message, signum=exc.signum)
                except RunLogError as exc:  # the disk is full: stop writing, blank, keep what was written
                    service.safe_blank()
                    outcome.update(reason="output", message=str(exc))
                    output_error(exc)
            if outcome["reason"] != "controller_lost":
                try:
                    events = bridge.call("sim_events")["events"]
                    safety = bridge.get_state().get("safety", {})
                    bridge.stop()
                    bridge.call("shutdown")
                except BridgeError as exc:
                    service.stats.note(f"simulator at the end: {exc}")
            counters = rx.counters.as_dict()
    finally:
        if monitor is not None:
            monitor.stop()
        status = stop_simulator(proc)
    if outcome["reason"] == "controller_lost" and status:
        outcome["message"] += f" (the simulator exited with status {status})"

    per_frame = []
    for rec in records:
        if rec.index in truth:
            txy, tcls, names = truth[rec.index]
            per_frame.append(score_frame(rec.columns.xy, rec.columns.cls, txy, tcls, names, rec.pixel_size_A,
                                         frame_shape=rec.image.shape))
    accuracy = combine(per_frame)
    dt_us = (caps.get("parked_stream") or {}).get("sample_time_us", float("nan"))
    rows = dwell_rows(records, events, dt_us)
    assert service is not None and bridge is not None
    trig = dwell_summary(rows, dt_us, electrons_per_second(current_pA), service.trigger_at)
    trig["trigger_at_note"] = service.trigger_at_note
    verify = verify_written(records)
    verify["truth"] = truth_at_targets(records, truth)
    assert service is not None and bridge is not None
    latency = service.latency
    report = {
        "config": config,
        "outcome": outcome,
        "latency_us": latency.summary(),
        "accuracy": accuracy.as_dict(),
        "accuracy_per_frame": [s.as_dict() for s in per_frame],
        "trigger": trig,
        "verification": {k: v for k, v in verify.items() if k != "target_xy_px"},
        "drift": drift_section(records, raw_truth, events, service.drift_summary(), drift_A_per_s),
        "atoms_removed": {"parked": sum(e["type"] == "ejection" and e.get("cause") == "parked" for e in events),
                          "scan": sum(e["type"] == "ejection" and e.get("cause") == "scan" for e in events)},
        "stream_counters": counters,
        "bridge_counters": asdict(bridge.counters),
        "safety": safety,
        "service": {"frame_errors": service.stats.frame_errors, "series_rejected": service.stats.series_rejected,
                    "frames_rejected": service.stats.frames_rejected, "protocol_errors": service.stats.protocol_errors,
                    "blank_failures": service.stats.blank_failures, "errors": service.stats.errors[-10:]},
    }
    try:
        rl.write_beam_log(sorted(list(bridge.log) + decision_log(records), key=lambda e: e.t_ns))
        rl.write_dwells(rows)
        if service is not None and service.trace is not None:
            rl.write_trace(service.trace.records(), service.trace.stages, service.trace.dropped)
        rl.write_text("events", events)
        rl.set_attrs(latency=report["latency_us"], accuracy=report["accuracy"], trigger=trig,
                     stream_counters=counters, outcome=outcome)
    except RunLogError as exc:
        if str(exc) not in outcome["output_errors"]:
            output_error(exc)
    try:
        rl.close(stopped=outcome["reason"] and f"{outcome['reason']}: {outcome['message']}")
    except RunLogError as exc:
        output_error(exc)
    try:
        write_text_file(out / "report.json", json.dumps(report, indent=2, default=float))
    except RunLogError as exc:
        output_error(exc)
    if records:
        last = records[-1]
        try:
            save_overlay(out / "overlay.png", last.image, last.columns, pixel_size_A=last.pixel_size_A,
                         marks={"targeted": verify.get("target_xy_px", [])},
                         title=f"frame {last.scan.frame_id}: {len(last.columns)} columns; magenta: targeted S2 "
                               "columns")
        except OSError as exc:
            output_error(RunLogError(exc.errno or 5, f"{out / 'overlay.png'}: {exc.strerror or exc}"))
    if not quiet:
        if records:
            print_report(latency, accuracy, per_frame, trig, verify, events, counters, service.stats, out,
                         report["drift"])
        sc = safety.get("counters", {})
        print(f"beam safety: {bridge.counters.heartbeats} heartbeats sent, watchdog trips {sc.get('watchdog_trips')}, "
              f"dwell-limit blanks {sc.get('dwell_limit_blanks')}, refused positions "
              f"{sc.get('refused_position', 0) + sc.get('refused_stale_frame', 0)}, rate limited "
              f"{sc.get('rate_limited')}")
    return report
