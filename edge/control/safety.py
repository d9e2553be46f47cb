"""Beam safety on the scan controller's side of the control bridge.

A service that moves an electron beam must never put it where nobody asked, nor leave it on a spot
when the service is gone. :class:`BeamSafety` sits in :class:`beamloop.edge.control.server.BridgeServer` between the
wire and the controller's handlers and enforces, whatever the client did or did not check:

=====================  ==================================================================================
position               every ``set_probe`` / ``queue_points`` position is a pair of finite numbers in
                       [0, 1] (:func:`beamloop.edge.frame.scanframe.check_fraction`) and names the current
                       frame, the one the last successful ``acquire_frame`` returned (``out_of_range``,
                       ``stale_frame``)
dwell per point        ``queue_points``' ``dwell_us`` at most ``max_point_dwell_s``; a beam parked
                       unblanked at one position is blanked once it has stayed that long (``out_of_range``)
dose per point         electrons per point ``I t / e`` at most ``max_point_electrons`` (needs the probe
                       current); lowers the parked-beam time limit to match (``out_of_range``)
pixel dwell            ``acquire_frame``'s ``dwell_us`` at most ``max_pixel_dwell_us`` (``out_of_range``)
rate                   at most ``max_commands_per_s`` requests per second, ``command_burst`` at once, per
                       client id (token buckets; requests without an id share one); the rest are refused
                       unapplied (``rate_limited``)
sequence numbers       a request is applied at most once: a retry carrying the same client id, ``seq``
                       and bytes gets the first reply again without running the call; the same ``seq``
                       with other bytes is refused (``bad_request``), an older ``seq`` from that client
                       too (``stale_seq``); ``get_state`` and the other read-only calls
                       (:data:`UNCACHED_CALLS`) always run
trigger                ``arm_trigger`` names a model the controller offers (by name or hash), an integer
                       threshold, a known rearm policy and a positive finite expected rate
                       (:meth:`BeamSafety.check_arm_trigger`; ``out_of_range``, ``bad_request``); it is
                       not a beam call: it never unblanks, nor makes its sender the beam's owner
safer calls            a call that makes the beam safer (:func:`~beamloop.edge.control.protocol.makes_safer`:
                       blank on, ``abort_points``, ``stop``) passes every rule above unrefused
watchdog               while the beam is on (unblanked, or running a point queue), the client that last
                       turned it on or moved it must be heard from (any request admitted past the rate
                       limit and the sequence numbers; ``heartbeat`` when idle) every ``watchdog_s``; when
                       it falls silent the beam is blanked, or parked at ``safe_position``
                       (``on_watchdog="park"``). A blanked beam needs no watching, so a service busy
                       between dwells does not trip it
=====================  ==================================================================================

The beam's state (blanked or not, where the probe is, whether a point queue runs) comes from the scan
controller, which reports every change it makes (:meth:`BeamSafety.beam_changed`), including changes by a
handler that then failed; a guard without a controller (``beam_from_replies=True``) learns it from the
replies instead. A blank that fails is tried again at every :meth:`BeamSafety.poll`.

Every refusal and every action is counted (:class:`SafetyCounters`), and reported by ``get_state`` of
controllers that include :meth:`BeamSafety.state`. The guard is not thread-safe: its owner (the server, or
the controller and its watchdog timer) serialises the calls.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from beamloop.edge.control.protocol import (
    MAX_EXPECTED_RATE,
    REARM_POLICIES,
    STAGE_BUSY_CALLS,
    BridgeError,
    StageLimits,
    makes_safer,
    parse_move_stage,
    short_repr,
)
from beamloop.edge.frame.scanframe import BeamPositionError, ScanFrame, check_fraction
from beamloop.edge.physics import electrons_per_second


@dataclass(frozen=True)
class SafetyLimits:
    """What the scan controller's side accepts.

    Attributes
    ----------
    max_point_dwell_s : float
        Longest time the beam may stay unblanked at one probe position, seconds (parked or queued).
    max_point_electrons : float or None
        Most electrons one probe position may receive; needs ``current_pA``. None: no dose limit.
    current_pA : float or None
        Probe current in picoampere, for the dose limit (electrons per second = I / e,
        :func:`beamloop.edge.physics.electrons_per_second`).
    max_pixel_dwell_us : float
        Longest pixel dwell time of a scanned frame, microseconds.
    max_commands_per_s, command_burst : float, int
        Token bucket of requests: refilled at ``max_commands_per_s``, holding at most ``command_burst``.
    watchdog_s : float or None
        Silence after which the watchdog acts, seconds; None disables it.
    on_watchdog : {"blank", "park"}
        What the watchdog does: blank the beam, or park the probe at ``safe_position``.
    safe_position : (x, y)
        Fractions of the current frame where ``park`` puts the probe (e.g. a hole in the specimen).
    max_clients : int
        Clients whose last sequence number and reply are remembered (least recently heard forgotten).

    Raises
    ------
    ValueError
        A limit that is not a positive finite number, a dose limit without a current, an unknown
        ``on_watchdog``, or a safe position outside [0, 1].
    """

    max_point_dwell_s: float = 10.0
    max_point_electrons: float | None = None
    current_pA: float | None = None
    max_pixel_dwell_us: float = 1000.0
    max_commands_per_s: float = 2000.0
    command_burst: int = 200
    watchdog_s: float | None = 1.0
    on_watchdog: str = "blank"
    safe_position: tuple[float, float] = (0.0, 0.0)
    max_clients: int = 64

    def __post_init__(self) -> None:
        positive = {"max_point_dwell_s": self.max_point_dwell_s, "max_pixel_dwell_us": self.max_pixel_dwell_us,
                    "max_commands_per_s": self.max_commands_per_s, "command_burst": self.command_burst,
                    "max_clients": self.max_clients}
        for opt in ("max_point_electrons", "current_pA", "watchdog_s"):
            if getattr(self, opt) is not None:
                positive[opt] = getattr(self, opt)
        for name, v in positive.items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"safety limit {name}={v!r} must be a positive finite number")
        if self.max_point_electrons is not None and self.current_pA is None:
            raise ValueError("a dose limit (max_point_electrons) needs the probe current (current_pA)")
        if self.on_watchdog not in ("blank", "park"):
            raise ValueError(f"on_watchdog={self.on_watchdog!r}; expected 'blank' or 'park'")
        check_fraction(*self.safe_position)

    @property
    def electrons_per_s(self) -> float | None:
        """Probe electrons per second (``current_pA`` / e), None without a current."""
        return None if self.current_pA is None else electrons_per_second(self.current_pA)

    @property
    def point_time_limit_s(self) -> float:
        """Longest unblanked time at one position allowed by both the dwell and the dose limit, seconds."""
        t = self.max_point_dwell_s
        eps = self.electrons_per_s
        if self.max_point_electrons is not None and eps is not None:
            t = min(t, self.max_point_electrons / eps)
        return t


@dataclass
class SafetyCounters:
    """Requests refused and actions taken by :class:`BeamSafety` (and its controller).

    ``reused_seq`` counts requests refused for a sequence number reused with other bytes; ``safer_calls``
    the calls admitted because they make the beam safer; ``error_blanks`` the blanks after a handler failed
    with the beam changed; ``blank_failures`` the blanks the hardware refused (tried again);
    ``backstop_trips`` the watchdog's actions by the controller's timer thread while its serve loop was held
    up; ``refused_trigger`` the ``arm_trigger`` requests refused for their arguments; ``refused_stage`` the
    ``move_stage`` requests refused for their target; ``refused_stage_moving`` the requests refused as
    ``busy`` because the stage was still moving or settling."""

    refused_position: int = 0
    refused_stale_frame: int = 0
    refused_dwell: int = 0
    refused_dose: int = 0
    rate_limited: int = 0
    duplicates: int = 0
    stale_seq: int = 0
    reused_seq: int = 0
    safer_calls: int = 0
    watchdog_trips: int = 0
    dwell_limit_blanks: int = 0
    error_blanks: int = 0
    blank_failures: int = 0
    backstop_trips: int = 0
    heartbeats: int = 0
    refused_trigger: int = 0
    refused_stage: int = 0
    refused_stage_moving: int = 0


class RateLimiter:
    """Token bucket: ``rate`` tokens per second, at most ``burst`` held; one request costs one token.

    ``clock`` returns seconds (default :func:`time.monotonic`).
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._t = clock()

    def allow(self) -> bool:
        """Take a token if there is one; return whether the request may go on."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now
        if self._tokens >= 1.0 - 1e-9:  # tolerate rounding of the elapsed time
            self._tokens -= 1.0
            return True
        return False


class ClientRates:
    """One :class:`RateLimiter` per client id (requests without an id share the bucket of ``None``).

    Remembers ``max_clients`` buckets, the least recently used forgotten first (a forgotten client starts
    again with a full bucket).
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 64) -> None:
        self.rate, self.burst, self._clock, self.max_clients = float(rate), int(burst), clock, int(max_clients)
        self._buckets: OrderedDict[str | None, RateLimiter] = OrderedDict()

    def allow(self, client: str | None) -> bool:
        """Take a token from ``client``'s bucket if it has one; return whether the request may go on."""
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = RateLimiter(self.rate, self.burst, self._clock)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        return bucket.allow()

    def bucket(self, client: str | None) -> RateLimiter | None:
        """The bucket of ``client``, None when it has none (yet)."""
        return self._buckets.get(client)


