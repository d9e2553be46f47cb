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
rate                   at most ``max_commands_per_s`` requests per second, ``command_burst`` at once
                       (token bucket); the rest are refused unapplied (``rate_limited``)
sequence numbers       a request is applied at most once: a retry carrying the same client id and
                       ``seq`` gets the first reply again without running the call; an older ``seq``
                       from that client is refused (``stale_seq``)
watchdog               while the beam is on (unblanked, or running a point queue), the client that last
                       drove it must be heard from (any request, ``heartbeat`` when idle) every
                       ``watchdog_s``; when it falls silent the beam is blanked, or parked at
                       ``safe_position`` (``on_watchdog="park"``). A blanked beam needs no watching, so a
                       service busy between dwells does not trip it
=====================  ==================================================================================

Every refusal and every action is counted (:class:`SafetyCounters`), and reported by ``get_state`` of
controllers that include :meth:`BeamSafety.state`.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

from beamloop.edge.control.protocol import BEAM_CALLS, BridgeError
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
        if self.max_point_electrons is not None:
            t = min(t, self.max_point_electrons / self.electrons_per_s)
        return t


@dataclass
class SafetyCounters:
    """Requests refused and actions taken by :class:`BeamSafety`."""

    refused_position: int = 0
    refused_stale_frame: int = 0
    refused_dwell: int = 0
    refused_dose: int = 0
    rate_limited: int = 0
    duplicates: int = 0
    stale_seq: int = 0
    watchdog_trips: int = 0
    dwell_limit_blanks: int = 0
    heartbeats: int = 0


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


class SequenceTracker:
    """Last sequence number and reply per client, so that a retried request is applied once.

    Remembers ``max_clients`` clients (least recently heard forgotten first); requests without a
    client id are not tracked.
    """

    def __init__(self, max_clients: int = 64) -> None:
        self.max_clients = int(max_clients)
        self._last: OrderedDict[str, tuple[int, bytes]] = OrderedDict()

    def replay(self, client: str | None, seq: int) -> bytes | None:
        """The reply already sent for ``(client, seq)``, or None for a new request.

        Raises
        ------
        BridgeError
            (``stale_seq``) ``seq`` is older than the last one applied for this client.
        """
        if client is None or client not in self._last:
            return None
        last_seq, reply = self._last[client]
        self._last.move_to_end(client)
        if seq == last_seq:
            return reply
        if seq < last_seq:
            raise BridgeError("stale_seq", f"request {seq} of client {client} is older than request {last_seq}, "
                                           "already applied")
        return None

    def remember(self, client: str | None, seq: int, reply: bytes) -> None:
        """Keep the reply to ``(client, seq)``."""
        if client is None:
            return
        self._last[client] = (seq, reply)
        self._last.move_to_end(client)
        while len(self._last) > self.max_clients:
            self._last.popitem(last=False)


@dataclass
class _Beam:
    """What the guard knows of the beam from the replies it has seen."""

    blanked: bool = True
    position: tuple[float, float] | None = None
    on_since: float | None = None  # unblanked at ``position`` since (clock seconds); None: not timed here


