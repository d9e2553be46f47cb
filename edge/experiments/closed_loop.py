"""The main job (``beamloop run``, ``make run``): the closed loop on the simulated microscope, end to end.

It starts the simulated microscope in its own process (``beamloop sim``), connects the service to its
frame stream and control bridge, writes a line of S vacancies atom by atom (:func:`beamloop.edge.experiments.vacancy_line.vacancy_line`),
then scores every frame against the simulator's ground truth and prints the per-stage latency, the
accuracy per class, and the atoms removed. Outputs in ``--out``: ``run.h5`` (:mod:`beamloop.edge.io.runlog`),
``overlay.png`` and ``report.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from beamloop.edge.app import ServiceConfig, build_service, warm_up
from beamloop.edge.control.client import BridgeClient
from beamloop.edge.control.protocol import BridgeError
from beamloop.edge.frame.latency import LatencyRecorder
from beamloop.edge.experiments.vacancy_line import ExperimentConfig, RoundRecord, vacancy_line
from beamloop.edge.io.overlay import save_overlay
from beamloop.edge.io.runlog import RunLog
from beamloop.edge.analysis.scoring import combine, match, score_frame
from beamloop.edge.sim.microscope import decode_ground_truth
from beamloop.streams.native.receiver import FrameReceiver


def start_simulator(args: list[str], timeout_s: float = 120.0) -> tuple[subprocess.Popen, dict]:
    """Start ``beamloop sim --announce`` in a subprocess and wait for the line giving its endpoints.

    Returns the process and the announced ``{"frames": ..., "control": ...}``.

    Raises
    ------
    RuntimeError
        The simulator exited or did not announce itself within ``timeout_s``.
    """
    cmd = [sys.executable, "-m", "beamloop.edge.cli", "sim", "--announce", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"simulator exited with status {proc.returncode} before announcing its endpoints")
            continue
        if line.startswith("BEAMLOOP-SIM "):
            return proc, json.loads(line.split(" ", 1)[1])
    proc.kill()
    raise RuntimeError(f"simulator did not announce its endpoints within {timeout_s} s")


def dwell_rows(records: list[RoundRecord], events: list[dict]) -> list[dict]:
    """One row per dwell, joined with the simulator's record of the same parked series (ejection and
    end sample), so that detection delay and overdose can be measured against ground truth."""
    ends = {e["series_id"]: e for e in events if e["type"] == "dwell_end"}
    rows = []
    for rec in records:
        for d in rec.dwells:
            e = ends.get(d.series_id, {})
            ej = e.get("ejection_samples", [])
            rows.append({"frame_id": d.target.frame_id, "fx": d.target.fx, "fy": d.target.fy, "x_px": d.target.x_px,
                         "y_px": d.target.y_px, "reason": d.reason, "trigger_sample": d.trigger_sample,
                         "samples": d.samples, "series_id": d.series_id,
                         "ejection_sample": ej[0] if ej else -1, "end_sample": e.get("beam_off_sample", -1),
                         "ejections": len(ej), "baseline_rate": d.baseline_rate})
    return rows


def dwell_summary(rows: list[dict], sample_time_us: float) -> dict:
    """Trigger performance against ground truth: detections, misses, false triggers, delay, overdose."""
    ejected = [r for r in rows if r["ejection_sample"] >= 0]
    detected = [r for r in ejected if r["reason"] == "trigger" and r["trigger_sample"] >= r["ejection_sample"]]
    false = [r for r in rows if r["reason"] == "trigger" and (r["ejection_sample"] < 0
                                                               or r["trigger_sample"] < r["ejection_sample"])]
    delay = np.array([r["trigger_sample"] - r["ejection_sample"] for r in detected], float)
    over = np.array([r["end_sample"] - r["ejection_sample"] for r in detected if r["end_sample"] >= 0], float)
    pct = lambda v, q: float(np.percentile(v, q)) if len(v) else float("nan")  # noqa: E731
    return {
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
        "sample_time_us": sample_time_us,
    }


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
    # frames differ by their own drift, so a target is looked for within 0.8 A (neighbours are 1.8 A away)
    fi, ti, _ = match(last.columns.xy, np.stack([tx, ty], 1), 0.8 / max(last.pixel_size_A, 1e-9))
    labels = np.array(last.columns.class_labels())
    now = {name: int((labels[fi] == name).sum()) for name in last.columns.class_names}
    now["not found"] = int(len(targets) - len(ti))
    return {"targets": int(len(targets)), "classes_after": now,
            "written": int(now.get("S1", 0) + now.get("vacancy", 0)), "target_xy_px": np.stack([tx, ty], 1).tolist()}


def print_report(latency: LatencyRecorder, accuracy, per_frame: list, trig: dict, verify: dict, sim_events: list,
                 counters: dict, stats, out: Path) -> None:
    """Print the latency table, accuracy per class, trigger figures and atoms removed."""
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
    print(f"  dwells {trig['dwells']}: trigger fired after an ejection {trig['detected']}, false triggers "
          f"{trig['false_triggers']}, no event {trig['no_event']}")
    print(f"  detection delay p50 {trig['detection_delay_samples_p50']:.0f} samples "
          f"({trig['detection_delay_us_p50']:.0f} us at {trig['sample_time_us']:g} us/sample), "
          f"beam on after ejection p50 {trig['samples_after_ejection_p50']:.0f} samples, max "
          f"{trig['samples_after_ejection_max']:.0f}")
    if verify.get("targets"):
        print(f"  verification frame: {verify['written']} of {verify['targets']} targets now read S1 or vacancy "
              f"({verify['classes_after']})")
    print(f"stream: {counters['frames']} frames, {counters['rejected']} rejected, {counters['missing_frames']} missing;"
          f" service: {stats.frame_errors} bad frames, {stats.protocol_errors} protocol errors")
    print(f"wrote {out / 'run.h5'}, {out / 'overlay.png'}, {out / 'report.json'}")


def run(out: Path, *, rounds: int = 3, shape: tuple[int, int] = (256, 256), pixel_size_A: float = 0.15,
        dose_e_per_A2: float = 1e5, targets_per_frame: int = 4, seed: int = 0, current_pA: float = 50.0,
        trigger: str = "model", max_dwell_s: float = 2.0, quiet: bool = False) -> dict:
    """Run the main job and return the report (also written to ``out/report.json``).

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

    Raises
    ------
    RuntimeError
        The simulator could not be started.
    """
    from beamloop.edge.sim.frames import electrons_per_second

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dwell_us = dose_e_per_A2 * pixel_size_A**2 / electrons_per_second(current_pA) * 1e6
    fov_nm = shape[1] * pixel_size_A / 10
    exp_cfg = ExperimentConfig(rounds=rounds, shape=shape, fov_nm=fov_nm, dwell_us=dwell_us,
                               targets_per_frame=targets_per_frame, max_dwell_s=max_dwell_s)
    proc, ends = start_simulator(["--frames", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
                                  "--seed", str(seed), "--current-pA", str(current_pA)])
    try:
        with FrameReceiver(ends["frames"], ring=8) as rx, BridgeClient(ends["control"], timeout_ms=20000) as bridge:
            service = build_service(rx, ServiceConfig("MoS2", targets_per_frame=targets_per_frame, trigger=trigger),
                                    bridge)
            latency = service.latency
            caps = bridge.get_capabilities()
            warm_up(service.path, service.trigger, shape=shape, pixel_size_A=pixel_size_A, dtypes=(np.uint16,))
            steps = rounds + 1 + rounds * targets_per_frame
            with tqdm(total=steps, desc="closed loop", unit="step", disable=quiet) as bar:
                def progress(text: str) -> None:
                    bar.set_postfix_str(text)
                    bar.update(1)

                records = vacancy_line(service, exp_cfg, progress)
            truth = {}
            for rec in records:
                try:
                    truth[rec.index] = decode_ground_truth(bridge.call("sim_ground_truth", frame_id=rec.scan.frame_id))
                except BridgeError as exc:
                    service.stats.note(f"no ground truth for frame {rec.scan.frame_id}: {exc}")
            events = bridge.call("sim_events")["events"]
            safety = bridge.get_state().get("safety", {})
            try:
                bridge.blank(True)
                bridge.call("shutdown")
            except BridgeError:
                pass
            counters = rx.counters.as_dict()
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

    per_frame = []
    for rec in records:
        if rec.index in truth:
            txy, tcls, names = truth[rec.index]
            per_frame.append(score_frame(rec.columns.xy, rec.columns.cls, txy, tcls, names, rec.pixel_size_A,
                                         frame_shape=rec.image.shape))
    accuracy = combine(per_frame)
    rows = dwell_rows(records, events)
    trig = dwell_summary(rows, caps["parked_stream"]["sample_time_us"])
    verify = verify_written(records)
    report = {
        "config": {"rounds": rounds, "shape": list(shape), "pixel_size_A": pixel_size_A,
                   "dose_e_per_A2": dose_e_per_A2, "dwell_us": dwell_us, "targets_per_frame": targets_per_frame,
                   "seed": seed, "current_pA": current_pA, "trigger": trigger},
        "latency_us": latency.summary(),
        "accuracy": accuracy.as_dict(),
        "accuracy_per_frame": [s.as_dict() for s in per_frame],
        "trigger": trig,
        "verification": {k: v for k, v in verify.items() if k != "target_xy_px"},
        "atoms_removed": {"parked": sum(e["type"] == "ejection" and e.get("cause") == "parked" for e in events),
                          "scan": sum(e["type"] == "ejection" and e.get("cause") == "scan" for e in events)},
        "stream_counters": counters,
        "bridge_counters": asdict(bridge.counters),
        "safety": safety,
        "service": {"frame_errors": service.stats.frame_errors, "protocol_errors": service.stats.protocol_errors,
                    "errors": service.stats.errors[-10:]},
    }
    with RunLog(out / "run.h5", report["config"]) as rl:
        for rec in records:
            rl.add_frame(rec.image, rec.columns, pixel_size_A=rec.pixel_size_A, scan=rec.scan.as_dict(),
                         truth=truth.get(rec.index), targets=rec.targets,
                         attrs={"frame_id": rec.scan.frame_id, "round": rec.index})
        rl.write_beam_log(bridge.log)
        rl.write_dwells(rows)
        rl.write_text("events", events)
        rl.set_attrs(latency=report["latency_us"], accuracy=report["accuracy"], trigger=trig,
                     stream_counters=counters)
    last = records[-1]
    save_overlay(out / "overlay.png", last.image, last.columns, pixel_size_A=last.pixel_size_A,
                 marks={"targeted": verify.get("target_xy_px", [])},
                 title=f"verification frame {last.scan.frame_id}: {len(last.columns)} rows; magenta: targeted S2 columns")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    if not quiet:
        print_report(latency, accuracy, per_frame, trig, verify, events, counters, service.stats, out)
        sc = safety.get("counters", {})
        print(f"beam safety: {bridge.counters.heartbeats} heartbeats sent, watchdog trips {sc.get('watchdog_trips')}, "
              f"dwell-limit blanks {sc.get('dwell_limit_blanks')}, refused positions "
              f"{sc.get('refused_position', 0) + sc.get('refused_stale_frame', 0)}, rate limited {sc.get('rate_limited')}")
    return report
