"""A compiled receive loop for SIMPLON v1 images: numba calling libzmq directly, no Python per frame.

At ~100k frames per second even a few microseconds of Python per frame is the bottleneck. Once a series'
first image has been validated in Python (:class:`beamloop.streams.dectris.simplon.SimplonAdapter`), its three JSON
parts are known byte for byte except for a few numbers and the hash (``_Template``). This module's numba kernel
then receives image after image with ``zmq_recv`` (the libzmq that pyzmq itself loaded, through ctypes, on
the socket's own handle ``zmq.Socket.underlying``; libzmq API ``zmq_recv(3)``, ``zmq_getsockopt(3)``
``ZMQ_RCVMORE``), checks each JSON part against its template (the same test the Python path makes), and reads
each blob straight into its slot of the receiver's arena, until the stack is full, the socket is empty, or a
message deviates in any way. An image whose id is not the next one expected deviates too: the kernel keeps no
frame-id bookkeeping, :class:`beamloop.streams._ids.FrameIdTracker` does it all. A deviating message is handed
back with the parts already read, and the Python path finishes it (with the full checks and the clear errors);
so behaviour is identical, only faster.

The kernel runs with the GIL released. If libzmq cannot be located (``available()`` is False) receivers
simply stay on the Python path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import numba
import numpy as np

log = logging.getLogger(__name__)

ZMQ_RCVMORE = 13
ZMQ_DONTWAIT = 1
EAGAIN = 11

# return codes of recv_images
FULL, EMPTY, DEVIATE, ERROR = 0, 1, 2, 3


def _libzmq_path() -> str | None:
    """Path of the libzmq that pyzmq loaded (from ``/proc/self/maps``), else the system's, else None."""
    import zmq  # noqa: F401  (loads libzmq into the process)

    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libzmq" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return ctypes.util.find_library("zmq")


def _load():
    """ctypes bindings of ``zmq_recv``, ``zmq_getsockopt``, ``zmq_errno``, or None without a libzmq."""
    path = _libzmq_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    recv = lib.zmq_recv
    recv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    recv.restype = ctypes.c_int
    getopt = lib.zmq_getsockopt
    getopt.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    getopt.restype = ctypes.c_int
    errno = lib.zmq_errno
    errno.argtypes = []
    errno.restype = ctypes.c_int
    return recv, getopt, errno


_FUNCS = _load()


def available() -> bool:
    """True when libzmq's C functions could be bound (Linux with pyzmq: always)."""
    return _FUNCS is not None


