"""Point spectra on the Nion adapter, against nionswift-usim's EELS camera.

Each test runs the simulator in a child process: nionswift-usim registers its devices once per process, and other
test modules (tests/test_nion.py, tests/test_stage.py) start and stop their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from beamloop.edge.control.nion import nion_available

pytestmark = pytest.mark.skipif(not nion_available(), reason=(
    "nionswift-instrumentation / nionswift-usim not installed: pip install -e '.[nion]'"))

SCRIPT = textwrap.dedent("""
    import json, threading, time
    import numpy as np
    from beamloop.edge.control.client import BridgeClient
    from beamloop.edge.control.nion import USIM_EELS_ID, NionScanController, start_usim, stop_usim
    from beamloop.edge.control.protocol import BridgeError
    from beamloop.edge.control.safety import SafetyLimits

    scan = start_usim()
    out = {}
    for camera in (None, USIM_EELS_ID):
        ctl = NionScanController(scan, limits=SafetyLimits(watchdog_s=None, max_pixel_dwell_us=1e5),
                                 eels_camera=camera)
        stop = threading.Event()
        th = threading.Thread(target=ctl.serve, kwargs={"stop": stop.is_set}, daemon=True)
        th.start()
        with BridgeClient(ctl.control_endpoint, timeout_ms=30000) as c:
            key = "eels" if camera else "none"
            out[key] = {"caps": c.get_capabilities()["point_detectors"]}
            frame = c.acquire_frame((32, 32), (4.0, 4.0), 2.0)
            try:
                got = c.measure_points([[0.25, 0.25], [0.75, 0.5]], 2000.0, frame.frame_id, ("eels",))
                out[key]["shape"] = list(got.signals["eels"].shape)
                out[key]["dtype"] = str(got.signals["eels"].dtype)
                out[key]["sums"] = got.signals["eels"].sum(axis=1).tolist()
                out[key]["mean_counts"] = got.mean_counts.tolist()
            except BridgeError as exc:
                out[key]["error"] = [exc.code, exc.message]
            out[key]["blanked"] = c.get_state()["blanked"]
        stop.set()
        th.join()
        ctl.close()
    stop_usim()
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def nion_points():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"the usim child failed (status {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_without_a_camera_eels_is_refused_as_not_fitted(nion_points):
    r = nion_points["none"]
    assert r["caps"] == {"adf": {"channel": "haadf"}}
    assert r["error"][0] == "out_of_range" and "detector eels is not fitted" in r["error"][1]
    assert r["blanked"] is True


def test_with_the_usim_camera_a_point_queue_returns_calibrated_spectra(nion_points):
    r = nion_points["eels"]
    cal = r["caps"]["eels"]
    assert cal["units"] == "eV" and cal["dispersion_eV"] > 0 and cal["channels"] > 8 and cal["dtype"] == "<f4"
    assert r["shape"] == [2, cal["channels"]] and r["dtype"] == "float32"
    assert all(s > 0 for s in r["sums"]) and len(r["mean_counts"]) == 2
    assert r["blanked"] is True
