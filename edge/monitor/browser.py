"""A headless Chromium driven over the Chrome DevTools Protocol (https://chromedevtools.github.io/devtools-protocol/),
to load the live view in a real browser from tests and benchmarks.

:class:`HeadlessChromium` starts ``chromium --headless --remote-debugging-port=0`` with a profile of its own,
reads the DevTools address it prints, and speaks the protocol's JSON messages over its page websocket
(aiohttp's client): ``Page.navigate``, ``Runtime.evaluate`` and ``Page.captureScreenshot``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
"""Executable names tried by :func:`find_chromium`, in order."""


class BrowserError(RuntimeError):
    """The browser could not be started, or a DevTools call failed."""


def find_chromium() -> str | None:
    """Path of the first of :data:`BROWSERS` on ``PATH``, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class HeadlessChromium:
    """One headless Chromium with one page, driven synchronously (context manager).

    Parameters
    ----------
    executable : str, optional
        The browser (default :func:`find_chromium`).
    window : (width, height)
        Viewport, CSS pixels.
    start_timeout_s : float
        How long to wait for the browser's DevTools address.

    Raises
    ------
    BrowserError
        No browser found, or it did not start.
    """

    def __init__(self, executable: str | None = None, window: tuple[int, int] = (1280, 1000),
                 start_timeout_s: float = 30.0) -> None:
        exe = executable or find_chromium()
        if exe is None:
            raise BrowserError(f"no Chromium found (tried {', '.join(BROWSERS)})")
        self._profile = tempfile.TemporaryDirectory(prefix="beamloop-chromium-")
        cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", "--remote-debugging-port=0",
               f"--user-data-dir={self._profile.name}", f"--window-size={window[0]},{window[1]}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._loop = asyncio.new_event_loop()
        self._ws: Any = None
        self._session: Any = None
        self._id = 0
        try:
            port = self._devtools_port(start_timeout_s)
            self._loop.run_until_complete(self._connect(port))
            self.call("Emulation.setDeviceMetricsOverride", width=int(window[0]), height=int(window[1]),
                      deviceScaleFactor=1, mobile=False)  # the viewport exactly, whatever the window frame takes
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout_s: float) -> int:
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            if port_file.exists():
                text = port_file.read_text().split()
                if text and text[0].isdigit():
                    return int(text[0])
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise BrowserError(f"chromium exited with status {self.proc.returncode}: {err[-400:]}")
            time.sleep(0.05)
        raise BrowserError(f"chromium gave no DevTools port within {timeout_s} s")

    async def _connect(self, port: int) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession()
        for _ in range(100):
            try:
                async with self._session.get(f"http://127.0.0.1:{port}/json/list") as r:
                    targets = await r.json(content_type=None)
                page = next((t for t in targets if t.get("type") == "page"), None)
                if page is not None:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        else:
            raise BrowserError("chromium has no page target")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def _call(self, method: str, params: dict | None = None) -> dict:
        self._id += 1
        mid = self._id
        await self._ws.send_str(json.dumps({"id": mid, "method": method, "params": params or {}}))
        while True:
            msg = json.loads((await self._ws.receive()).data)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error'].get('message')}")
                return msg.get("result", {})

    def call(self, method: str, **params) -> dict:
        """One DevTools call and its result (events in between are dropped).

        Raises
        ------
        BrowserError
            The browser answered with an error.
        """
        return self._loop.run_until_complete(self._call(method, params))

    def goto(self, url: str) -> None:
        """Load ``url`` in the page."""
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-compatible; awaited when it is a promise).

        Raises
        ------
        BrowserError
            The expression threw.
        """
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            text = r["exceptionDetails"].get("exception", {}).get("description") or r["exceptionDetails"].get("text")
            raise BrowserError(f"{expression[:60]!r} threw: {text}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0, poll_s: float = 0.1):
        """Evaluate ``expression`` until it is truthy; returns that value.

        Raises
        ------
        BrowserError
            Still falsy after ``timeout_s`` (the last value is in the message).
        """
        t_end = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < t_end:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(poll_s)
        raise BrowserError(f"{expression!r} still {value!r} after {timeout_s} s")

    def screenshot(self, path: str | Path) -> Path:
        """Save a PNG of the page's viewport to ``path``."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """Close the connection, stop the browser, remove its profile."""
        async def shut() -> None:
            if self._ws is not None:
                await self._ws.close()
            if self._session is not None:
                await self._session.close()

        try:
            self._loop.run_until_complete(shut())
        finally:
            self._loop.close()
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self._profile.cleanup()

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def version(executable: str | None = None) -> str:
    """The browser's version line (``chromium --version``), or empty when there is none."""
    exe = executable or find_chromium()
    if exe is None:
        return ""
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"[\w ]*\d+(\.\d+)+", out)
    return m.group(0).strip() if m else out.strip()