if _FUNCS is not None:
    _zmq_recv, _zmq_getsockopt, _zmq_errno = _FUNCS

    @numba.njit(nogil=True, cache=False)
    def _more(sock, optval, optlen):
        optlen[0] = 4
        _zmq_getsockopt(sock, ZMQ_RCVMORE, optval.ctypes.data, optlen.ctypes.data)
        return optval[0] != 0

    @numba.njit(nogil=True, cache=False)
    def _match(buf, n, tpl, holes, vals):
        """Does ``buf[:n]`` equal template ``tpl`` except in its holes? Hole values go to ``vals``.

        ``holes[h] = (start, kind, end)``: the hole is ``tpl[start:end]`` of the learnt message; kind 0 is a
        JSON integer (no leading zero, at most 18 digits), kind 1 a run of hex digits.
        """
        i = 0
        t = 0
        for h in range(holes.shape[0]):
            hs = holes[h, 0]
            ln = hs - t
            if i + ln > n:
                return False
            for q in range(ln):
                if buf[i + q] != tpl[t + q]:
                    return False
            i += ln
            start = i
            if holes[h, 1] == 0:
                v = 0
                while i < n and 48 <= buf[i] <= 57:
                    v = v * 10 + (buf[i] - 48)
                    i += 1
                nd = i - start
                if nd == 0 or nd > 18 or (nd > 1 and buf[start] == 48):
                    return False
                vals[h] = v
            else:
                while i < n and ((48 <= buf[i] <= 57) or (97 <= buf[i] <= 102) or (65 <= buf[i] <= 70)):
                    i += 1
                vals[h] = i - start
            t = holes[h, 2]
        ln = tpl.shape[0] - t
        if i + ln != n:
            return False
        for q in range(ln):
            if buf[i + q] != tpl[t + q]:
                return False
        return True

    @numba.njit(nogil=True, cache=False)
    def recv_images(sock, hbuf, cap, tpl0, holes0, tpl1, holes1, tpl3, holes3, idx, series, next_id, arena,
                    capacity, slot0, room, lengths, ids, times, state, lens, optval, optlen):
        """Receive up to ``room`` SIMPLON v1 images with the consecutive ids ``next_id, next_id + 1, ...`` into
        slots ``slot0..`` of ``arena``.

        Parameters (arrays are the receiver's, written in place)
        ----------
        sock : int
            libzmq socket handle.
        hbuf : uint8 (4, cap)
            Buffers for the header parts (index 2 unused).
        tpl*, holes* : learnt templates of dimage, dimage_d, dconfig parts.
        idx : int64 (6,)
            Hole index of frame, series (dimage), size (dimage_d), start, stop, real time (dconfig).
        series : int
            Open series number.
        next_id : int
            Id the first image must have; every further one, the next.
        arena : uint8, capacity : int
            Blob slots.
        lengths, ids : int64 (room,), times : int64 (room, 3)
            Outputs per received frame.
        state : int64 (2,)
            ``[bytes received, part index of a deviating message]``.
        lens : int64 (4,)
            Lengths of the parts read of a deviating message.

        Returns
        -------
        (code, k)
            ``k`` frames received, with ids ``next_id .. next_id + k - 1``; code FULL, EMPTY (no message
            waiting), DEVIATE (the message at ``k`` needs the Python path; ``state[1]`` parts of it were read)
            or ERROR (zmq error, ``lens[0]`` = errno).
        """
        v0 = np.zeros(holes0.shape[0], np.int64)
        v1 = np.zeros(holes1.shape[0], np.int64)
        v3 = np.zeros(holes3.shape[0], np.int64)
        k = 0
        while k < room:
            n0 = _zmq_recv(sock, hbuf[0].ctypes.data, cap, ZMQ_DONTWAIT)
            if n0 < 0:
                e = _zmq_errno()
                if e == EAGAIN:
                    return EMPTY, k
                lens[0] = e
                return ERROR, k
            lens[0] = n0
            state[1] = 1
            if (n0 > cap or not _match(hbuf[0], n0, tpl0, holes0, v0) or v0[idx[1]] != series
                    or v0[idx[0]] != next_id + k):
                return DEVIATE, k
            if not _more(sock, optval, optlen):
                return DEVIATE, k
            n1 = _zmq_recv(sock, hbuf[1].ctypes.data, cap, 0)
            lens[1] = n1
            state[1] = 2
            if n1 < 0 or n1 > cap or not _match(hbuf[1], n1, tpl1, holes1, v1):
                return DEVIATE, k
            if not _more(sock, optval, optlen):
                return DEVIATE, k
            slot = slot0 + k
            n2 = _zmq_recv(sock, arena[slot * capacity:].ctypes.data, capacity, 0)
            lens[2] = n2
            state[1] = 3
            if n2 < 0 or n2 > capacity or n2 != v1[idx[2]]:
                return DEVIATE, k
            if not _more(sock, optval, optlen):
                return DEVIATE, k
            n3 = _zmq_recv(sock, hbuf[3].ctypes.data, cap, 0)
            lens[3] = n3
            state[1] = 4
            if n3 < 0 or n3 > cap or not _match(hbuf[3], n3, tpl3, holes3, v3):
                return DEVIATE, k
            if _more(sock, optval, optlen):
                state[1] = 5
                return DEVIATE, k
            ids[k] = next_id + k
            lengths[k] = n2
            times[k, 0] = v3[idx[3]]
            times[k, 1] = v3[idx[4]]
            times[k, 2] = v3[idx[5]]
            state[0] += n0 + n1 + n2 + n3
            k += 1
        return FULL, k


_warm = False


def warm_up() -> None:
    """Compile :func:`recv_images` now (a few seconds, once per process), not when the first images arrive."""
    global _warm
    if _warm or _FUNCS is None:
        return
    u8, i64 = np.zeros(8, np.uint8), np.zeros(8, np.int64)
    holes = np.zeros((1, 3), np.int64)
    times = np.zeros((2, 3), np.int64)
    recv_images(0, np.zeros((4, 8), np.uint8), 8, u8, holes, u8, holes, u8, holes, i64[:6], 0, 0, u8, 8, 0, 0,
                i64[:2], i64[2:4], times, i64[4:6], np.zeros(4, np.int64), np.zeros(1, np.int32),
                np.zeros(1, np.uint64))
    _warm = True
