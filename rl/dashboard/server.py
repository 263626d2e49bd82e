"""The dashboard's HTTP server: the page, its scripts (plotly.js from the installed plotly package, so the page
works offline), JSON endpoints, and a server-sent-events stream of what one or more run directories gain
(several: the page overlays their curves to compare the runs).

Why the standard library (`http.server.ThreadingHTTPServer` in daemon threads) and not uvicorn/aiohttp: the
server lives inside the driver, whose main thread runs the controller's asyncio loop; a thread per open page
with blocking reads never touches that loop, needs no second event loop, no signal handlers and no new
dependency, and a few pages at once is all a dashboard serves.

Live updates: one poller thread refreshes each run's `RunReader` (rl.dashboard.reader) every `poll_s`, or at
once when `poke()` is called (MetricsLogger does after each step). Each page holds one `GET /events` stream:
a `snapshot` event per run with everything, then a `delta` event for a run with only what it appended
whenever it changed, a comment every `KEEPALIVE_S` otherwise, and an `end` event when a live run's server
stops. Every event's data names its run by position (`run`: 0, 1, ...).

A browser that goes away (a closed tab, a reset connection) ends its request thread quietly: the server
logs it at debug level instead of printing socketserver's traceback on the console.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from rl.dashboard.reader import RunReader

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 10.0
FINAL_PUSH_S = 2.0  # at stop, how long open pages get to receive the last state


def plotly_js() -> Path:
    """plotly.min.js bundled in the plotly Python package (no CDN: the page must work without network)."""
    try:
        import plotly
    except ImportError as exc:
        raise ImportError("the dashboard needs the plotly package for its charts: pip install plotly") from exc
    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise FileNotFoundError(f"plotly.min.js not found in the plotly package at {path}; reinstall plotly")
    return path


class QuietHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that takes a client hanging up as normal, not as an error to print."""

    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # reset, aborted, broken pipe: the page went away
            log.debug("dashboard: %s went away (%s)", client_address, exc)
        else:
            log.warning("dashboard: a request from %s failed", client_address, exc_info=True)