class SequenceTracker:
    """Last sequence number, request digest and reply per client, so that a retried request is applied once.

    Remembers ``max_clients`` clients (least recently heard forgotten first); requests without a
    client id are not tracked.
    """

    def __init__(self, max_clients: int = 64) -> None:
        self.max_clients = int(max_clients)
        self._last: OrderedDict[str, tuple[int, bytes, bytes]] = OrderedDict()

    def replay(self, client: str | None, seq: int, digest: bytes = b"") -> bytes | None:
        """The reply already sent for ``(client, seq)`` with this request ``digest``, or None for a new request.

        Raises
        ------
        BridgeError
            ``stale_seq``: ``seq`` is older than the last one applied for this client; ``bad_request``:
            ``seq`` is the last one, but the request's bytes differ (a sequence number reused for another
            request, which must not get the other's reply).
        """
        if client is None or client not in self._last:
            return None
        last_seq, last_digest, reply = self._last[client]
        self._last.move_to_end(client)
        if seq == last_seq:
            if digest != last_digest:
                raise BridgeError("bad_request", f"request {seq} of client {client} reuses the sequence number of "
                                                 "a different request; not applied")
            return reply
        if seq < last_seq:
            raise BridgeError("stale_seq", f"request {seq} of client {client} is older than request {last_seq}, "
                                           "already applied")
        return None

    def remember(self, client: str | None, seq: int, reply: bytes, digest: bytes = b"") -> None:
        """Keep the reply to ``(client, seq)`` and the digest of its request."""
        if client is None or seq < 0:
            return
        if client in self._last and self._last[client][0] > seq:
            return  # never step back (a safer call may carry an old number)
        self._last[client] = (seq, digest, reply)
        self._last.move_to_end(client)
        while len(self._last) > self.max_clients:
            self._last.popitem(last=False)


