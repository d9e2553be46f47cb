"""The control bridge's wire protocol: calls, messages, error codes, and the one check of ``acquire_frame``.

The bridge is a request/reply protocol over ZeroMQ (REQ/REP sockets; the client is the "lazy pirate" of
the ZeroMQ guide [1]_, ch. 4) that moves the beam of a scan controller. Its calls are the common
denominator of the scan interfaces of Nion Swift (nionswift-instrumentation,
``nion/instrumentation/scan_base.py``: ``probe_position`` as fractions of the last scan, subscans by
fractional centre and size), Thermo Fisher AutoScript TEM, Gatan DigiScan, JEOL PyJEM and the Open Beam
Interface (github.com/nanographs/Open-Beam-Interface): positions as fractions of a named scan frame,
blanking, point lists.

=====================  ==========================================================================
``get_capabilities``   calls, channels, limits of the scan controller
``get_state``          current frame id, probe state (``idle``, ``scanning``, ``parked``), blanking
``acquire_frame``      ``shape [rows, cols]``, ``fov_nm [h, w]``, ``dwell_us``, ``channels``: scan a
                       frame; its id names the frame that later positions refer to
``set_probe``          ``x``, ``y`` (fractions of the frame), ``frame_id``: park the probe there
``blank``              ``on``: blank (true) or unblank (false) the beam
``heartbeat``          no arguments: the client is alive (feeds the controller's watchdog)
``queue_points``       ``points [[x, y], ...]``, ``dwell_us``, ``signal``, ``blank_between``: visit
                       points one after another; ``fetch_points`` / ``abort_points`` by ``queue_id``
=====================  ==========================================================================

Wire format: every request is one ZeroMQ message holding the CBOR [2]_ map ``{"call": name, "seq": n,
"args": {...}, "client": id}`` (``client``, optional, is the client's random id: with ``seq`` it lets the
server apply a retried request once); every reply is ``{"seq": n, "ok": true, "result": {...}}`` or
``{"seq": n, "ok": false, "error": code, "message": text}``. Replies echo what was applied (e.g. the
position the probe was actually parked at). Error codes: ``out_of_range`` (a position or parameter
outside its limits), ``stale_frame`` (a position refers to a frame that is no longer current), ``busy``
(the controller is doing something that this call would disturb), ``bad_request`` (malformed),
``unknown_call``, ``internal``, ``rate_limited`` (too many requests per second), ``stale_seq`` (a sequence
number older than one already applied); the client adds ``timeout``.

Both ends are built on this module: :mod:`beamloop.edge.control.client` and
:mod:`beamloop.edge.control.server`.

References
----------
.. [1] P. Hintjens, "ZeroMQ: The Guide", chapter 4 "Reliable Request-Reply Patterns" (Client-Side
   Reliability, the Lazy Pirate pattern), https://zguide.zeromq.org/docs/chapter4/
.. [2] C. Bormann and P. Hoffman, "Concise Binary Object Representation (CBOR)", RFC 8949 (2020).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

ERROR_CODES = ("out_of_range", "stale_frame", "busy", "bad_request", "unknown_call", "internal", "rate_limited",
               "stale_seq", "timeout")
"""Every error code a reply (or, for ``timeout``, the client) may carry."""

BEAM_CALLS = ("set_probe", "blank", "queue_points")
"""Calls that move, blank or unblank the beam: after one of them the controller's watchdog watches its
sender, and the service times their round trip as its ``bridge`` stage."""

MAX_CLIENT_ID = 64
"""Longest client id (characters) a request may carry."""


class BridgeError(RuntimeError):
    """A call that the scan controller refused, or that could not be made.

    Parameters
    ----------
    code : str
        One of :data:`ERROR_CODES`.
    message : str
        What was wrong, for a person.
    call : str, optional
        The call that failed (empty when unknown).

    Attributes
    ----------
    code, message, call : str
        As given.
    """

    def __init__(self, code: str, message: str, call: str = "") -> None:
        super().__init__(f"{call + ': ' if call else ''}{code}: {message}")
        self.code = code
        self.call = call
        self.message = message


class BridgeTimeout(BridgeError):
    """The scan controller did not answer in time; the client reconnected and the call may not have run.

    Parameters
    ----------
    call : str
        The call that timed out.
    timeout_ms : int
        How long the client waited for each reply, milliseconds.
    """

    def __init__(self, call: str, timeout_ms: int) -> None:
        super().__init__("timeout", f"no reply within {timeout_ms} ms", call)


@dataclass(frozen=True)
class Request:
    """A decoded request.

    Attributes
    ----------
    call : str
        The call's name.
    seq : int
        The sender's sequence number.
    args : dict
        The call's arguments.
    client : str or None
        The sender's id; None when the request carries none.
    """

    call: str
    seq: int
    args: dict
    client: str | None = None


def encode_request(call: str, seq: int, args: Mapping, client: str | None = None) -> bytes:
    """CBOR bytes of a request.

    Parameters
    ----------
    call : str
        The call's name.
    seq : int
        Sequence number.
    args : mapping
        The call's arguments (CBOR-encodable values).
    client : str, optional
        The sender's id (see the module docstring); omitted from the message when None.

    Returns
    -------
    bytes
    """
    msg = {"call": call, "seq": int(seq), "args": dict(args)}
    if client is not None:
        msg["client"] = str(client)
    return cbor2.dumps(msg)


def decode_envelope(buf: bytes) -> Request:
    """Decode a request with every field.

    Parameters
    ----------
    buf : bytes
        One request message.

    Returns
    -------
    Request

    Raises
    ------
    BridgeError
        (``bad_request``) not CBOR, not a map, ``call`` / ``seq`` / ``args`` missing or mistyped, or a
        ``client`` that is not text of at most :data:`MAX_CLIENT_ID` characters.
    """
    try:
        msg = cbor2.loads(buf, max_depth=16, allow_duplicate_keys=False)
    except Exception as exc:
        raise BridgeError("bad_request", f"request is not valid CBOR ({type(exc).__name__}: {exc})") from None
    if not isinstance(msg, dict):
        raise BridgeError("bad_request", f"request is a {type(msg).__name__}, expected a map")
    call, seq, args, client = msg.get("call"), msg.get("seq"), msg.get("args", {}), msg.get("client")
    if not isinstance(call, str) or not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(args, dict):
        raise BridgeError("bad_request", "request needs call (text), seq (integer) and args (map)")
    if client is not None and not (isinstance(client, str) and 0 < len(client) <= MAX_CLIENT_ID):
        raise BridgeError("bad_request", f"request client id must be text of 1 to {MAX_CLIENT_ID} characters")
    return Request(call, seq, args, client)


def encode_reply(seq: int, result: Mapping | None = None, error: BridgeError | None = None) -> bytes:
    """CBOR bytes of a reply: ``result`` (a map), or ``error`` when given.

    Parameters
    ----------
    seq : int
        The sequence number of the request answered (-1 when it could not be read).
    result : mapping, optional
        The call's result.
    error : BridgeError, optional
        The refusal; takes precedence over ``result``.

    Returns
    -------
    bytes
    """
    if error is not None:
        return cbor2.dumps({"seq": seq, "ok": False, "error": error.code, "message": error.message})
    return cbor2.dumps({"seq": seq, "ok": True, "result": dict(result or {})})


def decode_reply(buf: bytes, call: str) -> tuple[int, dict]:
    """Decode a reply into ``(seq, result)``.

    Parameters
    ----------
    buf : bytes
        One reply message.
    call : str
        The call it answers (named in the errors raised).

    Returns
    -------
    tuple (int, dict)

    Raises
    ------
    BridgeError
        The reply carries an error (its code; an unknown code becomes ``internal``), or is malformed
        (``bad_request``).
    """
    try:
        msg = cbor2.loads(buf, max_depth=16)
    except Exception as exc:
        raise BridgeError("bad_request", f"reply is not valid CBOR ({type(exc).__name__}: {exc})", call) from None
    if not isinstance(msg, dict) or not isinstance(msg.get("seq"), int) or not isinstance(msg.get("ok"), bool):
        raise BridgeError("bad_request", "reply needs seq (integer) and ok (boolean)", call)
    if not msg["ok"]:
        code = str(msg["error"]) if msg.get("error") in ERROR_CODES else "internal"
        raise BridgeError(code, str(msg.get("message", "")), call)
    result = msg.get("result", {})
    if not isinstance(result, dict):
        raise BridgeError("bad_request", "reply result is not a map", call)
    return msg["seq"], result


# acquire_frame ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanLimits:
    """What a scan controller accepts in ``acquire_frame``.

    Attributes
    ----------
    shape : (int, int)
        Smallest and largest number of pixels along either axis.
    dwell_us : (float, float)
        Shortest and longest pixel dwell time, microseconds.
    default_dwell_us : float
        Dwell time of a request that names none, microseconds.
    channels : tuple of str
        Detector channels, lower case; the first is the default.
    max_fov_nm : float or None
        Largest field of view along either axis, nanometres; None: any positive one.
    """

    shape: tuple[int, int]
    dwell_us: tuple[float, float]
    default_dwell_us: float
    channels: tuple[str, ...]
    max_fov_nm: float | None = None


@dataclass(frozen=True)
class AcquireRequest:
    """A valid ``acquire_frame`` request (:func:`parse_acquire_frame`).

    Attributes
    ----------
    shape : (int, int)
        Pixels (rows along the slow axis, cols along the fast axis).
    fov_nm : (float, float)
        Field of view (height, width), nanometres.
    dwell_us : float
        Pixel dwell time, microseconds.
    channels : tuple of str
        Detector channels to record, lower case, each once.
    """

    shape: tuple[int, int]
    fov_nm: tuple[float, float]
    dwell_us: float
    channels: tuple[str, ...]


def parse_acquire_frame(args: Mapping[str, Any], limits: ScanLimits) -> AcquireRequest:
    """Check the arguments of ``acquire_frame`` against a controller's limits.

    Parameters
    ----------
    args : mapping
        The request's ``args``: ``shape [rows, cols]``, ``fov_nm [h, w]``, optional ``dwell_us`` (default
        ``limits.default_dwell_us``) and ``channels`` (default: the first of ``limits.channels``; names are
        matched without regard to case).
    limits : ScanLimits

    Returns
    -------
    AcquireRequest

    Raises
    ------
    BridgeError
        ``bad_request``: ``shape`` or ``fov_nm`` missing or not two numbers, ``dwell_us`` not a number,
        ``channels`` not a non-empty list of names or naming one twice; ``out_of_range``: a size, field of
        view or dwell outside the limits, or a channel the controller does not have.
    """
    try:
        rows, cols = (int(v) for v in args["shape"])
        h_nm, w_nm = (float(v) for v in args["fov_nm"])
        dwell = float(args.get("dwell_us", limits.default_dwell_us))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise BridgeError("bad_request",
                          f"acquire_frame needs shape [rows, cols], fov_nm [h, w], dwell_us: {exc}") from None
    lo, hi = limits.shape
    if not (lo <= rows <= hi and lo <= cols <= hi):
        raise BridgeError("out_of_range", f"frame size {rows}x{cols} outside [{lo}, {hi}]")
    top = limits.max_fov_nm
    if top is None and not all(math.isfinite(v) and v > 0 for v in (h_nm, w_nm)):
        raise BridgeError("out_of_range", f"field of view {h_nm} x {w_nm} nm is not positive")
    if top is not None and not all(math.isfinite(v) and 0 < v <= top for v in (h_nm, w_nm)):
        raise BridgeError("out_of_range", f"field of view {(h_nm, w_nm)} nm outside (0, {top:.2f}]")
    dlo, dhi = limits.dwell_us
    if not (math.isfinite(dwell) and dlo <= dwell <= dhi):
        raise BridgeError("out_of_range", f"dwell {dwell} us outside [{dlo}, {dhi}]")
    channels = check_channels(args.get("channels", [limits.channels[0]]), limits)
    return AcquireRequest((rows, cols), (h_nm, w_nm), dwell, channels)


def check_channels(channels: Any, limits: ScanLimits) -> tuple[str, ...]:
    """Check a list of channel names (``acquire_frame``'s ``channels``, ``queue_points``' ``signal``).

    Parameters
    ----------
    channels : list of str
        Names, matched to ``limits.channels`` without regard to case.
    limits : ScanLimits

    Returns
    -------
    tuple of str
        The names, lower case.

    Raises
    ------
    BridgeError
        ``bad_request``: not a non-empty list of text, or a name given twice; ``out_of_range``: a channel
        the controller does not have.
    """
    if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
        raise BridgeError("bad_request", "channels must be a non-empty list of names")
    names = tuple(c.lower() for c in channels)
    if len(set(names)) != len(names):
        raise BridgeError("bad_request", f"channels {channels} name a channel more than once")
    if not all(c in limits.channels for c in names):
        raise BridgeError("out_of_range", f"channels {channels} not all available; this scan device has "
                                          f"{list(limits.channels)}")
    return names