class DashboardServer:
    """Serves one run directory, or several to compare. `start()` in background threads (a live run), or
    `serve_forever()`."""

    def __init__(self, run_dir: Path | list[Path], host: str = "127.0.0.1", port: int = 0,
                 poll_s: float = 0.5) -> None:
        dirs = [Path(d) for d in run_dir] if isinstance(run_dir, (list, tuple)) else [Path(run_dir)]
        self.readers = [RunReader(d) for d in dirs]
        self.run_dir, self.reader = dirs[0], self.readers[0]
        self.poll_s = poll_s
        self.files = {"/": (STATIC / "index.html", "text/html; charset=utf-8"),
                      "/static/app.js": (STATIC / "app.js", "text/javascript; charset=utf-8"),
                      "/static/style.css": (STATIC / "style.css", "text/css; charset=utf-8"),
                      "/static/plotly.min.js": (plotly_js(), "text/javascript; charset=utf-8")}
        self.cond = threading.Condition()
        self.seq = 0  # bumped on every change the reader sees
        self.stopping = False
        self.streams = 0  # open /events streams
        self.wake = threading.Event()
        self.httpd = QuietHTTPServer((host, port), _handler(self))
        self.host = host
        self.port = self.httpd.server_address[1]
        self.threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host = node_ip() if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> "DashboardServer":
        self.refresh()
        for target, name in ((self.httpd.serve_forever, "dashboard-http"), (self._poll, "dashboard-poll")):
            t = threading.Thread(target=target, name=f"streamrl-{name}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def serve_forever(self) -> None:
        """Serve until Ctrl-C (`streamrl dashboard RUN_DIR`)."""
        self.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def poke(self) -> None:
        """Something was written: look now instead of at the next poll."""
        self.wake.set()

    def stop(self, final: bool = False) -> None:
        """Stop serving. `final` (the run ended): read the files once more and give open pages up to
        FINAL_PUSH_S to receive that last state and the `end` event."""
        if final and self.refresh():
            self._bump()
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            if final:
                self.cond.wait_for(lambda: self.streams == 0, timeout=FINAL_PUSH_S)
        self.wake.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self.threads:
            t.join(timeout=5)

    def refresh(self) -> bool:
        """Read what every run directory gained; True if any changed."""
        return any([reader.refresh() for reader in self.readers])  # a list: refresh them all

    # ------------------------------------------------------------------ internals
    def _poll(self) -> None:
        while not self.stopping:
            try:
                if self.refresh():
                    self._bump()
            except Exception:  # a file caught mid-write in a way not foreseen: try again next time
                log.exception("dashboard: reading %s failed; retrying", ", ".join(str(r.run_dir) for r in self.readers))
            self.wake.wait(self.poll_s)
            self.wake.clear()

    def _bump(self) -> None:
        with self.cond:
            self.seq += 1
            self.cond.notify_all()

    def wait_change(self, seen: int, timeout: float) -> int:
        """The change counter once it differs from `seen`, or the server stops, or `timeout` passes."""
        with self.cond:
            self.cond.wait_for(lambda: self.seq != seen or self.stopping, timeout=timeout)
            return self.seq


def node_ip() -> str:
    """The address other machines reach this one by: Ray's node IP when Ray runs, else the host name's."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _handler(server: DashboardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                if url.path in server.files:
                    path, ctype = server.files[url.path]
                    self._send(HTTPStatus.OK, path.read_bytes(), ctype,
                               cache="max-age=86400" if url.path.endswith(".min.js") else "no-cache")
                elif url.path == "/api/snapshot":
                    self._json(self._reader(query).snapshot())
                elif url.path == "/api/samples":
                    self._json(self._reader(query).search_samples(query.get("q", ""),
                                                                 _int(query.get("limit"), 100, 1, 1000)))
                elif url.path == "/events":
                    self._events()
                elif url.path == "/healthz":
                    self._send(HTTPStatus.OK, b"ok\n", "text/plain")
                else:
                    self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
            except ConnectionError:
                pass  # the page went away

        def _reader(self, query: dict[str, str]) -> RunReader:
            """The run `?run=N` names (0, the first, by default)."""
            return server.readers[_int(query.get("run"), 0, 0, len(server.readers) - 1)]

        def _events(self) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Accel-Buffering", "no")  # a proxy in front must not buffer the stream
            self.end_headers()
            self.close_connection = True
            with server.cond:
                server.streams += 1
            try:
                seen = server.seq
                cursors, versions = [], []
                for i, reader in enumerate(server.readers):
                    versions.append(reader.version)
                    snap = reader.snapshot()
                    cursors.append(snap["cursor"])
                    self._event("snapshot", {**snap, "run": i, "runs": len(server.readers)}, retry_ms=2000)
                while True:
                    seq = server.wait_change(seen, KEEPALIVE_S)
                    if seq == seen and not server.stopping:
                        self.wfile.write(b": keepalive\n\n")
                        self.wfile.flush()
                        continue
                    seen = seq
                    for i, reader in enumerate(server.readers):
                        if reader.version != versions[i] or server.stopping:
                            versions[i] = reader.version
                            delta = reader.delta(cursors[i])
                            cursors[i] = delta["cursor"]
                            self._event("delta", {**delta, "run": i})
                    if server.stopping:
                        self._event("end", {"status": server.reader.status})
                        return
            except OSError:  # the page went away (ConnectionError is an OSError)
                return
            finally:
                with server.cond:
                    server.streams -= 1
                    server.cond.notify_all()

        def _event(self, name: str, data: Any, retry_ms: int | None = None) -> None:
            head = f"retry: {retry_ms}\n" if retry_ms else ""
            self.wfile.write(f"{head}event: {name}\ndata: {json.dumps(data, allow_nan=False)}\n\n".encode())
            self.wfile.flush()

        def _json(self, data: Any) -> None:
            self._send(HTTPStatus.OK, json.dumps(data, allow_nan=False).encode(), "application/json")

        def _send(self, status: HTTPStatus, body: bytes, ctype: str, cache: str = "no-cache") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", cache)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            log.debug("dashboard %s: " + format, self.address_string(), *args)

    return Handler


def _int(text: str | None, default: int, lo: int, hi: int) -> int:
    try:
        return min(max(int(text), lo), hi) if text is not None else default
    except ValueError:
        return default
