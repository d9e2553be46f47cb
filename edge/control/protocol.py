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
``acquire_frame``      ``shape [rows, cols]``, ``fov_nm [h, w]``, ``dwell_us``, ``channels``, optional
                       ``center_nm [x, y]`` (a subscan: the frame's centre on the specimen): scan a
                       frame; its id names the frame that later positions refer to
``set_probe``          ``x``, ``y`` (fractions of the frame), ``frame_id``: park the probe there; optional
                       ``track [vx, vy]`` (fractions of the frame per second, at most
                       :data:`MAX_TRACK_PER_S`): move it on at that rate (drift compensation) until moved
``blank``              ``on``: blank (true) or unblank (false) the beam
``heartbeat``          no arguments: the client is alive (feeds the controller's watchdog)
``queue_points``       ``points [[x, y], ...]``, ``dwell_us``, ``signal``, ``blank_between``, optional
                       ``detectors`` (:data:`POINT_DETECTORS`: what to record per point besides the mean
                       ADF counts): visit points one after another; ``fetch_points`` (optional
                       ``start``: the first point returned; ``measurements: false``: progress only) /
                       ``abort_points`` by ``queue_id``
``stop``               no arguments: end whatever the beam is doing (point queue, parked dwell) and
                       blank it
``arm_trigger``        ``model`` (a name or its hash), ``threshold`` (integer score; default the
                       calibrated one), ``rearm`` (:data:`REARM_POLICIES`), ``expected_rate`` (counts
                       per sample of the intact column): the controller's own ejection trigger decides on
                       every sample of the parked dwells and blanks the beam itself; never unblanks
``get_trigger_state``  no arguments: the armed trigger and its last decision (sample, blank time)
``move_stage``         ``x_um``, ``y_um``: drive the specimen stage to that absolute position
                       (micrometres, inside the ``stage`` limits of ``get_capabilities``); the
                       controller blanks the beam first and keeps it blanked until the stage has
                       settled (``duration_s`` in the reply: travel plus settle); the current frame
                       ends (its positions no longer name the specimen under the beam)
``get_stage``          no arguments: the stage position (as the stage reports it), whether it is still
                       moving and the seconds until it has settled
=====================  ==========================================================================

``move_stage`` and ``get_stage`` are served by controllers whose ``get_capabilities`` reply has a
``stage`` entry (:class:`StageLimits`: travel range, speed, settle time, backlash); ``stage`` is None for
one without a motorised stage. The field of view (magnification) is set per frame by ``acquire_frame``'s
``fov_nm``, up to the controller's ``max_fov_nm``. While the stage moves, ``acquire_frame``,
``set_probe``, ``queue_points`` and ``blank`` with ``on: false`` are refused as ``busy``.

``arm_trigger`` and ``get_trigger_state`` are served by controllers whose ``get_capabilities`` reply names
a ``trigger`` (the models offered, with their hash, calibrated threshold and logic latency); ``trigger``
is None for a controller without one (the service then runs its own trigger on the streamed samples).

Calls that make the beam safer (:func:`makes_safer`: ``blank`` with ``on: true``, ``abort_points``,
``stop``) are never refused for the rate, the size of the request, its sequence number or a malformed
field other than the call itself: they are applied, and what was odd is reported in the reply's
``notes``.

Sizes: a server reads at most :data:`MAX_MESSAGE_BYTES` per message (the ZeroMQ socket option
``ZMQ_MAXMSGSIZE``: libzmq disconnects a peer that sends a larger message, before reading it whole;
libzmq API reference, ``zmq_setsockopt``) and decodes at most :data:`MAX_REQUEST_BYTES` (larger requests
are refused as ``bad_request`` unless their first fields name a call that makes the beam safer,
:func:`peek_request`), so that no request can hold the controller for long.

Wire format: every request is one ZeroMQ message holding the CBOR [2]_ map ``{"call": name, "seq": n,
"args": {...}, "client": id}`` (``client``, optional, is the client's random id: with ``seq`` it lets the
server apply a retried request once); every reply is ``{"seq": n, "ok": true, "result": {...}}`` or
``{"seq": n, "ok": false, "error": code, "message": text}``. Replies echo what was applied (e.g. the
position the probe was actually parked at). Error codes: ``out_of_range`` (a position or parameter
outside its limits), ``stale_frame`` (a position refers to a frame that is no longer current), ``busy``
(the controller is doing something that this call would disturb), ``bad_request`` (malformed, too large,
or a sequence number reused for a different request), ``unknown_call``, ``internal``, ``rate_limited``
(too many requests per second from this client), ``stale_seq`` (a sequence number older than one already
applied); the client adds ``timeout`` (no reply in time) and ``unavailable`` (the controller's process is
known to have exited). A map wrapped in the self-described CBOR tag 55799 (RFC 8949, section 3.4.6) is
read as the map.

Point measurements: ``get_capabilities`` has a ``point_detectors`` map, detector name -> its calibration
(``adf``: the ADF channel's mean counts per sample; ``eels``: ``channels``, ``offset_eV``, ``dispersion_eV``,
``resolution_eV``, ``dtype``; ``pattern``: ``shape [rows, cols]``, ``binning``, ``dtype``). A ``queue_points``
whose ``detectors`` names one the controller does not have is refused (``out_of_range``, "not fitted"), and
so is one whose measurements would not fit one ``fetch_points`` reply (:data:`MAX_POINT_REPLY_BYTES`).
``fetch_points`` always carries ``mean_counts``; with detectors beyond ``adf`` also ``measurements``,
detector -> an array of the points done (from ``start``) in the CBOR array map of :func:`encode_array`
(``dtype``, ``shape``, little-endian ``data`` bytes; the same convention as the simulator's ground truth).

Both ends are built on this module: :mod:`beamloop.edge.control.client` and
:mod:`beamloop.edge.control.server`.

References
----------
.. [1] P. Hintjens, "ZeroMQ: The Guide", chapter 4 "Reliable Request-Reply Patterns" (Client-Side
   Reliability, the Lazy Pirate pattern), https://zguide.zeromq.org/docs/chapter4/
.. [2] C. Bormann and P. Hoffman, "Concise Binary Object Representation (CBOR)", RFC 8949 (2020).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np

ERROR_CODES = ("out_of_range", "stale_frame", "busy", "bad_request", "unknown_call", "internal", "rate_limited",
               "stale_seq", "timeout", "unavailable")
"""Every error code a reply (or, for ``timeout`` and ``unavailable``, the client) may carry."""

SAFER_CALLS = ("blank", "abort_points", "stop")
"""Calls that can make the beam safer (``blank`` only with ``on: true``; see :func:`makes_safer`)."""

MAX_MESSAGE_BYTES = 1 << 24
"""Largest message a server socket reads (``ZMQ_MAXMSGSIZE``, 16 MiB); libzmq drops the connection of a
peer that sends more."""

MAX_REQUEST_BYTES = 1 << 20
"""Largest request a server decodes (1 MiB: ~50 000 queued points); larger ones are refused unread
(:func:`decode_envelope`)."""

DIGEST_INLINE_BYTES = 512
"""Requests up to this size are compared with a retry byte for byte; larger ones by a BLAKE2b digest."""

PEEK_ITEMS = 64
"""Data items :func:`peek_request` reads at most from the start of an oversized request."""

MAX_SEQ = (1 << 63) - 1
"""Largest sequence number (a signed 64-bit integer); sequence numbers are 0 .. MAX_SEQ."""

BEAM_CALLS = ("set_probe", "blank", "queue_points")

MAX_FOV_NM = 1e5
"""Farthest a frame's centre may lie from the origin, nanometres (100 um)."""

MAX_TRACK_PER_S = 0.1
"""Fastest ``set_probe`` ``track`` rate, fractions of the frame per second (per axis)."""


def check_track(value) -> tuple[float, float]:
    """A ``set_probe`` ``track`` rate as a pair of floats.

    Parameters
    ----------
    value : object
        ``[vx, vy]``, fractions of the frame per second.

    Raises
    ------
    BridgeError
        (``bad_request``) not a pair of finite numbers of magnitude at most :data:`MAX_TRACK_PER_S`.
    """
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and abs(v) <= MAX_TRACK_PER_S for v in value))
    if not ok:
        raise BridgeError("bad_request", f"set_probe track {value!r:.60} must be [vx, vy], finite fractions of the "
                                         f"frame per second of magnitude <= {MAX_TRACK_PER_S:g}")
    return float(value[0]), float(value[1])
"""Calls that move, blank or unblank the beam: after one of them the controller's watchdog watches its
sender, and the service times their round trip as its ``bridge`` stage."""

TRIGGER_CALLS = ("arm_trigger", "get_trigger_state")
"""Calls of a controller that runs an ejection trigger itself (``get_capabilities`` says so)."""

REARM_POLICIES = ("dwell", "once")
"""``arm_trigger``'s ``rearm``: ``dwell``, the trigger decides in every later parked dwell, its history and
latch cleared at each dwell's start; ``once``, it disarms after its first decision (arm it again for the
next dwell)."""

MAX_EXPECTED_RATE = 65535.0
"""Largest ``expected_rate`` of ``arm_trigger``, counts per sample (the largest uint16 sample)."""

MAX_CLIENT_ID = 64
"""Longest client id (characters) a request may carry."""

STAGE_CALLS = ("move_stage", "get_stage")
"""Calls of a controller with a motorised specimen stage (``get_capabilities`` has a ``stage`` entry)."""

STAGE_BUSY_CALLS = ("acquire_frame", "set_probe", "queue_points")
"""Calls refused as ``busy`` while the stage moves (and ``blank`` with ``on: false``)."""


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
    detail : str, optional
        What else the client knows (e.g. that the server refused its CURVE key).
    """

    def __init__(self, call: str, timeout_ms: int, detail: str = "") -> None:
        super().__init__("timeout", f"no reply within {timeout_ms} ms" + (f"; {detail}" if detail else ""), call)


@dataclass(slots=True)
class Request:
    """A decoded request.

    Attributes
    ----------
    call : str
        The call's name.
    seq : int
        The sender's sequence number (-1 when a request that makes the beam safer carried none usable).
    args : dict
        The call's arguments.
    client : str or None
        The sender's id; None when the request carries none.
    digest : bytes
        What a retry must repeat: the request's bytes themselves (up to :data:`DIGEST_INLINE_BYTES`), else
        their BLAKE2b digest (16 bytes).
    notes : tuple of str
        What was wrong with a request that makes the beam safer, applied all the same (empty otherwise).
    safer : bool
        Whether the request makes the beam safer (:func:`makes_safer`).
    """

    call: str
    seq: int
    args: dict
    client: str | None = None
    digest: bytes = b""
    notes: tuple[str, ...] = ()
    safer: bool = False


def makes_safer(call: Any, args: Any) -> bool:
    """Whether a request can only make the beam safer: ``blank`` with ``on`` true, ``abort_points``, ``stop``.

    Parameters
    ----------
    call : object
        The request's ``call`` field.
    args : object
        Its ``args`` field.

    Returns
    -------
    bool
    """
    if call == "blank":
        return isinstance(args, Mapping) and args.get("on") is True
    return call in ("abort_points", "stop")


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


def _thaw(obj: Any, depth: int = 0) -> Any:
    """``obj`` with every map a plain dict: cbor2 decodes the maps under tag 55799 as frozendicts."""
    if depth > 16:
        return obj
    if isinstance(obj, Mapping):
        return {k: _thaw(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_thaw(v, depth + 1) for v in obj]
    return obj


def short_repr(obj: Any, limit: int = 80) -> str:
    """``repr(obj)`` cut to ``limit`` characters (for error messages about requests of any size)."""
    text = repr(obj) if not isinstance(obj, (list, dict, bytes, str)) or len(obj) < limit else \
        f"<{type(obj).__name__} of {len(obj)} items>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _valid_seq(seq: Any) -> bool:
    return isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= MAX_SEQ


def _valid_client(client: Any) -> bool:
    return client is None or (isinstance(client, str) and 0 < len(client) <= MAX_CLIENT_ID)


def decode_envelope(buf: bytes, max_bytes: int = MAX_REQUEST_BYTES) -> Request:
    """Decode a request with every field.

    A request that makes the beam safer (:func:`makes_safer`) is returned even when it is larger than
    ``max_bytes`` (read by :func:`peek_request`), or its ``seq`` or ``client`` is unusable (seq -1, client
    None); what was wrong is in :attr:`Request.notes`.

    Parameters
    ----------
    buf : bytes
        One request message.
    max_bytes : int
        Largest request decoded (default :data:`MAX_REQUEST_BYTES`).

    Returns
    -------
    Request

    Raises
    ------
    BridgeError
        (``bad_request``) larger than ``max_bytes``, not CBOR, not a map, ``call`` / ``seq`` / ``args``
        missing or mistyped, a ``seq`` outside 0 .. :data:`MAX_SEQ`, or a ``client`` that is not text of
        at most :data:`MAX_CLIENT_ID` characters.
    """
    n = len(buf)
    digest = bytes(buf) if n <= DIGEST_INLINE_BYTES else hashlib.blake2b(buf, digest_size=16).digest()
    if n <= max_bytes:  # the common case first: a well-formed request, decoded and checked once
        try:
            msg = cbor2.loads(buf, max_depth=16, allow_duplicate_keys=False)
        except Exception as exc:
            raise BridgeError("bad_request", f"request is not valid CBOR ({type(exc).__name__}: {exc})") from None
        if type(msg) is dict:
            call, seq, args, client = msg.get("call"), msg.get("seq"), msg.get("args", {}), msg.get("client")
            if (type(call) is str and type(seq) is int and type(args) is dict and 0 <= seq <= MAX_SEQ
                    and (client is None or (type(client) is str and 0 < len(client) <= MAX_CLIENT_ID))):
                return Request(call, seq, args, client, digest, (), call in SAFER_CALLS and makes_safer(call, args))
    return _decode_odd(buf, max_bytes, digest)


def _decode_odd(buf: bytes, max_bytes: int, digest: bytes) -> Request:
    """:func:`decode_envelope` for every request that is not a plain, valid map."""
    notes: list[str] = []
    if len(buf) > max_bytes:
        peek = peek_request(buf)
        too_big = f"request of {len(buf)} bytes exceeds the {max_bytes}-byte bound"
        if peek is None or not makes_safer(peek.get("call"), peek.get("args")):
            raise BridgeError("bad_request", too_big + "; not read")
        msg: Any = peek
        notes.append(too_big)
    else:
        try:
            msg = cbor2.loads(buf, max_depth=16, allow_duplicate_keys=False)
        except Exception as exc:
            raise BridgeError("bad_request", f"request is not valid CBOR ({type(exc).__name__}: {exc})") from None
        if isinstance(msg, cbor2.CBORTag) and msg.tag == 55799:  # self-described CBOR, when not unwrapped
            msg = msg.value
        if type(msg) is not dict and isinstance(msg, Mapping):
            msg = _thaw(msg)
    if not isinstance(msg, dict):
        raise BridgeError("bad_request", f"request is a {type(msg).__name__}, expected a map")
    call, seq, args, client = msg.get("call"), msg.get("seq"), msg.get("args", {}), msg.get("client")
    if isinstance(call, str) and makes_safer(call, args):
        if not isinstance(args, Mapping):
            notes.append(f"args {short_repr(args, 24)} is not a map")
            args = {}
        if not _valid_seq(seq):
            notes.append(f"unusable seq {short_repr(seq, 24)}")
            seq = -1
        if not _valid_client(client):
            notes.append("unusable client id")
            client = None
        return Request(call, seq if isinstance(seq, int) else -1, dict(args), client, digest, tuple(notes), True)
    if not isinstance(call, str) or not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(args, dict):
        raise BridgeError("bad_request", "request needs call (text), seq (integer) and args (map)")
    if not _valid_seq(seq):
        raise BridgeError("bad_request", f"request seq {seq} outside 0 .. {MAX_SEQ}")
    if not _valid_client(client):
        raise BridgeError("bad_request", f"request client id must be text of 1 to {MAX_CLIENT_ID} characters")
    return Request(call, seq, args, client, digest)


def _head(buf: bytes, i: int) -> tuple[int, int, int]:
    """``(major type, argument, index after the head)`` of the CBOR data item at ``buf[i]`` (RFC 8949,
    section 3); raises ValueError for indefinite lengths or a head running past the end."""
    b = buf[i]
    major, info = b >> 5, b & 31
    i += 1
    if info < 24:
        return major, info, i
    if info > 27:
        raise ValueError("indefinite length or reserved value")
    n = 1 << (info - 24)
    if i + n > len(buf):
        raise ValueError("truncated head")
    return major, int.from_bytes(buf[i:i + n], "big"), i + n


def peek_request(buf: bytes, max_items: int = PEEK_ITEMS) -> dict | None:
    """The simple fields of a request too large to decode, read from its start without decoding the rest.

    Reads the top-level map's keys in order: text and integer values, and an ``args`` map of simple values
    (booleans, integers, short text); a byte or text string of any length under another key is skipped by
    its length. Stops at an array or a nested map anywhere but ``args``, a head of indefinite length, or
    after ``max_items`` data items, keeping what it read before: the cost is bounded whatever the request
    holds.

    Parameters
    ----------
    buf : bytes
        The request's bytes.
    max_items : int
        Data items read at most.

    Returns
    -------
    dict or None
        ``{"call": ..., "seq": ..., "client": ..., "args": {...}}`` as far as read, or None when the request
        is not a map or nothing could be read.
    """
    items = 0

    def head(i: int) -> tuple[int, int, int]:
        nonlocal items
        items += 1
        if items > max_items:
            raise ValueError("too many items")
        return _head(buf, i)

    def text(i: int, n: int) -> tuple[str, int]:
        if n > 256 or i + n > len(buf):
            raise ValueError("long or truncated text")
        return bytes(buf[i:i + n]).decode("utf-8"), i + n

    def simple(i: int) -> tuple[Any, int]:
        major, arg, i = head(i)
        if major == 0:
            return arg, i
        if major == 1:
            return -1 - arg, i
        if major == 3 and arg <= 256:
            return text(i, arg)
        if major in (2, 3):
            return None, i + arg  # skipped by its length
        if major == 7 and arg in (20, 21, 22):
            return (None if arg == 22 else arg == 21), i
        raise ValueError("not a simple value")

    out: dict[str, Any] = {}
    try:
        major, n, i = head(0)
        if major == 6 and n == 55799:
            major, n, i = head(i)
        if major != 5:
            return None
        for _ in range(n):
            kmajor, klen, i = head(i)
            if kmajor != 3:
                return None
            key, i = text(i, klen)
            if key == "args":
                amajor, alen, i = head(i)
                if amajor != 5:
                    return None
                args = {}
                for _ in range(alen):
                    kmajor, klen, i = head(i)
                    if kmajor != 3:
                        return None
                    akey, i = text(i, klen)
                    args[akey], i = simple(i)
                out["args"] = args
            else:
                out[key], i = simple(i)
            if i > len(buf):
                break
    except (ValueError, IndexError, UnicodeDecodeError):
        pass  # what was read so far stands
    return out or None


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
    center_nm : (float, float)
        Centre of the frame on the specimen (x, y), nanometres: (0, 0) for the full field, else a subscan
        (a re-centring scan around a target).
    """

    shape: tuple[int, int]
    fov_nm: tuple[float, float]
    dwell_us: float
    channels: tuple[str, ...]
    center_nm: tuple[float, float] = (0.0, 0.0)


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
        ``bad_request``: ``shape`` missing or not two integers (``[64.7, 64.2]`` is refused, not truncated),
        ``fov_nm`` missing or not two numbers, ``dwell_us`` not a number,
        ``channels`` not a non-empty list of names or naming one twice, ``center_nm`` not two finite numbers;
        ``out_of_range``: a size, field of view or dwell outside the limits, a channel the controller does not
        have, or a centre more than :data:`MAX_FOV_NM` from the origin.
    """
    shape = args.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)):
        raise BridgeError("bad_request", "acquire_frame needs shape [rows, cols], fov_nm [h, w], dwell_us: shape "
                                         f"must be two integers, got {short_repr(shape)}")
    rows, cols = shape
    try:
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
    centre = args.get("center_nm", [0.0, 0.0])
    if not (isinstance(centre, (list, tuple)) and len(centre) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in centre)):
        raise BridgeError("bad_request",
                          f"acquire_frame center_nm must be two finite numbers, got {short_repr(centre)}")
    if max(abs(float(centre[0])), abs(float(centre[1]))) > MAX_FOV_NM:
        raise BridgeError("out_of_range", f"acquire_frame center_nm {short_repr(centre)} beyond {MAX_FOV_NM:g} nm")
    return AcquireRequest((rows, cols), (h_nm, w_nm), dwell, channels, (float(centre[0]), float(centre[1])))


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
    if isinstance(channels, str):
        raise BridgeError("bad_request", "channels must be a non-empty list of names, got the text "
                                         f"{short_repr(channels)} (write [{short_repr(channels)}])")
    if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
        raise BridgeError("bad_request", f"channels must be a non-empty list of names, got {short_repr(channels)}")
    names = tuple(c.lower() for c in channels)
    if len(set(names)) != len(names):
        raise BridgeError("bad_request", f"channels {short_repr(channels)} name a channel more than once")
    if not all(c in limits.channels for c in names):
        raise BridgeError("out_of_range", f"channels {short_repr(channels)} not all available; this scan device has "
                                          f"{list(limits.channels)}")
    return names


# move_stage -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageLimits:
    """What a motorised specimen stage accepts in ``move_stage``, and how fast it gets there.

    Attributes
    ----------
    x_um, y_um : (float, float)
        Travel range along x and y (smallest, largest), micrometres, in the stage's own coordinates.
    speed_um_per_s : float
        Travel speed per axis (both axes move together), micrometres per second.
    settle_s : float
        Time after arrival before the stage is still enough to image, seconds.
    backlash_um : float
        Lost motion when an axis reverses direction, micrometres (a stage property the controller reports;
        the stage's own readback does not show it).

    Notes
    -----
    Travel time model: ``max(|dx|, |dy|) / speed_um_per_s + settle_s`` (:meth:`move_time_s`), a stage whose
    axes are driven at once at constant speed. Piezo-assisted goniometer stages of aberration-corrected
    STEMs travel at micrometres per second and settle in seconds; montaging is therefore stage-limited
    at about 0.1 frames/s (M. J. Olszta et al., "An automated scanning transmission electron microscope
    guided by sparse data analytics", Microsc. Microanal. 28, 1611-1621 (2022)).

    Raises
    ------
    ValueError
        A range that is empty or not finite, a speed that is not positive, a negative settle time or backlash.
    """

    x_um: tuple[float, float]
    y_um: tuple[float, float]
    speed_um_per_s: float
    settle_s: float
    backlash_um: float = 0.0

    def __post_init__(self) -> None:
        for name in ("x_um", "y_um"):
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"stage range {name} {getattr(self, name)!r} must be two finite numbers lo < hi")
        if not (math.isfinite(self.speed_um_per_s) and self.speed_um_per_s > 0):
            raise ValueError(f"stage speed_um_per_s {self.speed_um_per_s!r} must be a positive number")
        for name in ("settle_s", "backlash_um"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"stage {name} {v!r} must be a finite number >= 0")

    def move_time_s(self, dx_um: float, dy_um: float) -> float:
        """Travel plus settle time of a move by ``(dx_um, dy_um)`` micrometres, seconds (class Notes); 0 for
        no move."""
        d = max(abs(dx_um), abs(dy_um))
        return 0.0 if d == 0 else d / self.speed_um_per_s + self.settle_s

    def as_dict(self) -> dict:
        """The ``stage`` entry of ``get_capabilities``."""
        return {"x_um": list(self.x_um), "y_um": list(self.y_um), "speed_um_per_s": self.speed_um_per_s,
                "settle_s": self.settle_s, "backlash_um": self.backlash_um}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageLimits:
        """The inverse of :meth:`as_dict` (e.g. a client reading ``get_capabilities``).

        Raises
        ------
        BridgeError
            (``bad_request``) a field missing or malformed.
        """
        try:
            return cls(tuple(float(v) for v in d["x_um"]), tuple(float(v) for v in d["y_um"]),  # type: ignore[arg-type]
                       float(d["speed_um_per_s"]), float(d["settle_s"]), float(d.get("backlash_um", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BridgeError("bad_request", f"stage limits {short_repr(d)} malformed: {exc}") from None


def parse_move_stage(args: Mapping[str, Any], limits: StageLimits) -> tuple[float, float]:
    """Check the arguments of ``move_stage`` against a stage's limits.

    Parameters
    ----------
    args : mapping
        ``x_um``, ``y_um``: the absolute target, micrometres.
    limits : StageLimits

    Returns
    -------
    (float, float)
        The target ``(x_um, y_um)``.

    Raises
    ------
    BridgeError
        ``bad_request``: ``x_um`` or ``y_um`` missing, not a number or not finite; ``out_of_range``: outside
        the travel range.
    """
    vals = []
    for name in ("x_um", "y_um"):
        v = args.get(name)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise BridgeError("bad_request", f"move_stage needs x_um and y_um (finite micrometres); {name} is "
                                             f"{short_repr(v)}", "move_stage")
        vals.append(float(v))
    x, y = vals
    (xl, xh), (yl, yh) = limits.x_um, limits.y_um
    if not (xl <= x <= xh and yl <= y <= yh):
        raise BridgeError("out_of_range", f"stage target ({x:g}, {y:g}) um outside the travel range x [{xl:g}, "
                                          f"{xh:g}], y [{yl:g}, {yh:g}] um", "move_stage")
    return x, y


# point measurements --------------------------------------------------------------------------------------
POINT_DETECTORS = ("adf", "eels", "pattern")
"""Detectors ``queue_points`` may record per point: ``adf`` (mean counts of the ADF channel named by
``signal``), ``eels`` (a spectrum, counts per channel), ``pattern`` (a diffraction pattern, binned)."""

MAX_POINT_REPLY_BYTES = 1 << 23
"""Largest size of a point queue's measurements (8 MiB: half of :data:`MAX_MESSAGE_BYTES`, leaving room for
the reply's other fields); a ``queue_points`` whose measurements would be larger is refused."""

ARRAY_DTYPES = ("<u2", "<u4", "<f4", "<f8")
"""Element types of arrays on the wire (:func:`encode_array`)."""


def encode_array(a: np.ndarray) -> dict:
    """An array as a CBOR-ready map ``{"dtype", "shape", "data"}``: little-endian bytes in C order.

    Parameters
    ----------
    a : ndarray
        Of a dtype in :data:`ARRAY_DTYPES` (any byte order).

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        Another element type.
    """
    arr = np.asarray(a)
    dt = arr.dtype.newbyteorder("<")
    if dt.str not in ARRAY_DTYPES:
        raise ValueError(f"array dtype {arr.dtype} is not one of {list(ARRAY_DTYPES)}")
    return {"dtype": dt.str, "shape": list(arr.shape), "data": np.ascontiguousarray(arr, dt).tobytes()}


def decode_array(d: Any, what: str = "array") -> np.ndarray:
    """The inverse of :func:`encode_array` (a read-only view of the bytes).

    Raises
    ------
    BridgeError
        (``bad_request``) not such a map, an element type outside :data:`ARRAY_DTYPES`, or a ``shape`` that
        does not match the bytes.
    """
    if not isinstance(d, Mapping) or not isinstance(d.get("data"), bytes) or d.get("dtype") not in ARRAY_DTYPES:
        raise BridgeError("bad_request", f"{what} must be a map of dtype (one of {list(ARRAY_DTYPES)}), shape and "
                                         f"data bytes, got {short_repr(d)}")
    shape = d.get("shape")
    if not (isinstance(shape, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                            for v in shape)):
        raise BridgeError("bad_request", f"{what} shape {short_repr(shape)} is not a list of whole numbers")
    dt = np.dtype(d["dtype"])
    if math.prod(shape) * dt.itemsize != len(d["data"]):
        raise BridgeError("bad_request", f"{what} of shape {shape} and dtype {dt.str} needs "
                                         f"{math.prod(shape) * dt.itemsize} bytes, got {len(d['data'])}")
    return np.frombuffer(d["data"], dt).reshape(shape)


def detector_point_bytes(name: str, caps: Mapping[str, Any]) -> int:
    """Bytes one point's measurement of detector ``name`` takes in a ``fetch_points`` reply (its
    ``point_detectors`` entry ``caps``); 0 for ``adf`` (in ``mean_counts``)."""
    if name == "adf":
        return 0
    item = np.dtype(caps.get("dtype", "<u4")).itemsize
    if name == "eels":
        return int(caps["channels"]) * item
    return int(math.prod(caps["shape"])) * item


def check_detectors(detectors: Any, available: Mapping[str, Mapping[str, Any]], points: int) -> tuple[str, ...]:
    """Check ``queue_points``' ``detectors`` against the controller's ``point_detectors``.

    Parameters
    ----------
    detectors : list of str
        Names from :data:`POINT_DETECTORS`, matched without regard to case.
    available : mapping
        The controller's ``point_detectors`` (name -> calibration).
    points : int
        Points in the queue (for the reply's size).

    Returns
    -------
    tuple of str
        The names, lower case, each once, in the order given.

    Raises
    ------
    BridgeError
        ``bad_request``: not a non-empty list of text, or a name given twice or not a detector at all;
        ``out_of_range``: a detector not fitted to this controller, or measurements of all points larger than
        :data:`MAX_POINT_REPLY_BYTES`.
    """
    if not isinstance(detectors, list) or not detectors or not all(isinstance(c, str) for c in detectors):
        raise BridgeError("bad_request", f"queue_points detectors must be a non-empty list of names from "
                                         f"{list(POINT_DETECTORS)}, got {short_repr(detectors)}", "queue_points")
    names = tuple(c.lower() for c in detectors)
    if len(set(names)) != len(names):
        raise BridgeError("bad_request", f"queue_points detectors {short_repr(detectors)} name one twice",
                          "queue_points")
    unknown = [c for c in names if c not in POINT_DETECTORS]
    if unknown:
        raise BridgeError("bad_request", f"queue_points detectors {unknown} unknown; detectors are "
                                         f"{list(POINT_DETECTORS)}", "queue_points")
    missing = [c for c in names if c not in available]
    if missing:
        raise BridgeError("out_of_range", f"detector {', '.join(missing)} is not fitted to this scan controller "
                                          f"(it has {sorted(available)})", "queue_points")
    size = points * sum(detector_point_bytes(c, available[c]) for c in names)
    if size > MAX_POINT_REPLY_BYTES:
        per = sum(detector_point_bytes(c, available[c]) for c in names)
        raise BridgeError("out_of_range", f"{points} points of {'+'.join(names)} need {size} bytes, more than one "
                                          f"reply carries ({MAX_POINT_REPLY_BYTES}): queue at most "
                                          f"{MAX_POINT_REPLY_BYTES // max(per, 1)} points at a time", "queue_points")
    return names
