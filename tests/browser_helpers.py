"""A real headless browser for the report tests: Debian's ``chromium`` driven over the Chrome
DevTools Protocol (CDP), with a minimal WebSocket client of the standard library (RFC 6455: text
frames, masking, fragmentation, ping; nothing more is needed to talk to one local browser).

``Browser`` starts ``chromium --headless --no-sandbox --disable-gpu --remote-debugging-port=0`` with a
fresh ``--user-data-dir``, reads the port from its ``DevToolsActivePort`` file, attaches to one page
and records what the page reports: console calls (``Runtime.consoleAPICalled``), uncaught exceptions
(``Runtime.exceptionThrown``), browser log entries (``Log.entryAdded``: failed loads, CSP
violations), every request (``Network.requestWillBeSent``) and JavaScript dialogs. ``evaluate`` runs
JavaScript in the page, ``screenshot`` returns a PNG (``Page.captureScreenshot``).

Also a script: ``python tests/browser_helpers.py REPORT.html OUT.png [--height PX]`` writes the
screenshot of a report (docs/report.png is made this way).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def find_chromium() -> str | None:
    """The chromium executable (``$QMARGIN_CHROMIUM``, else ``chromium`` on the PATH), or None."""
    env = os.environ.get("QMARGIN_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class CDPError(RuntimeError):
    pass


# -- a minimal WebSocket client (RFC 6455) ---------------------------------------------------------


class WebSocket:
    def __init__(self, url: str, timeout: float = 20.0) -> None:
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        request = (
            f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode("ascii"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise CDPError("the browser closed the WebSocket handshake")
            head += chunk
        head, self._buf = head.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise CDPError(f"WebSocket handshake refused: {status!r}")

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise CDPError("the browser closed the connection")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode("utf-8"))

    def recv(self) -> str:
        """The next text message (continuation frames joined; pings answered)."""
        parts: list[bytes] = []
        while True:
            b0, b1 = self._read(2)
            opcode, fin = b0 & 0x0F, b0 & 0x80
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else b""
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise CDPError("the browser closed the WebSocket")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x1, 0x0):
                parts.append(payload)
                if fin:
                    return b"".join(parts).decode("utf-8")

    def close(self) -> None:
        with suppress(OSError):
            self._send_frame(0x8, b"")
        self.sock.close()


# -- the browser -----------------------------------------------------------------------------------


class Browser:
    """One headless chromium with one page attached (use as a context manager)."""

    def __init__(self, executable: str | None = None, *, width: int = 1280, height: int = 900) -> None:
        exe = executable or find_chromium()
        if exe is None:
            raise CDPError("chromium is not installed")
        self.profile = tempfile.mkdtemp(prefix="qmargin-chromium-")
        self.proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--force-color-profile=srgb",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.events: list[dict[str, Any]] = []
        self._id = 0
        try:
            port, path = self._devtools_port()
            self.ws = WebSocket(f"ws://127.0.0.1:{port}{path}")
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.send(f"{domain}.enable", session=True)
            self.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                session=True,
            )
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout: float = 30.0) -> tuple[int, str]:
        f = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with status {self.proc.returncode}")
            try:
                lines = f.read_text().splitlines()
                if len(lines) >= 2:
                    return int(lines[0]), lines[1]
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise CDPError("chromium did not open its DevTools port")

    # -- protocol ---------------------------------------------------------------------------------
    def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = False
    ) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 20.0) -> dict[str, Any]:
        """The first event ``method`` not consumed yet (waiting for it)."""
        deadline = time.monotonic() + timeout
        while True:
            for _i, ev in enumerate(self.events):
                if ev["method"] == method and not ev.get("_seen"):
                    ev["_seen"] = True
                    return ev
            if time.monotonic() > deadline:
                raise CDPError(f"no {method} within {timeout} s")
            self.ws.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                msg = json.loads(self.ws.recv())
            except TimeoutError:
                continue
            finally:
                self.ws.sock.settimeout(20.0)
            if "method" in msg:
                self.events.append(msg)

    # -- what tests use ---------------------------------------------------------------------------
    def open(self, path: str | Path) -> None:
        """Load a local file and wait for its load event (events of earlier pages are dropped)."""
        self.events.clear()
        url = Path(path).resolve().as_uri()
        self.send("Page.navigate", {"url": url}, session=True)
        self.wait_for("Page.loadEventFired")
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))", promise=True)

    def evaluate(self, expression: str, *, promise: bool = False) -> Any:
        res = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": promise},
            session=True,
        )
        if "exceptionDetails" in res:
            raise CDPError(f"JavaScript error: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, browser log errors and warnings,
        JavaScript dialogs, since the page was opened."""
        out = []
        for ev in self.events:
            p, m = ev.get("params", {}), ev["method"]
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(
                    f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p['args']]}"
                )
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails']}")
            elif m == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Page.javascriptDialogOpening":
                out.append(f"dialog: {p.get('message')}")
        return out

    def requests(self) -> list[str]:
        """URLs of every request the page made since it was opened."""
        return [
            ev["params"]["request"]["url"]
            for ev in self.events
            if ev["method"] == "Network.requestWillBeSent"
        ]

    def screenshot(self, clip: dict[str, float] | None = None) -> bytes:
        """A PNG of the viewport, or of ``clip`` (``x``, ``y``, ``width``, ``height`` in page pixels,
        also below the fold)."""
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
            params["captureBeyondViewport"] = True
        return base64.b64decode(self.send("Page.captureScreenshot", params, session=True)["data"])

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            with suppress(CDPError, OSError):
                self.send("Browser.close")
            ws.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def browser(**kwargs: Any) -> Iterator[Browser]:
    b = Browser(**kwargs)
    try:
        yield b
    finally:
        b.close()


def main(argv: list[str]) -> int:
    """``browser_helpers.py REPORT.html OUT.png [--height PX] [--width PX]``: a screenshot of the
    report's top ``PX`` pixels (default 1500)."""
    args = list(argv)
    opts = {"--height": 1500, "--width": 1100}
    for flag in list(opts):
        if flag in args:
            i = args.index(flag)
            opts[flag] = int(args[i + 1])
            del args[i : i + 2]
    report, out = Path(args[0]), Path(args[1])
    with browser(width=opts["--width"], height=900) as b:
        b.open(report)
        problems = b.problems()
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        png = b.screenshot({"x": 0, "y": 0, "width": opts["--width"], "height": opts["--height"]})
    out.write_bytes(png)
    print(f"wrote {out} ({len(png)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
