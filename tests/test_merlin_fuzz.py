"""Fuzzing the Merlin (MIB) parsers and receiver with hypothesis.

Properties: the prefix, acquisition-header and frame-header parsers raise nothing but
:class:`MalformedMessage` (one line); a :class:`MerlinReceiver` fed damaged or arbitrary bytes over a real
connection raises nothing but :class:`ProtocolError`, counts every error, allocates no more than its bounds,
and then receives a good acquisition on the next connection bit-exact. Default runs are short; ``_long``
variants (``-m slow``) run 2,000 examples.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beamloop.streams.dectris.series import FrameStack, SeriesEnd
from beamloop.streams.errors import MalformedMessage, ProtocolError
from beamloop.streams.merlin import mib
from beamloop.streams.merlin.receiver import MerlinReceiver

FAST = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=2_000, deadline=None, suppress_health_check=list(HealthCheck))
FRAMES = (np.arange(3 * 8 * 64, dtype=np.uint16).reshape(3, 8, 64) * 37) % 4096
GOOD = mib.acquisition_stream(FRAMES, "U16", 12)
RAW_GOOD = mib.acquisition_stream((FRAMES % 64).astype(np.uint8), "R64", 6)
RING_BOUND = 1 << 22
HEADER_BOUND = 4096


def _mutate(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "digits", "random", "repeat"]))
    if kind == "random":
        return draw(st.binary(max_size=2000))
    if kind == "repeat":  # a frame's header sent twice, the pixels once
        return data[:500] + data[400:]
    pos = draw(st.integers(0, len(data)))
    if kind == "truncate":
        return data[:pos]
    if kind == "flip":
        out = bytearray(data)
        for p in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            out[p] = draw(st.integers(0, 255))
        return bytes(out)
    if kind == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=64)) + data[pos:]
    # a prefix's length digits replaced: too long, too short, huge
    at = data.find(b"MPX,", pos)
    at = data.find(b"MPX,") if at < 0 else at
    digits = b"%010d" % draw(st.sampled_from([0, 1, 5, 10**9, 9_999_999_999, draw(st.integers(0, 10**6))]))
    return data[:at + 4] + digits + data[at + 14:]


@st.composite
def damaged(draw):
    return _mutate(draw(st.sampled_from([GOOD, RAW_GOOD])), draw)


def _drain(rx, connections):
    """Receive until the ``connections``-th connection was made and closed; errors collected."""
    events, errors = [], []
    for _ in range(100_000):
        try:
            ev = rx.recv(20)
        except ProtocolError as exc:
            errors.append(exc)
            continue
        if ev is not None:
            events.append(ev)
        elif rx.connections >= connections and not rx.connected:
            return events, errors
    raise AssertionError("the receiver never saw the connection close")


@pytest.fixture(scope="module")
def receiver():
    with MerlinReceiver("tcp://127.0.0.1:0", bind=True, max_ring_bytes=RING_BOUND, max_header_bytes=HEADER_BOUND,
                        max_message_bytes=1 << 20, message_timeout_s=0.2, stack_size=4) as rx:
        yield rx


def _send(rx, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", int(rx.endpoint.rsplit(":", 1)[1]))) as tx:
        tx.sendall(data)


def _check_receiver(rx, data: bytes) -> None:
    before = rx.counters.rejected
    k = rx.connections
    _send(rx, data)
    _, errors = _drain(rx, k + 1)
    assert all(isinstance(e, ProtocolError) and "\n" not in str(e) for e in errors)
    assert rx.counters.rejected - before >= len(errors)
    assert len(rx._buf) == 4 << 20  # the receive buffer never grows
    ring = rx._ring
    assert ring is None or ring.arena.nbytes + ring.frames.nbytes <= RING_BOUND
    # the next connection brings a good acquisition: received bit-exact
    _send(rx, GOOD)
    events, errors = _drain(rx, k + 2)
    assert not errors, errors
    stacks = [e for e in events if isinstance(e, FrameStack)]
    got = np.concatenate([s.frames for s in stacks]) if stacks else None
    ids = np.concatenate([s.image_ids for s in stacks]) if stacks else None
    assert got is not None and np.array_equal(got, FRAMES) and ids.tolist() == [0, 1, 2]
    assert isinstance(events[-1], SeriesEnd) and events[-1].missing == 0


@FAST
@given(data=damaged())
def test_damaged_streams_are_counted_and_the_receiver_goes_on(receiver, data):
    _check_receiver(receiver, data)


@pytest.mark.slow
@LONG
@given(data=damaged())
def test_damaged_streams_long(receiver, data):
    _check_receiver(receiver, data)


def _parsers_raise_only_malformed(blob: bytes) -> None:
    for parse in (mib.parse_prefix, mib.parse_frame_header, mib.parse_acquisition_header):
        try:
            parse(blob)
        except MalformedMessage as exc:
            assert "\n" not in str(exc)


@FAST
@given(blob=st.binary(max_size=600) | damaged().map(lambda d: d[15:15 + 420]))
def test_parsers_raise_only_malformed(blob):
    _parsers_raise_only_malformed(blob)
    _parsers_raise_only_malformed(blob[:15])


@FAST
@given(fields=st.lists(st.text(alphabet="0123456789ABCDEFGHRUx., :\t\x00-", max_size=12), min_size=1, max_size=30))
def test_frame_headers_of_arbitrary_fields_raise_only_malformed(fields):
    for shutter in ("1E999", "nan", "-1", "inf"):  # the shutter time field of a header without MQ1A
        _parsers_raise_only_malformed(f"MQ1,000001,00384,01,0064,0008,U16,   1x1,01,t,{shutter},0,0,0,".encode()
                                      .ljust(384, b"\x00"))
    text = ("MQ1," + ",".join(fields)).encode("latin-1")
    _parsers_raise_only_malformed(text.ljust(384, b"\x00"))
    _parsers_raise_only_malformed(b"MQ1,000001,00384," + ",".join(fields).encode("latin-1").ljust(384, b"\x00"))
