"""``beamloop sim``: the simulated microscope (scan controller and HAADF detector) as a server.

Signals: SIGINT and SIGTERM end the serve loop; the controller then blanks the beam and closes (exit status
128 + the signal). SIGHUP reads the bridge's folder of authorized client keys again (``--authorized``): a
key removed from it is refused from the next connection on.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading

from beamloop.edge.cli.types import bounded, frame_compression, parse_nonnegative, parse_positive, parse_positive_int


def cmd_sim(a: argparse.Namespace) -> int:
    """``beamloop sim``: the simulated microscope, serving until interrupted or ``--duration``; exit status."""
    from beamloop.edge.cli import StopSignals
    from beamloop.edge.cli.options import safety_options, server_keys_from_args
    from beamloop.edge.sim.microscope import MicroscopeConfig, SimulatedMicroscope

    cfg = MicroscopeConfig(frames=a.frames, control=a.control, seed=a.seed, current_pA=a.current_pA,
                           cross_section_barn=a.cross_section_barn, sample_time_us=a.sample_time_us,
                           block_samples=a.block_samples, distortion_scale=a.distortion_scale, encoding=a.encoding,
                           max_park_s=a.max_park, keys=server_keys_from_args(a), insecure_frames=a.insecure,
                           drift_A_per_s=a.drift_A_per_s, drift_settle_A_per_s=a.drift_settle_A_per_s,
                           coil_settle_us=a.coil_settle_us, coil_overshoot=a.coil_overshoot,
                           coil_hysteresis_A=a.coil_hysteresis_A,
                           **safety_options(a))
    reload = threading.Event()
    with StopSignals() as stop, SimulatedMicroscope(cfg) as mic:
        detector = None
        if a.detector_4d:  # the 4D mode: a pixelated detector streams every frame's patterns (Stream V2)
            from beamloop.edge.fourd_detector import FourDBackend

            detector = FourDBackend.attach(mic, endpoint=a.detector_4d, detector_px=a.detector_px, seed=a.seed)
        old_hup = None
        if threading.current_thread() is threading.main_thread():
            old_hup = signal.signal(signal.SIGHUP, lambda *_: reload.set())
        try:
            info = {"frames": mic.frames_endpoint, "control": mic.control_endpoint}
            if detector is not None:
                info["detector"] = detector.endpoint
            if a.announce:
                print("BEAMLOOP-SIM " + json.dumps(info), flush=True)
            else:
                print(f"simulated microscope: frames on {info['frames']}, bridge on {info['control']}", flush=True)

            def stopping() -> bool:
                if reload.is_set():
                    reload.clear()
                    print("authorized keys read again" if mic.reload_keys() else "no keys to read again", flush=True)
                return bool(stop.signum)

            mic.serve(duration_s=a.duration, stop=stopping)
        finally:
            if old_hup is not None:
                signal.signal(signal.SIGHUP, old_hup)
            if detector is not None:
                detector.close()
    return stop.exit_status


def register(sub) -> None:
    """Add ``sim`` to the ``beamloop`` subcommands."""
    from beamloop.edge.cli.options import add_drift_argument, add_safety_arguments, add_server_key_arguments
    from beamloop.edge.control.controller import MAX_BLOCK_SAMPLES, SAMPLE_TIME_US

    s = sub.add_parser("sim", help="the simulated microscope (scan controller + HAADF detector)")
    s.add_argument("--frames", default="tcp://127.0.0.1:5555", help="frame stream endpoint to bind (loopback or "
                                                                   "ipc:// unless --insecure)")
    s.add_argument("--insecure", action="store_true",
                   help="allow binding the frame stream beyond loopback: it is neither encrypted nor authenticated")
    s.add_argument("--control", default="tcp://127.0.0.1:5556", help="bridge endpoint to bind")
    s.add_argument("--seed", type=int, default=0, help="seed of the specimen, the noise and the ejections")
    s.add_argument("--current-pA", type=bounded(parse_positive, 0, 1e6, "pA"), default=50.0,
                   help="probe current, picoampere")
    s.add_argument("--cross-section-barn", type=bounded(parse_nonnegative, 0, 1e6, "barn"), default=1.0,
                   help="S displacement cross-section")
    s.add_argument("--sample-time-us", type=bounded(parse_positive, *SAMPLE_TIME_US, "us"), default=10.0,
                   help=f"parked-probe sample time, {SAMPLE_TIME_US[0]:g} .. {SAMPLE_TIME_US[1]:g} us")
    s.add_argument("--block-samples", type=bounded(parse_positive_int, 1, MAX_BLOCK_SAMPLES), default=100,
                   help=f"parked-probe samples per message, 1 .. {MAX_BLOCK_SAMPLES}")
    s.add_argument("--distortion-scale", type=bounded(parse_nonnegative, 0, 1e3), default=1.0,
                   help="scale of drift, wobble and jitter (0: none)")
    add_drift_argument(s)
    s.add_argument("--drift-settle-A-per-s", type=bounded(parse_nonnegative, 0, 100, "A/s"), default=0.0,
                   help="extra drift after a field-of-view change, decaying over 30 s (A/s; 0: none)")
    s.add_argument("--coil-settle-us", type=bounded(parse_nonnegative, 0, 1e6, "us"), default=0.0,
                   help="scan-coil time constant on set_probe, us (0: instantaneous)")
    s.add_argument("--coil-overshoot", type=bounded(parse_nonnegative, 0, 0.99), default=0.0,
                   help="scan-coil overshoot, fraction of the move (0: critically damped)")
    s.add_argument("--coil-hysteresis-A", type=bounded(parse_nonnegative, 0, 100, "A"), default=0.0,
                   help="scan-coil hysteresis on set_probe: the probe lands this far short along the move, A "
                        "(0: none)")
    s.add_argument("--compression", "--encoding", dest="encoding", type=frame_compression, choices=("raw", "lz4"),
                   default="raw", help="frame stream compression: none (raw) or lz4")
    s.add_argument("--detector-4d", default=None, metavar="ENDPOINT",
                   help="4D mode: also stream each frame's diffraction patterns (Stream V2) from this endpoint "
                        "(bind; loopback unless you mean otherwise)")
    s.add_argument("--detector-px", type=bounded(parse_positive_int, 8, 256), default=32,
                   help="4D mode: detector pixels per side")
    s.add_argument("--max-park-s", "--max-park", dest="max_park",
                   type=bounded(parse_positive, 0, 3600, "s"), default=10.0,
                   help="blank after this long at one position, s")
    s.add_argument("--duration-s", "--duration", dest="duration",
                   type=parse_positive, default=None, help="stop after this many seconds")
    s.add_argument("--announce", action="store_true", help="print the endpoints as one JSON line and serve")
    add_server_key_arguments(s)
    add_safety_arguments(s)
    s.set_defaults(func=cmd_sim)