UNCACHED_CALLS = ("get_state", "get_capabilities", "fetch_points", "heartbeat", "get_trigger_state", "get_stage")
"""Read-only calls: they always run (never answered from the reply cache) and leave sequence numbers alone."""

BEAM_ON_CALLS = ("set_probe", "blank", "queue_points")
"""Calls whose sender becomes the beam's owner, the client the watchdog listens to (``blank`` only with
``on: false``)."""


THRESHOLD_RANGE = (-(1 << 31), (1 << 31) - 1)
"""Thresholds ``arm_trigger`` accepts: a signed 32-bit integer score (the logic's threshold register)."""

ARM_TRIGGER_ARGS = ("model", "threshold", "rearm", "expected_rate")
"""The arguments of ``arm_trigger``; any other is refused."""


@dataclass(frozen=True)
class TriggerRequest:
    """A checked ``arm_trigger`` request (:meth:`BeamSafety.check_arm_trigger`).

    Attributes
    ----------
    model : str
        The model's name (a hash given on the wire is resolved to it).
    threshold : int or None
        Integer score threshold; None: the model's calibrated one.
    rearm : str
        One of :data:`beamloop.edge.control.protocol.REARM_POLICIES`.
    expected_rate : float or None
        Counts per sample of the intact column, for the dwell's prefill; None: none.
    """

    model: str
    threshold: int | None
    rearm: str
    expected_rate: float | None


