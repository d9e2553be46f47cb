"""What the machine can do: floor operations per frame size, measured in the same run as the stages.

A stage's latency means little alone; beside the cheapest way this machine moves or touches the same data it
says how much is left to gain. For each frame size (a ``uint16`` frame, as the simulated detector sends it):

- ``memcpy``: :func:`numpy.copyto` of the frame into a preallocated array (the floor of ``decode``);
- ``zmq_rtt_tcp``, ``zmq_rtt_ipc``: a 64-byte REQ/REP round trip over pyzmq on loopback TCP and on IPC (the
  floor of one ``bridge`` call);
- ``zmq_frame_tcp``, ``zmq_frame_ipc``: the frame sent by a PUSH socket and received whole by a PULL socket
  in the same thread, zero-copy on send (the floor of ``receive``: both ends' work, none of a second
  process's scheduling);
- ``numba_pass``: a compiled pass that reads every pixel once (the floor of any per-pixel kernel);
- ``gaussian``: :func:`scipy.ndimage.gaussian_filter` (separable, float32 output preallocated) with the
  column sigma of MoS2 at 0.15 A/px, 2.2 px (the floor of ``preprocess``);
- ``peak_local_max``: :func:`skimage.feature.peak_local_max` on the smoothed frame with a minimum distance
  of 4 px (the floor of ``find``).

:data:`FLOOR_OF` maps each frame stage to its floor; :func:`ratios` divides a stage's p50 and p99 by its
floor's p50. Timings are :func:`time.perf_counter_ns` around one call each, after a warm-up, so p50/p99 are
over ``repeats`` calls.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import numpy as np

FLOOR_OF: dict[str, str] = {
    "receive": "zmq_frame_tcp",
    "decode": "memcpy",
    "background": "numba_pass",
    "preprocess": "gaussian",
    "find": "peak_local_max",
    "classify": "numba_pass",
    "vacancies": "numba_pass",
    "ood": "numba_pass",
    "policy": "numba_pass",
    "bridge": "zmq_rtt_tcp",
}
"""Frame stage (latency key) -> the floor operation it is compared with."""

SIGMA_PX = 0.33 / 0.15
"""Column sigma of MoS2 at the benchmark's 0.15 A/px, pixels (:data:`beamloop.edge.materials.MOS2`)."""

REPEATS = {False: 300, True: 60}
"""Timed calls per floor and size: full run (False) and quick run (True)."""


def _time(fn: Callable[[], object], repeats: int, warmup: int = 3) -> dict:
    """p50 / p99 / min of ``repeats`` timed calls of ``fn``, microseconds."""
    for _ in range(warmup):
        fn()
    t = np.empty(repeats, np.int64)
    for i in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        t[i] = time.perf_counter_ns() - t0
    us = t / 1e3
    return {"n": repeats, "p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "min_us": float(us.min())}


def _numba_pass():
    import numba

    @numba.njit(cache=True, nogil=True)
    def touch(a):
        s = 0
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                s += a[i, j]
        return s

    return touch


def _zmq_pairs(kind: str, address: str):
    """A connected (client, server) pair of ``kind`` ("reqrep" or "pushpull") on ``address`` (tcp or ipc)."""
    import zmq

    ctx = zmq.Context.instance()
    a, b = (zmq.REQ, zmq.REP) if kind == "reqrep" else (zmq.PUSH, zmq.PULL)
    server = ctx.socket(b)
    server.linger = 0
    if address.startswith("tcp"):
        port = server.bind_to_random_port("tcp://127.0.0.1")
        address = f"tcp://127.0.0.1:{port}"
    else:
        server.bind(address)
    client = ctx.socket(a)
    client.linger = 0
    client.connect(address)
    return client, server


def measure(shape: tuple[int, int], repeats: int = 300) -> dict:
    """Time every floor operation (module docstring) on one ``uint16`` frame of ``shape``.

    Parameters
    ----------
    shape : (int, int)
        Frame rows and columns, pixels.
    repeats : int
        Timed calls per operation.

    Returns
    -------
    dict
        Operation name -> ``{"n", "p50_us", "p99_us", "min_us"}`` (microseconds).

    Raises
    ------
    ImportError
        scipy, scikit-image, numba or pyzmq is missing.
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max

    rng = np.random.default_rng(0)
    frame = rng.poisson(200, shape).astype(np.uint16)
    dst = np.empty_like(frame)
    smooth = np.empty(shape, np.float32)
    frame_f = frame.astype(np.float32)
    ndimage.gaussian_filter(frame_f, SIGMA_PX, output=smooth)
    touch = _numba_pass()
    out: dict = {}
    out["memcpy"] = _time(lambda: np.copyto(dst, frame), repeats)
    out["numba_pass"] = _time(lambda: touch(frame), repeats)
    out["gaussian"] = _time(lambda: ndimage.gaussian_filter(frame_f, SIGMA_PX, output=smooth), repeats)
    out["peak_local_max"] = _time(lambda: peak_local_max(smooth, min_distance=4), max(10, repeats // 3))
    small = b"x" * 64
    with tempfile.TemporaryDirectory(prefix="beamloop-floor-") as tmp:
        for transport, address in (("tcp", "tcp://127.0.0.1"), ("ipc", f"ipc://{os.path.join(tmp, 'f')}")):
            req, rep = _zmq_pairs("reqrep", address)

            def rtt(req=req, rep=rep):
                req.send(small)
                rep.send(rep.recv())
                req.recv()

            out[f"zmq_rtt_{transport}"] = _time(rtt, repeats)
            req.close()
            rep.close()
            push, pull = _zmq_pairs("pushpull", address + ("2" if transport == "ipc" else ""))

            def one_way(push=push, pull=pull):
                push.send(frame, copy=False)
                pull.recv(copy=False)

            out[f"zmq_frame_{transport}"] = _time(one_way, repeats)
            push.close()
            pull.close()
    return out


def run(quick: bool = False, sizes: tuple[int, ...] = (256, 512, 1024)) -> dict:
    """:func:`measure` for square frames of each size; ``{"method": ..., "sizes": {"256x256": {...}}}``."""
    reps = REPEATS[bool(quick)]
    return {"method": __doc__.split("\n\n")[0], "stage_floor": dict(FLOOR_OF),
            "sizes": {f"{n}x{n}": measure((n, n), reps if n <= 512 else max(20, reps // 3)) for n in sizes}}


def ratios(stages: dict, floor: dict) -> dict:
    """Each stage's p50 and p99 over its floor's p50 (:data:`FLOOR_OF`).

    Parameters
    ----------
    stages : dict
        Stage -> summary with ``p50_us``, ``p99_us`` (one frame size of :func:`beamloop.bench.stages.run`).
    floor : dict
        Operation -> summary with ``p50_us`` (the same size of :func:`run`).

    Returns
    -------
    dict
        Stage -> ``{"floor": name, "floor_p50_us", "p50_ratio", "p99_ratio"}`` for stages with a floor.
    """
    out = {}
    for stage, op in FLOOR_OF.items():
        if stage in stages and op in floor and floor[op]["p50_us"] > 0:
            f = floor[op]["p50_us"]
            out[stage] = {"floor": op, "floor_p50_us": f, "p50_ratio": stages[stage]["p50_us"] / f,
                          "p99_ratio": stages[stage]["p99_us"] / f}
    return out
