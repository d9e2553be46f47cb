"""Wiring: the one place that builds a frame path and an edge service from settings, and warms them up.

The CLI (``beamloop serve``, ``beamloop run``), the benchmarks and the tests all build the service here
(:func:`build_service`), so that they run the same code.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass

import numpy as np

from beamloop.edge.control.client import BridgeClient
from beamloop.edge.frame.latency import LatencyRecorder
from beamloop.edge.path import DEFAULT_MEMORY_BUDGET, FramePath, frame_path
from beamloop.edge.service import LOCK_ON, EdgeService, latency_keys
from beamloop.edge.stages.find import FinderConfig
from beamloop.edge.stages.policy import VacancyLinePolicy
from beamloop.streams.native.receiver import FrameReceiver


@dataclass
class ServiceConfig:
    """Settings of an edge service.

    Attributes
    ----------
    material : {"MoS2", "generic"}
        Material of the frames (classes, physical scale).
    method : {"classical", "unet"}
        Frame path (:data:`beamloop.edge.path.PATHS`).
    targets_per_frame : int or None
        Beam targets per frame chosen by the vacancy-line policy; None: no policy (frames only).
    trigger : str
        Trigger of the dwells (:func:`beamloop.edge.trigger.make_trigger`).
    spacing_px : float or None
        Column spacing in pixels for frames without a pixel size (fixed classical-finder parameters,
        :meth:`~beamloop.edge.stages.find.FinderConfig.for_spacing`).
    precision, device : str
        The U-Net's precision and ONNX Runtime device (``method="unet"``).
    heartbeat_s : float or None
        Heartbeat period towards the scan controller's watchdog, seconds.
    memory_budget_mib : float
        Working memory the frame path may need for one series, MiB
        (:meth:`beamloop.edge.path.FramePath.check_budget`); also the bound on the receive ring that
        :func:`receiver_ring_bytes` gives the service's receiver.
    trigger_at : {"controller", "service"}
        Where dwells' decisions are made: at the scan controller when it offers the trigger's model, else
        (and with ``"service"``) in the service (:meth:`beamloop.edge.service.EdgeService.choose_trigger_at`).
    lock_on : {"none", "predict", "rescan"}
        Drift correction (:data:`beamloop.edge.service.LOCK_ON`): ``predict`` adds the ``register`` stage
        before the policy and places each probe where the drift estimate predicts its target; ``rescan`` also
        re-finds the column in a small subscan there first.
    max_drift_sigma_A : float
        The uncertainty gate of ``predict`` (policy and dwell), A.
    recentre_s : float or None
        With ``rescan``: re-centre long dwells every ``recentre_s`` seconds
        (:meth:`beamloop.edge.service.EdgeService.recentre`); None (default): never.
    recentre_decline : float or None
        With ``rescan``: also re-centre when the parked signal's running mean falls below this fraction of its
        start while the trigger has not fired (a slow walk-off); None (default): only by the period.
    rescan_updates : bool
        With ``rescan``: each re-centring subscan's column updates the drift estimate.
    match_columns : bool
        The register stage refines its shift by matching the columns to the previous frame's
        (:class:`beamloop.edge.stages.register.Register`).
    """

    material: str = "MoS2"
    _: KW_ONLY  # every other setting by name: a field added later cannot shift a caller's arguments
    method: str = "classical"
    targets_per_frame: int | None = None
    trigger: str = "model"
    spacing_px: float | None = None
    precision: str = "fp32"
    device: str = "auto"
    heartbeat_s: float | None = 0.25
    memory_budget_mib: float = DEFAULT_MEMORY_BUDGET / 2**20
    trigger_at: str = "controller"
    lock_on: str = "none"
    max_drift_sigma_A: float = 0.5
    recentre_s: float | None = None
    recentre_decline: float | None = None
    rescan_updates: bool = False
    match_columns: bool = False

    def __post_init__(self) -> None:
        if self.lock_on not in LOCK_ON:
            raise ValueError(f"lock_on must be one of {', '.join(LOCK_ON)}, got {self.lock_on!r}")
        if not (isinstance(self.memory_budget_mib, (int, float)) and math.isfinite(self.memory_budget_mib)
                and self.memory_budget_mib > 0):
            raise ValueError(f"memory_budget_mib must be a positive number, got {self.memory_budget_mib!r}")
        if self.targets_per_frame is not None and not (isinstance(self.targets_per_frame, int)
                                                       and self.targets_per_frame >= 0):
            raise ValueError(f"targets_per_frame must be a whole number >= 0, got {self.targets_per_frame!r}")

    @property
    def memory_budget_bytes(self) -> int:
        """``memory_budget_mib`` in bytes."""
        return int(self.memory_budget_mib * 2**20)


def receiver_ring_bytes(cfg: ServiceConfig) -> int:
    """The ``max_ring_bytes`` of the service's frame receiver: the same budget as the frame path's, so that a
    series too large for one is refused by the other before anything is allocated."""
    return cfg.memory_budget_bytes


def build_path(cfg: ServiceConfig, latency: LatencyRecorder | None = None) -> FramePath:
    """The frame path of ``cfg`` (with its policy when ``targets_per_frame`` is set).

    Raises
    ------
    ValueError
        Unknown method or material, negative targets, a bad spacing.
    beamloop.edge.stages.unet.ModelError
        ``method="unet"`` and the model cannot be loaded on the device.
    """
    policy = (VacancyLinePolicy(cfg.targets_per_frame, max_drift_sigma_A=cfg.max_drift_sigma_A)
              if cfg.targets_per_frame is not None else None)
    unet = None
    if cfg.method == "unet":
        from beamloop.edge.stages.unet import UNetFinder

        unet = UNetFinder(precision=cfg.precision, device=cfg.device)
    config = FinderConfig.for_spacing(cfg.spacing_px) if cfg.spacing_px else None
    register = None
    if cfg.lock_on != "none":
        from beamloop.edge.stages.register import Register

        register = Register(match_columns=cfg.match_columns)
    path = frame_path(cfg.method, cfg.material, policy, config=config, unet=unet, register=register)
    path.latency = latency if latency is not None else LatencyRecorder(latency_keys(path))
    path.memory_budget_bytes = cfg.memory_budget_bytes
    return path


BLAS_THREADS = 1
"""BLAS threads in a process that runs a service."""

_blas_limit = None


def limit_blas_threads(threads: int = BLAS_THREADS) -> None:
    """Run numpy's and scipy's BLAS (OpenBLAS, MKL) on ``threads`` threads in this process, from now on.

    The frame path's small matrix products (the registration's upsampled DFT: a 30 x 64 by 64 x 33 complex
    product) cost ~1 ms on one thread, but ~30 ms when OpenBLAS spreads them over the cores that the simulator,
    the receiver and other jobs also use (its threads spin while they wait for each other). Uses threadpoolctl
    (the scikit-learn developers' library for native thread pools); without it nothing changes.
    """
    global _blas_limit
    try:
        from threadpoolctl import threadpool_limits
    except ModuleNotFoundError:
        return
    if _blas_limit is None:
        _blas_limit = threadpool_limits(limits=int(threads), user_api="blas")


def build_service(receiver: FrameReceiver, cfg: ServiceConfig, bridge: BridgeClient | None = None,
                  latency: LatencyRecorder | None = None) -> EdgeService:
    """An :class:`~beamloop.edge.service.EdgeService` on ``receiver`` (and ``bridge``) with the path of ``cfg``;
    BLAS runs on one thread in this process from now on (:func:`limit_blas_threads`).

    Raises
    ------
    ValueError, beamloop.edge.stages.unet.ModelError
        As :func:`build_path`, or an unknown trigger.
    """
    path = build_path(cfg, latency)
    limit_blas_threads()
    return EdgeService(receiver, path, bridge, trigger=cfg.trigger, latency=path.latency, heartbeat_s=cfg.heartbeat_s,
                       trigger_at=cfg.trigger_at, lock_on=cfg.lock_on, max_drift_sigma_A=cfg.max_drift_sigma_A,
                       recentre_s=cfg.recentre_s, recentre_decline=cfg.recentre_decline,
                       rescan_updates=cfg.rescan_updates)


WARM_UP_DTYPES = (np.uint16, np.float32, np.uint8, np.uint32)
"""Pixel types of the frames streams carry; :func:`warm_up` compiles the kernels for each."""


def warm_up(path: FramePath, trigger=None, *, shape: tuple[int, int] = (96, 96), pixel_size_A: float = 0.15,
            dtypes=WARM_UP_DTYPES) -> None:
    """Compile (or load from numba's cache) every kernel on the hot path before anything is timed.

    Runs ``path`` on a simulated MoS2 frame of ``shape`` in each of ``dtypes`` without recording latency
    and without a scan frame (so no targets and no policy state), and one block through ``trigger``.
    """
    from beamloop.edge.sim.frames import mos2_frame

    counts = mos2_frame(shape=shape, pixel_size_A=pixel_size_A, dose_e_per_A2=1e5, seed=12345).counts
    for dt in dtypes:
        path.run(counts.astype(dt), pixel_size_A, record=False)
    if trigger is not None:
        trigger.start(5.0)
        trigger.update(np.full(64, 5, np.uint16))


def service_counters(service: EdgeService) -> dict[str, int]:
    """The live view's counters of ``service`` (names of :data:`beamloop.edge.monitor.board.COUNTER_NAMES`),
    read from its receiver's, bridge's and own counters now (from the web thread: plain integer reads)."""
    c = service.receiver.counters
    st = service.stats
    out = {"frames_received": c.frames, "rejected": c.rejected + st.rejected, "dropped": c.dropped + c.missing_frames,
           "blank_failures": st.blank_failures}
    if service.bridge is not None:
        b = service.bridge.counters
        out.update(bridge_calls=b.calls, bridge_errors=b.errors + b.timeouts,
                   refused_positions=b.rejected_before_send)
    return out


def start_monitor(service: EdgeService, http: tuple[str, int], *, keys=None, on_stop=None, images=None,
                  min_interval_s: float = 0.2):
    """Publish ``service``'s frames and dwells on a :class:`~beamloop.edge.monitor.board.MonitorBoard` and serve
    the live view and ``/metrics`` on ``http`` (:class:`~beamloop.edge.monitor.web.MonitorServer`, started).

    The service's ``interrupt`` is extended so that the page's stop button stops it like Ctrl-C (it blanks the
    beam on its way out); the server also blanks at once on a bridge connection of its own, with ``keys``.

    Parameters
    ----------
    service : EdgeService
    http : (host, port)
        Where to serve (:func:`beamloop.edge.monitor.auth.parse_http`); port 0 picks a free one.
    keys : ClientKeys, optional
        The bridge client's CURVE keys: the server's bridge connection uses them, and the view's bearer token
        is derived from their secret key (:func:`beamloop.edge.monitor.auth.token_from_secret`), required when
        ``host`` is beyond loopback.
    on_stop : callable(), optional
        Also called when the stop button is pressed (e.g. to mark the command's own stop request).
    images : callable() -> dict, optional
        Live images to show (4D-STEM virtual images and CoM).
    min_interval_s : float
        Shortest time between two frames copied for the view, seconds.

    Returns
    -------
    MonitorServer
        Serving; ``.url`` is the page, ``.board`` the board; call ``.stop()`` at the end.

    Raises
    ------
    beamloop.edge.monitor.auth.MonitorAuthError
        ``host`` beyond loopback without ``keys``.
    ImportError
        The ``web`` extra (aiohttp, prometheus-client) is not installed (the message says so).
    OSError
        The address cannot be bound.
    """
    from beamloop.edge.monitor.auth import is_loopback, token_from_secret
    from beamloop.edge.monitor.board import MonitorBoard
    from beamloop.edge.monitor.web import ControllerLink, MonitorServer

    for module in ("aiohttp", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            raise ImportError(f"--http needs {module}: pip install 'beamloop[web]'") from None
    host, port = http
    token = token_from_secret(keys.secret) if keys is not None else None
    board = MonitorBoard(min_interval_s=min_interval_s, latency=service.latency,
                         counters=lambda: service_counters(service), images=images)
    link = ControllerLink(service.bridge.endpoint, keys) if service.bridge is not None else None
    server = MonitorServer(board, host, port, token=None if is_loopback(host) else token, link=link,
                           on_stop=on_stop)
    server.start()
    previous = service.interrupt
    service.interrupt = lambda: (previous() if previous is not None else 0) or board.interrupt()
    service.monitor = board
    return server