@dataclass
class _Beam:
    """What the guard knows of the beam (from the controller, or from replies)."""

    blanked: bool = True
    position: tuple[float, float] | None = None
    on_since: float | None = None  # unblanked at ``position`` since (clock seconds); None: not timed here
    queue: bool = False  # a point queue runs (each point timed by its checked dwell)


def fraction_pair(x: Any, y: Any) -> tuple[float, float]:
    """:func:`~beamloop.edge.frame.scanframe.check_fraction` for any input: also an integer too large for a
    float (``10**400``) or a bool is ``out_of_range``, never an ``OverflowError``.

    Raises
    ------
    BeamPositionError
        (``out_of_range``) not two real numbers, not finite, or outside [0, 1].
    """
    tx, ty = type(x), type(y)
    if tx is float and ty is float:  # the common case, checked once below
        return check_fraction(x, y)
    if not (isinstance(x, (int, float)) and isinstance(y, (int, float))) or isinstance(x, bool) or isinstance(y, bool):
        raise BeamPositionError("out_of_range", f"beam position ({short_repr(x)}, {short_repr(y)}) is not a pair of "
                                                "numbers")
    if (isinstance(x, int) and not -1 <= x <= 2) or (isinstance(y, int) and not -1 <= y <= 2):
        raise BeamPositionError("out_of_range", f"beam position ({short_repr(x, 24)}, {short_repr(y, 24)}) lies "
                                                "outside the scan frame [0, 1]")
    return check_fraction(x, y)


