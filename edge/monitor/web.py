"""The live view's web server: aiohttp (https://docs.aiohttp.org/) on an event loop in a thread of its own.

Routes:

=====================  ==================================================================================
``GET /``              the page (``static/index.html``: plain HTML and JavaScript, no build step)
``GET /api/state``     :meth:`beamloop.edge.monitor.board.MonitorBoard.state` as JSON
``GET /api/frame.png`` the latest kept frame as an 8-bit PNG (contrast from its 0.5th to 99.5th percentile)
``GET /api/image/X``   live image ``X`` (e.g. a 4D-STEM virtual image or CoM component) as a PNG
``GET /metrics``       Prometheus text format (:mod:`beamloop.edge.monitor.metrics`)
``POST /api/stop``     the operator's veto: the service is told to stop (it blanks the beam and ends as after
                       Ctrl-C), and the beam is blanked at once on a bridge connection of the server's own
=====================  ==================================================================================

Everything that reads the board, encodes a PNG or talks to the scan controller runs on one worker thread
(so the controller connection, a ZeroMQ socket, is only ever used by that thread), cached for
``1 / max_rate_hz`` seconds: any number of pages polling cost the service at most that many snapshots per
second, and nothing on its frame path.

Authentication (:mod:`beamloop.edge.monitor.auth`): bound to a loopback address the server needs none. Bound
beyond loopback it requires a bearer token on every route (``Authorization: Bearer T``, or ``?token=T`` in the
URL, which the page passes on); :class:`MonitorServer` refuses such a bind without one. The commands derive the
token from the bridge client's CURVE secret key (:func:`~beamloop.edge.monitor.auth.token_from_secret`).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from beamloop.edge.monitor.auth import MonitorAuthError, is_loopback, parse_http, token_from_secret
from beamloop.edge.monitor.board import MonitorBoard
from beamloop.edge.monitor.metrics import CONTENT_TYPE, registry_of, render

__all__ = ["ControllerLink", "MonitorAuthError", "MonitorServer", "is_loopback", "parse_http", "png_of",
           "token_from_secret"]

STATIC = Path(__file__).with_name("static")
"""Folder of the page."""

PNGS_KEPT = 4
"""Encoded frames the server keeps (by publication number) for pages a poll behind."""

def png_of(image: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> bytes:
    """An 8-bit grey PNG of a 2-D image, its contrast stretched from the ``lo_pct`` to the ``hi_pct`` percentile
    of its finite values (NaN pixels black). Runs in the web thread, never on the frame path.

    Raises
    ------
    ValueError
        Not a 2-D image.
    """
    from PIL import Image

    a = np.asarray(image, np.float32)
    if a.ndim != 2:
        raise ValueError(f"image of shape {a.shape}; expected 2-D")
    ok = np.isfinite(a)
    if ok.any():
        lo, hi = np.percentile(a[ok], [lo_pct, hi_pct])
    else:
        lo, hi = 0.0, 1.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    g = np.where(ok, np.rint(np.clip((a - lo) * scale, 0, 255)), 0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ControllerLink:
    """The web server's own connection to the scan controller (a :class:`~beamloop.edge.control.client.BridgeClient`
    keeping no beam log), opened on first use, used only by the server's worker thread: ``get_state`` at most
    once per ``state_period_s`` and ``blank``.

    Parameters
    ----------
    endpoint : str
        The bridge endpoint.
    keys : ClientKeys, optional
        The same CURVE keys as the service's client.
    timeout_ms : int
    state_period_s : float
    """

    def __init__(self, endpoint: str, keys=None, timeout_ms: int = 1000, state_period_s: float = 1.0) -> None:
        self.endpoint, self.keys, self.timeout_ms = endpoint, keys, int(timeout_ms)
        self.state_period_s = float(state_period_s)
        self._client: Any = None
        self._state: dict | None = None
        self._t = -float("inf")

    def _bridge(self):
        if self._client is None:
            from beamloop.edge.control.client import BridgeClient

            self._client = BridgeClient(self.endpoint, timeout_ms=self.timeout_ms, keys=self.keys, retries=0,
                                        log_limit=0)
        return self._client

    def state(self) -> dict | None:
        """``blanked``, ``probe_position``, ``watchdog_trips`` and ``refused_positions`` of the controller
        (cached for ``state_period_s``). Raises ``BridgeError`` when the call fails."""
        now = time.monotonic()
        if now - self._t >= self.state_period_s:
            self._t = now
            s = self._bridge().get_state()
            c = (s.get("safety") or {}).get("counters") or {}
            refused = int(c.get("refused_position", 0)) + int(c.get("refused_stale_frame", 0))
            self._state = {"blanked": s.get("blanked"), "probe_position": s.get("probe_position"),
                           "probe": s.get("probe"), "watchdog_trips": int(c.get("watchdog_trips", 0)),
                           "refused_positions": refused}
        return self._state

    def blank(self) -> dict:
        """``blank(True)`` now (a blank is never refused for its rate or sequence number); the reply."""
        return self._bridge().blank(True)

    def close(self) -> None:
        """Close the connection (from the worker thread)."""
        if self._client is not None:
            self._client.close()
            self._client = None


class MonitorServer:
    """The live view and ``/metrics`` of ``board`` on ``http://host:port``, served from a thread of its own.

    Parameters
    ----------
    board : MonitorBoard
    host : str
        Address to bind (default loopback).
    port : int
        TCP port; 0 picks a free one (:attr:`port` says which).
    token : str, optional
        Bearer token every route requires (module docstring); required beyond loopback.
    link : ControllerLink, optional
        The stop button's and the controller state's connection; without it the stop button only tells the
        service to stop (it blanks the beam itself on the way out).
    on_stop : callable(), optional
        Called (in the worker thread) when the stop button is pressed, after :meth:`MonitorBoard.request_stop`.
    max_rate_hz : float
        Snapshots per second at most (the state and the PNGs are cached between).

    Raises
    ------
    MonitorAuthError
        A non-loopback ``host`` without a token.
    """

    def __init__(self, board: MonitorBoard, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 link: ControllerLink | None = None, on_stop: Callable[[], None] | None = None,
                 max_rate_hz: float = 5.0) -> None:
        if not is_loopback(host) and not token:
            raise MonitorAuthError(f"--http {host}:{port} is beyond loopback: the live view can stop the beam, so it "
                                   "needs a token (give the bridge client keys, --keys and --server-key) or a "
                                   "loopback address")
        self.board, self.host, self.port = board, host, int(port)
        self.token = token
        self.link = link
        self.on_stop = on_stop
        self.period_s = 1.0 / float(max_rate_hz)
        self.registry = registry_of(board)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="beamloop-monitor")
        self._cache: dict[str, tuple[float, object]] = {}
        self._pngs: OrderedDict[int, bytes] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.requests = 0
        self.snapshots = 0

    @property
    def url(self) -> str:
        """The page's address (with the token when one is needed; this machine's host name for a wildcard bind)."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    # the worker thread's jobs ----------------------------------------------------------------------------------
    def _cached(self, key: str, make: Callable[[], object]) -> object:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.period_s:
            return hit[1]
        value = make()
        self._cache[key] = (now, value)
        return value

    def _state_json(self) -> bytes:
        def make() -> bytes:
            self.snapshots += 1
            fv = self.board.frame_copy()
            if fv is not None and fv.seq not in self._pngs:
                self._pngs[fv.seq] = png_of(fv.image)  # the image of exactly this state's columns
                while len(self._pngs) > PNGS_KEPT:
                    self._pngs.popitem(last=False)
            s = self.board.state(fv)
            if self.link is not None and s.get("controller") is None:
                try:
                    s["controller"] = self.link.state()
                except Exception as exc:  # noqa: BLE001 - shown on the page; the service goes on
                    s["controller"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            ctl = s.get("controller") or {}
            for k in ("watchdog_trips", "refused_positions"):
                if isinstance(ctl.get(k), int):
                    s["counters"][k] = max(s["counters"].get(k, 0), ctl[k])
            return json.dumps(s, allow_nan=False).encode()

        return self._cached("state", make)  # type: ignore[return-value]

    def _frame_png(self, seq: int | None = None) -> bytes | None:
        """The PNG of frame ``seq`` (a state snapshot's ``frame.seq``, so that the page's columns and image
        agree) while it is held, else of the latest frame; None before the first frame."""
        if seq is not None and seq in self._pngs:
            return self._pngs[seq]
        fv = self.board.frame_copy()
        if fv is None:
            return None
        if fv.seq not in self._pngs:
            self._pngs[fv.seq] = png_of(fv.image)
            while len(self._pngs) > PNGS_KEPT:
                self._pngs.popitem(last=False)
        return self._pngs[fv.seq]

    def _image_png(self, name: str) -> bytes | None:
        def make():
            imgs = self.board.images() if self.board.images is not None else {}
            return None if name not in imgs else png_of(imgs[name])

        return self._cached("image:" + name, make)  # type: ignore[return-value]

    def _stop(self) -> dict:
        self.board.request_stop()
        if self.on_stop is not None:
            self.on_stop()
        out: dict = {"stopped": True, "blanked": None}
        if self.link is not None:
            try:
                out["blanked"] = bool(self.link.blank().get("blanked", True))
            except Exception as exc:  # noqa: BLE001 - the service still blanks on its way out
                out["blanked"], out["error"] = False, f"{type(exc).__name__}: {exc}"[:200]
        return out

    # aiohttp ---------------------------------------------------------------------------------------------------
    def _authorized(self, request) -> bool:
        if not self.token:
            return True
        given = request.query.get("token", "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _app(self):
        from aiohttp import web

        loop = asyncio.get_running_loop()

        async def job(fn, *args):
            return await loop.run_in_executor(self._pool, fn, *args)

        @web.middleware
        async def guard(request, handler):
            self.requests += 1
            if not self._authorized(request):
                return web.Response(status=401, text="token required\n", headers={"WWW-Authenticate": "Bearer"})
            return await handler(request)

        async def index(request):
            return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

        async def state(request):
            return web.Response(body=await job(self._state_json), content_type="application/json",
                                headers={"Cache-Control": "no-store"})

        async def frame(request):
            seq = request.query.get("seq", "")
            data = await job(self._frame_png, int(seq) if seq.isdigit() else None)
            if data is None:
                return web.Response(status=404, text="no frame yet\n")
            return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "no-store"})

        async def image(request):
            data = await job(self._image_png, request.match_info["name"])
            if data is None:
                return web.Response(status=404, text=f"no image {request.match_info['name']!r}\n")
            return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "no-store"})

        async def metrics(request):
            body = await job(render, self.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

        async def stop(request):
            return web.json_response(await job(self._stop))

        app = web.Application(middlewares=[guard])
        app.add_routes([web.get("/", index), web.get("/api/state", state), web.get("/api/frame.png", frame),
                        web.get("/api/image/{name}", image), web.get("/metrics", metrics),
                        web.post("/api/stop", stop)])
        return app

    def _serve(self, sock) -> None:
        from aiohttp import web

        async def main() -> None:
            self._runner = web.AppRunner(self._app(), access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            self._ready.set()

        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(main())
            loop.run_forever()
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()
        finally:
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

    def start(self, timeout_s: float = 10.0) -> MonitorServer:
        """Bind and serve in a daemon thread; returns once it serves.

        Raises
        ------
        OSError
            The address cannot be bound (e.g. the port is taken).
        RuntimeError
            The server did not start within ``timeout_s``.
        """
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="beamloop-monitor-http", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"the live view did not start within {timeout_s} s")
        if self._error is not None:
            err = self._error
            self._thread.join(timeout_s)
            raise err
        return self

    def stop(self) -> None:
        """Stop serving, close the controller connection (in the worker thread) and the worker."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if self.link is not None:
            self._pool.submit(self.link.close).result(10)
        self._pool.shutdown(wait=True)

    def __enter__(self) -> MonitorServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_live_images(http: tuple[str, int], images: Callable[[], dict], counters: Callable[[], dict] | None = None,
                      *, token: str | None = None) -> MonitorServer:
    """The live view of a detector stream without a frame path (``receive --scan --http``): live images (4D-STEM
    virtual images and CoM, e.g. :attr:`beamloop.edge.analysis.live4d.LiveImager.images`) and counters (the
    receiver's ``counters.as_dict()``), on the page and ``/metrics``; started.

    Parameters
    ----------
    http : (host, port)
    images : callable() -> dict
        Name -> 2-D float array (NaN where not yet scanned), read by the web thread at its own rate.
    counters : callable() -> dict, optional
        Counter name -> int (names of :data:`beamloop.edge.monitor.board.COUNTER_NAMES` are shown).
    token : str, optional
        Required beyond loopback (:func:`~beamloop.edge.monitor.auth.token_from_secret`).

    Raises
    ------
    MonitorAuthError
        Beyond loopback without a token.
    OSError
        The address cannot be bound.
    """
    board = MonitorBoard(images=images, counters=counters)
    return MonitorServer(board, http[0], http[1], token=token).start()