class BeamSafety:
    """The rules of the module docstring, for one scan controller.

    Parameters
    ----------
    limits : SafetyLimits
    blank : callable(reason: str), optional
        Blanks the beam at once (called by the watchdog and the dwell limit); without it neither can act.
    park : callable(x, y), optional
        Parks the probe at fractions of the current frame (``on_watchdog="park"``); falls back to
        ``blank`` when absent or when no frame is current.
    clock : callable, optional
        Seconds, monotonic (default :func:`time.monotonic`); tests pass their own.

    Attributes
    ----------
    frame : ScanFrame or None
        The current frame, from the last successful ``acquire_frame`` reply.
    counters : SafetyCounters
    """

    def __init__(self, limits: SafetyLimits | None = None, *, blank: Callable[[str], None] | None = None,
                 park: Callable[[float, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or SafetyLimits()
        self._blank = blank
        self._park = park
        self._clock = clock
        self.rate = RateLimiter(self.limits.max_commands_per_s, self.limits.command_burst, clock)
        self.sequences = SequenceTracker(self.limits.max_clients)
        self.counters = SafetyCounters()
        self.frame: ScanFrame | None = None
        self.beam = _Beam()
        self._owner: str | None = None
        self._armed = False
        self._last_heard = clock()
        self.last_action = ""

    # before a call --------------------------------------------------------------------------------
    def admit(self, client: str | None, seq: int, call: str, args: dict) -> bytes | None:
        """Check a decoded request before its handler runs.

        Returns the earlier reply when this is a retry of a request already applied (the caller sends
        it again and runs nothing), else None.

        Raises
        ------
        BridgeError
            ``stale_seq``, ``rate_limited``, ``out_of_range`` (position, dwell or dose), ``stale_frame``,
            ``bad_request`` (missing position fields); the request must not be applied.
        """
        try:
            cached = self.sequences.replay(client, seq)
        except BridgeError:
            self.counters.stale_seq += 1
            raise
        if client == self._owner:
            self._last_heard = self._clock()
        if cached is not None:
            self.counters.duplicates += 1
            return cached
        if not self.rate.allow():
            self.counters.rate_limited += 1
            raise BridgeError("rate_limited", f"more than {self.limits.max_commands_per_s:g} requests per second "
                                              f"(burst {self.limits.command_burst}); {call} not applied", call)
        if call == "set_probe":
            self.check_position(args.get("x"), args.get("y"), args.get("frame_id"), call)
        elif call == "queue_points":
            self._check_queue(args)
        elif call == "acquire_frame":
            self._check_pixel_dwell(args)
        elif call == "heartbeat":
            self.counters.heartbeats += 1
        return None

    def check_position(self, x, y, frame_id, call: str = "set_probe") -> tuple[float, float]:
        """Validate one position: finite fractions in [0, 1] of the current frame. Returns ``(x, y)``.

        Raises
        ------
        BridgeError
            ``out_of_range`` (not numbers, not finite, outside the frame) or ``stale_frame``.
        """
        try:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)):
                raise BeamPositionError("out_of_range", f"beam position ({x!r}, {y!r}) is not a pair of numbers")
            fx, fy = check_fraction(x, y)
        except BeamPositionError as exc:
            self.counters.refused_position += 1
            raise BridgeError(exc.code, str(exc), call) from None
        if self.frame is None or isinstance(frame_id, bool) or frame_id != self.frame.frame_id:
            self.counters.refused_stale_frame += 1
            cur = None if self.frame is None else self.frame.frame_id
            raise BridgeError("stale_frame", f"position refers to frame {frame_id!r}, the current frame is {cur}",
                              call)
        return fx, fy

    def _check_queue(self, args: dict) -> None:
        pts, dwell_us = args.get("points"), args.get("dwell_us")
        if not isinstance(pts, list) or not pts or not all(isinstance(p, list) and len(p) == 2 for p in pts):
            raise BridgeError("bad_request", "queue_points needs points [[x, y], ...]", "queue_points")
        for x, y in pts:
            self.check_position(x, y, args.get("frame_id"), "queue_points")
        if isinstance(dwell_us, bool) or not isinstance(dwell_us, (int, float)) or not (
                math.isfinite(dwell_us) and dwell_us > 0):
            self.counters.refused_dwell += 1
            raise BridgeError("out_of_range", f"dwell {dwell_us!r} us is not a positive number", "queue_points")
        lim = self.limits
        if dwell_us * 1e-6 > lim.max_point_dwell_s:
            self.counters.refused_dwell += 1
            raise BridgeError("out_of_range", f"dwell {dwell_us:g} us per point exceeds the limit "
                                              f"{lim.max_point_dwell_s * 1e6:g} us", "queue_points")
        if lim.max_point_electrons is not None:
            electrons = lim.electrons_per_s * dwell_us * 1e-6
            if electrons > lim.max_point_electrons:
                self.counters.refused_dose += 1
                raise BridgeError("out_of_range", f"dose {electrons:.4g} electrons per point ({dwell_us:g} us at "
                                                  f"{lim.current_pA:g} pA) exceeds the limit "
                                                  f"{lim.max_point_electrons:.4g}", "queue_points")

    def _check_pixel_dwell(self, args: dict) -> None:
        if "dwell_us" not in args:
            return  # the controller's default dwell
        d = args["dwell_us"]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and d > 0):
            # not left to the controller: text such as "1e9" would pass many a float() in a handler
            self.counters.refused_dwell += 1
            raise BridgeError("out_of_range", f"pixel dwell {d!r} us is not a positive number", "acquire_frame")
        if d > self.limits.max_pixel_dwell_us:
            self.counters.refused_dwell += 1
            raise BridgeError("out_of_range", f"pixel dwell {d:g} us exceeds the limit "
                                              f"{self.limits.max_pixel_dwell_us:g} us", "acquire_frame")

    # after a call -----------------------------------------------------------------------------------
    def applied(self, client: str | None, call: str, args: dict, result: dict) -> None:
        """Learn from a call the controller applied: the current frame, the beam's state, who drives it."""
        now = self._clock()
        if call == "acquire_frame":
            try:
                self.frame = ScanFrame.from_dict(result["scan"])
            except (KeyError, TypeError, ValueError):
                self.frame = None  # positions are refused until a frame is known
            self.beam.position, self.beam.on_since = None, None
        elif call == "set_probe":
            self.beam.position = (float(args["x"]), float(args["y"]))
            self.beam.on_since = None
        elif call == "queue_points":
            self.beam.position, self.beam.on_since = None, None  # each point timed by its checked dwell
        blanked = result.get("blanked") if isinstance(result, dict) else None
        if isinstance(blanked, bool):
            if blanked:
                self.beam.on_since = None
            elif self.beam.position is not None and (self.beam.blanked or self.beam.on_since is None):
                self.beam.on_since = now
            self.beam.blanked = blanked
            self._armed = not blanked
        if call in BEAM_CALLS:
            self._owner, self._last_heard = client, now
        if call == "queue_points":
            self._armed = True  # the controller runs the points with the beam on

    def remember(self, client: str | None, seq: int, reply: bytes) -> None:
        """Keep the reply sent for ``(client, seq)`` for a retry of the same request."""
        self.sequences.remember(client, seq, reply)

    # between calls --------------------------------------------------------------------------------
    def poll(self) -> str:
        """Run the watchdog and the parked-beam time limit; call often (every server loop).

        Returns the action taken (``"watchdog: blank"``, ``"watchdog: park"``, ``"dwell_limit: blank"``)
        or an empty string.
        """
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

    def _act(self, reason: str, park: bool) -> str:
        if park and self._park is not None and self.frame is not None:
            x, y = self.limits.safe_position
            self._park(x, y)
            self.beam.position, self.beam.on_since = (x, y), None  # the safe position is not time-limited
            self.last_action = f"{reason}: park"
        elif self._blank is not None:
            self._blank(reason)
            self.beam.blanked, self.beam.on_since = True, None
            self.last_action = f"{reason}: blank"
        else:
            self.last_action = f"{reason}: no action available"
        return self.last_action

    def heartbeat(self, args: dict) -> dict:
        """Handler of the ``heartbeat`` call: tells the client the watchdog's period and state."""
        return {"watchdog_s": self.limits.watchdog_s, "armed": self._armed}

    def state(self) -> dict:
        """Limits, counters, watchdog state and last action, as a plain dict (CBOR/JSON)."""
        return {"limits": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.limits).items()},
                "counters": asdict(self.counters), "watchdog_armed": self._armed, "last_action": self.last_action,
                "frame_id": None if self.frame is None else self.frame.frame_id}