class BeamSafety:
    """The rules of the module docstring, for one scan controller.

    Parameters
    ----------
    limits : SafetyLimits
    blank : callable(reason: str), optional
        Blanks the beam at once (called by the watchdog and the dwell limit); without it neither can act.
        May raise: the failure is counted and the blank tried again at the next :meth:`poll`.
    park : callable(x, y), optional
        Parks the probe at fractions of the current frame (``on_watchdog="park"``); falls back to
        ``blank`` when absent or when no frame is current.
    clock : callable, optional
        Seconds, monotonic (default :func:`time.monotonic`); tests pass their own.
    beam_from_replies : bool
        Learn the beam's state from the replies of the calls (a guard in front of plain handlers); False
        for a controller that reports it (:meth:`beam_changed`).

    Attributes
    ----------
    frame : ScanFrame or None
        The current frame, from the last successful ``acquire_frame`` reply.
    counters : SafetyCounters
    rates : ClientRates
    sequences : SequenceTracker
    owner : str or None
        The client the watchdog listens to.
    trigger_models : dict
        The controller's trigger models, name -> ``{"hash", ...}``, for :meth:`check_arm_trigger` (set by the
        controller; empty: ``arm_trigger`` is not checked here, as the controller does not serve it).
    stage_limits : StageLimits or None
        The specimen stage's travel range, for ``move_stage`` (set by a controller with a stage; None: the call
        is not checked here, as it is not served).
    stage_settled_at : float
        Clock time the stage will have settled after its last move, seconds (:meth:`stage_moving`): until
        then :data:`~beamloop.edge.control.protocol.STAGE_BUSY_CALLS` and ``blank`` with ``on: false`` are
        refused as ``busy``, so the beam stays blanked while the stage moves.
    """

    def __init__(self, limits: SafetyLimits | None = None, *, blank: Callable[[str], None] | None = None,
                 park: Callable[[float, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, beam_from_replies: bool = True) -> None:
        self.limits = limits or SafetyLimits()
        self._blank = blank
        self._park = park
        self._clock = clock
        self.beam_from_replies = beam_from_replies
        self.rates = ClientRates(self.limits.max_commands_per_s, self.limits.command_burst, clock,
                                 self.limits.max_clients)
        self.sequences = SequenceTracker(self.limits.max_clients)
        self.counters = SafetyCounters()
        self.frame: ScanFrame | None = None
        self.beam = _Beam()
        self.owner: str | None = None
        self._armed = False
        self._last_heard = clock()
        self._blank_pending = ""
        self.last_action = ""
        self.trigger_models: dict[str, dict] = {}
        self.stage_limits: StageLimits | None = None
        self.stage_settled_at = -math.inf

    @property
    def clock(self) -> Callable[[], float]:
        """The guard's clock (seconds)."""
        return self._clock

    @property
    def armed(self) -> bool:
        """Whether the watchdog is watching (the beam is on, or a point queue runs)."""
        return self._armed

    @property
    def last_heard(self) -> float:
        """Clock time the owner was last heard from, seconds."""
        return self._last_heard

    # before a call --------------------------------------------------------------------------------
    def admit(self, client: str | None, seq: int, call: str, args: dict, digest: bytes = b"",
              safer: bool | None = None) -> bytes | None:
        """Check a decoded request before its handler runs.

        Returns the earlier reply when this is a retry of a request already applied (the caller sends
        it again and runs nothing), else None.

        Parameters
        ----------
        client : str or None
        seq : int
        call : str
        args : dict
        digest : bytes
            Digest of the request's bytes (:attr:`beamloop.edge.control.protocol.Request.digest`).
        safer : bool, optional
            Whether the call makes the beam safer (default: :func:`~beamloop.edge.control.protocol.makes_safer`);
            such a call is admitted whatever its rate or sequence number.

        Raises
        ------
        BridgeError
            ``stale_seq``, ``bad_request`` (a reused sequence number, missing position fields),
            ``rate_limited``, ``out_of_range`` (position, dwell or dose), ``stale_frame``; the request
            must not be applied.
        """
        if safer if safer is not None else makes_safer(call, args):
            self.counters.safer_calls += 1
            self._heard(client)
            return None
        if call not in UNCACHED_CALLS:
            try:
                cached = self.sequences.replay(client, seq, digest)
            except BridgeError as exc:
                if exc.code == "stale_seq":
                    self.counters.stale_seq += 1
                else:
                    self.counters.reused_seq += 1
                raise
            if cached is not None:
                self.counters.duplicates += 1
                self._heard(client)
                return cached
        if not self.rates.allow(client):
            self.counters.rate_limited += 1  # refused: not heard, so a flood cannot feed the watchdog
            raise BridgeError("rate_limited", f"more than {self.limits.max_commands_per_s:g} requests per second "
                                              f"(burst {self.limits.command_burst}) from client {client}; {call} "
                                              "not applied", call)
        self._heard(client)
        if self.stage_moving() and (call in STAGE_BUSY_CALLS or (call == "blank" and args.get("on") is False)):
            self.counters.refused_stage_moving += 1
            left = self.stage_settled_at - self._clock()
            raise BridgeError("busy", f"the stage is moving or settling for {left:.3g} s more; {call} not applied "
                                      "(the beam stays blanked)", call)
        if call == "move_stage" and self.stage_limits is not None:
            try:
                parse_move_stage(args, self.stage_limits)
            except BridgeError:
                self.counters.refused_stage += 1
                raise
        if call == "set_probe":
            self.check_position(args.get("x"), args.get("y"), args.get("frame_id"), call)
        elif call == "queue_points":
            self._check_queue(args)
        elif call == "acquire_frame":
            self._check_pixel_dwell(args)
        elif call == "heartbeat":
            self.counters.heartbeats += 1
        elif call == "arm_trigger" and self.trigger_models:  # without models the call is not served at all
            self.check_arm_trigger(args)
        if call in BEAM_ON_CALLS and not (call == "blank" and args.get("on") is not False):
            self._take_owner(client)
        return None

    def stage_moving(self) -> bool:
        """Whether the stage is still moving or settling (the clock is before :attr:`stage_settled_at`)."""
        return self._clock() < self.stage_settled_at

    def stage_moved(self, duration_s: float) -> None:
        """The controller started a stage move taking ``duration_s`` seconds (travel plus settle): the current
        frame ends (positions on it are refused as stale) and the beam-on calls wait until it has settled."""
        self.stage_settled_at = self._clock() + max(float(duration_s), 0.0)
        self.frame = None

    def _heard(self, client: str | None) -> None:
        if client == self.owner:
            self._last_heard = self._clock()

    def _take_owner(self, client: str | None) -> None:
        self.owner, self._last_heard = client, self._clock()

    def check_position(self, x, y, frame_id, call: str = "set_probe") -> tuple[float, float]:
        """Validate one position: finite fractions in [0, 1] of the current frame. Returns ``(x, y)``.

        Raises
        ------
        BridgeError
            ``out_of_range`` (not numbers, not finite, outside the frame) or ``stale_frame``.
        """
        try:
            fx, fy = fraction_pair(x, y)
        except BeamPositionError as exc:
            self.counters.refused_position += 1
            raise BridgeError(exc.code, str(exc), call) from None
        if self.frame is None or isinstance(frame_id, bool) or frame_id != self.frame.frame_id:
            self.counters.refused_stale_frame += 1
            cur = None if self.frame is None else self.frame.frame_id
            raise BridgeError("stale_frame", f"position refers to frame {short_repr(frame_id, 24)}, the current "
                                             f"frame is {cur}", call)
        return fx, fy

    def check_arm_trigger(self, args: dict) -> TriggerRequest:
        """Check the arguments of ``arm_trigger`` against the models of :attr:`trigger_models` (the
        controller's, name -> ``{"hash", ...}``).

        Parameters
        ----------
        args : dict
            ``model`` (a name, or its 64-hex-digit hash), optional ``threshold`` (integer in
            :data:`THRESHOLD_RANGE`), ``rearm`` (default ``"dwell"``), ``expected_rate`` (counts per sample,
            finite, in ``(0, MAX_EXPECTED_RATE]``).

        Returns
        -------
        TriggerRequest

        Raises
        ------
        BridgeError
            One line, counted in ``refused_trigger``: ``bad_request`` (an unknown argument, a value of the
            wrong type), ``out_of_range`` (an unknown model or hash, a threshold or rate outside its range,
            an unknown rearm policy).
        """
        try:
            return self._arm_args(args)
        except BridgeError:
            self.counters.refused_trigger += 1
            raise

    def _arm_args(self, args: dict) -> TriggerRequest:
        call = "arm_trigger"
        extra = sorted(str(k) for k in args if k not in ARM_TRIGGER_ARGS)
        if extra:
            raise BridgeError("bad_request", f"unknown arguments {short_repr(extra, 60)}; arm_trigger takes "
                                             f"{', '.join(ARM_TRIGGER_ARGS)}", call)
        ref = args.get("model")
        if not isinstance(ref, str) or not 0 < len(ref) <= 64:
            raise BridgeError("bad_request", f"model {short_repr(ref, 40)} is not a model name or hash", call)
        name = ref if ref in self.trigger_models else next(
            (n for n, m in self.trigger_models.items() if m.get("hash") == ref.lower()), None)
        if name is None:
            raise BridgeError("out_of_range", f"no trigger model {short_repr(ref, 70)} at this controller (offered: "
                                              f"{', '.join(sorted(self.trigger_models)) or 'none'})", call)
        thr = args.get("threshold")
        if thr is not None:
            lo, hi = THRESHOLD_RANGE
            if isinstance(thr, bool) or not isinstance(thr, int):
                raise BridgeError("bad_request", f"threshold {short_repr(thr, 24)} is not an integer score", call)
            if not lo <= thr <= hi:
                raise BridgeError("out_of_range", f"threshold {short_repr(thr, 24)} is outside the 32-bit score "
                                                  "range", call)
        rearm = args.get("rearm", "dwell")
        if rearm not in REARM_POLICIES:
            raise BridgeError("out_of_range", f"rearm {short_repr(rearm, 24)}; expected one of "
                                              f"{', '.join(REARM_POLICIES)}", call)
        rate = args.get("expected_rate")
        if rate is not None:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)):
                raise BridgeError("bad_request", f"expected_rate {short_repr(rate, 24)} is not a number", call)
            try:
                rate = float(rate)
            except OverflowError:  # an integer too large for a float
                rate = math.inf
            if not (math.isfinite(rate) and 0 < rate <= MAX_EXPECTED_RATE):
                raise BridgeError("out_of_range", f"expected_rate {short_repr(args.get('expected_rate'), 24)} is "
                                                  f"outside (0, {MAX_EXPECTED_RATE:g}] counts per sample", call)
        return TriggerRequest(name, thr, str(rearm), rate)

    def _check_queue(self, args: dict) -> None:
        pts, dwell_us = args.get("points"), args.get("dwell_us")
        if not isinstance(pts, list) or not pts or not all(isinstance(p, list) and len(p) == 2 for p in pts):
            raise BridgeError("bad_request", "queue_points needs points [[x, y], ...]", "queue_points")
        for x, y in pts:
            self.check_position(x, y, args.get("frame_id"), "queue_points")
        if isinstance(dwell_us, bool) or not isinstance(dwell_us, (int, float)) or not (
                math.isfinite(dwell_us) and dwell_us > 0):
            self.counters.refused_dwell += 1
            raise BridgeError("out_of_range", f"dwell {short_repr(dwell_us, 24)} us is not a positive number",
                              "queue_points")
        self.check_point_dwell(float(dwell_us))

    def check_point_dwell(self, dwell_us: float, call: str = "queue_points") -> None:
        """Check the dwell of a queued point against the dwell and dose limits (controllers call it again
        with the dwell they will really apply, e.g. rounded to whole samples).

        Raises
        ------
        BridgeError
            (``out_of_range``) too long, or too many electrons.
        """
        lim = self.limits
        if dwell_us * 1e-6 > lim.max_point_dwell_s:
            self.counters.refused_dwell += 1
            raise BridgeError("out_of_range", f"dwell {dwell_us:g} us per point exceeds the limit "
                                              f"{lim.max_point_dwell_s * 1e6:g} us", call)
        eps = lim.electrons_per_s
        if lim.max_point_electrons is not None and eps is not None:
            electrons = eps * dwell_us * 1e-6
            if electrons > lim.max_point_electrons:
                self.counters.refused_dose += 1
                raise BridgeError("out_of_range", f"dose {electrons:.4g} electrons per point ({dwell_us:g} us at "
                                                  f"{lim.current_pA:g} pA) exceeds the limit "
                                                  f"{lim.max_point_electrons:.4g}", call)

    def _check_pixel_dwell(self, args: dict) -> None:
        if "dwell_us" not in args:
            return  # the controller's default dwell
        d = args["dwell_us"]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and d > 0):
            # not left to the controller: text such as "1e9" would pass many a float() in a handler
            self.counters.refused_dwell += 1
            raise BridgeError("out_of_range", f"pixel dwell {short_repr(d, 24)} us is not a positive number",
                              "acquire_frame")
        if d > self.limits.max_pixel_dwell_us:
            self.counters.refused_dwell += 1
            raise BridgeError("out_of_range", f"pixel dwell {d:g} us exceeds the limit "
                                              f"{self.limits.max_pixel_dwell_us:g} us", "acquire_frame")

    # after a call -----------------------------------------------------------------------------------
    def applied(self, client: str | None, call: str, args: dict, result: dict) -> None:
        """Learn from a call the controller applied: the current frame and, with ``beam_from_replies``, the
        beam's state."""
        if call == "acquire_frame":
            try:
                self.frame = ScanFrame.from_dict(result["scan"])
            except (KeyError, TypeError, ValueError, OverflowError):
                self.frame = None  # positions are refused until a frame is known
        if not self.beam_from_replies:
            return
        if call in BEAM_ON_CALLS and not (call == "blank" and args.get("on") is not False):
            self._take_owner(client)
        if call == "acquire_frame":
            self.beam.position, self.beam.on_since = None, None
        elif call == "set_probe":
            self.beam.position = (float(args["x"]), float(args["y"]))
            self.beam.on_since = None
        elif call == "queue_points":
            self.beam.position, self.beam.on_since = None, None
        blanked = result.get("blanked") if isinstance(result, dict) else None
        if isinstance(blanked, bool):
            if blanked:
                self.beam.queue = False  # blanking ends a point queue
            self._set_beam(blanked, self.beam.position, moved=False)
        if call == "queue_points":
            self.beam.queue = True
            self._armed = True  # the controller runs the points with the beam on

    def beam_changed(self, blanked: bool, position: tuple[float, float] | None = None, *, queue: bool = False,
                     moved: bool = False) -> None:
        """The controller's report of the beam after it told the hardware something (or was about to).

        Parameters
        ----------
        blanked : bool
            The blanker (a controller that asks to unblank reports False before asking).
        position : (x, y) or None
            Where the probe is parked, fractions of the current frame; None: not parked (scanning).
        queue : bool
            A point queue runs (its points are timed by their checked dwell, not by the parked-beam limit).
        moved : bool
            The probe moved: a new point starts (its parked time counts from now).
        """
        self.beam.queue = queue
        if moved or position != self.beam.position:
            self.beam.on_since = None
        self.beam.position = position
        self._set_beam(blanked, position, moved=moved)
        if queue:
            self.beam.on_since = None
            self._armed = True
        if blanked:
            self._blank_pending = ""

    def _set_beam(self, blanked: bool, position, moved: bool) -> None:
        b = self.beam
        if blanked:
            b.on_since = None
        elif position is not None and not b.queue and (b.blanked or b.on_since is None):
            b.on_since = self._clock()
        b.blanked = blanked
        self._armed = (not blanked) or b.queue

    def remember(self, client: str | None, seq: int, reply: bytes, digest: bytes = b"") -> None:
        """Keep the reply sent for ``(client, seq)`` (and its request's ``digest``) for a retry."""
        self.sequences.remember(client, seq, reply, digest)

    # between calls --------------------------------------------------------------------------------
    def overdue(self, grace_s: float = 0.0) -> bool:
        """Whether the watchdog should have acted more than ``grace_s`` ago (for a backstop timer)."""
        w = self.limits.watchdog_s
        return w is not None and self._armed and self._clock() - self._last_heard > w + grace_s

    def poll(self) -> str:
        """Run the watchdog and the parked-beam time limit, and retry a blank that failed; call often (every
        server loop, and from the controller's watchdog timer).

        Returns the action taken (``"watchdog: blank"``, ``"watchdog: park"``, ``"dwell_limit: blank"``,
        ``"...: blank failed"``) or an empty string.
        """
        if self._blank_pending:
            return self._act(self._blank_pending, park=False)
        now = self._clock()
        lim = self.limits
        if lim.watchdog_s is not None and self._armed and now - self._last_heard > lim.watchdog_s:
            self._armed = False
            action = self._act("watchdog", park=lim.on_watchdog == "park")
            self.counters.watchdog_trips += 1  # counted once the action is done (others may be watching)
            return action
        b = self.beam
        if b.on_since is not None and not b.blanked and now - b.on_since > lim.point_time_limit_s:
            action = self._act("dwell_limit", park=False)
            self.counters.dwell_limit_blanks += 1
            return action
        return ""

    def blank_now(self, reason: str) -> str:
        """Blank the beam at once (e.g. after a handler failed with the beam changed); returns the action."""
        return self._act(reason, park=False)

    def request_blank(self, reason: str) -> None:
        """Have the next :meth:`poll` blank the beam (safe to call from another thread: one assignment)."""
        self._blank_pending = reason

    def _act(self, reason: str, park: bool) -> str:
        try:
            if park and self._park is not None and self.frame is not None:
                x, y = self.limits.safe_position
                self._park(x, y)
                self.beam.position, self.beam.on_since = (x, y), None  # the safe position is not time-limited
                self._armed = False  # until the beam is driven again
                self.last_action = f"{reason}: park"
                return self.last_action
            if self._blank is None:
                self.last_action = f"{reason}: no action available"
                return self.last_action
            self._blank(reason)
        except Exception as exc:  # noqa: BLE001 - the hardware refused; keep trying at every poll
            self.counters.blank_failures += 1
            self._blank_pending = reason
            self.last_action = f"{reason}: blank failed ({type(exc).__name__}: {exc})"
            return self.last_action
        self._blank_pending = ""
        self.beam.blanked, self.beam.on_since = True, None
        self._armed = self.beam.queue and not self.beam.blanked
        self.last_action = f"{reason}: blank"
        return self.last_action

    def heartbeat(self, args: dict) -> dict:
        """Handler of the ``heartbeat`` call: tells the client the watchdog's period and state."""
        return {"watchdog_s": self.limits.watchdog_s, "armed": self._armed}

    def state(self) -> dict:
        """Limits, counters, watchdog state and last action, as a plain dict (CBOR/JSON)."""
        return {"limits": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.limits).items()},
                "counters": asdict(self.counters), "watchdog_armed": self._armed, "last_action": self.last_action,
                "frame_id": None if self.frame is None else self.frame.frame_id,
                "blank_pending": bool(self._blank_pending)}
