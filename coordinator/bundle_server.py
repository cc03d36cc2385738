"""Read-only HTTP server for the bundle directory, with Range requests so downloads resume.

`fedclip-coord serve` runs one next to the MQTT side: bundles (hundreds of MB) and adapters past the
MQTT size limit travel here, never over the broker. Only GET and HEAD; only regular files under the
root (no listings, no `..`, no symlinks that leave the root); bound to 127.0.0.1 unless an address
is given, because a fleet usually reaches the coordinator through a VPN or a reverse proxy.

Each connection has a thread, so a client must not hold one for free: a connection that sends
nothing (or reads nothing) for `timeout` seconds is closed, and past `max_connections` open at once
a new one gets `503 Service Unavailable` with `Retry-After` and is closed (agents retry downloads).
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fedclip.sdk.errors import ConfigError
from fedclip.sdk.fsutil import atomic_write

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Each write must finish within the connection timeout (sendall's timeout covers the whole call), so
# chunks stay small: 64 KiB in 30 s is ~2 KB/s, slower than any link a device downloads a bundle over.
_COPY_CHUNK = 64 << 10
DEFAULT_TIMEOUT = 30.0  # seconds a connection may stay silent (idle keep-alive, a stalled reader)
DEFAULT_MAX_CONNECTIONS = 64
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 24\r\nConnection: close\r\n\r\n503 Service Unavailable\n"
)


class _Handler(BaseHTTPRequestHandler):
    server_version = "fedclip-bundles"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    @property
    def root(self) -> Path:
        return self.server.root  # type: ignore[attr-defined]  # our _Server, given root by start()

    def setup(self) -> None:
        # StreamRequestHandler applies `self.timeout` to the socket: reads and writes both.
        self.timeout = self.server.conn_timeout  # type: ignore[attr-defined,misc]  # per connection, from our server
        super().setup()

    def log_message(self, fmt: str, *args) -> None:  # route to logging, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def _resolve(self) -> Path | None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        # Dot-names are work in progress (`.tmp`, `.part`) or private: never served.
        if not rel or "\x00" in rel or any(p.startswith(".") for p in rel.split("/")):
            return None
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path

    def _error(self, status: HTTPStatus, extra: dict[str, str] | None = None) -> None:
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _not_allowed(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _serve(self, head: bool) -> None:
        path = self._resolve()
        if path is None:
            self._error(HTTPStatus.NOT_FOUND)
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        status = HTTPStatus.OK
        header = self.headers.get("Range")
        if header:
            m = _RANGE.match(header.strip())
            if m is None or (not m.group(1) and not m.group(2)):
                self._error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})
                return
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:  # suffix range: the last N bytes
                start, end = max(0, size - int(m.group(2))), size - 1
            if start >= size or start > end:
                self._error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})
                return
            status = HTTPStatus.PARTIAL_CONTENT
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head or not length:
            return
        try:
            with open(path, "rb") as f:
                f.seek(start)
                self.send_body(f, length)
        except (BrokenPipeError, ConnectionResetError):
            log.info("client %s left during %s", self.address_string(), path.name)
        except TimeoutError:
            log.info("client %s stalled during %s; closed", self.address_string(), path.name)
            self.close_connection = True

    def send_body(self, f, length: int) -> None:
        left = length
        while left > 0:
            chunk = f.read(min(_COPY_CHUNK, left))
            if not chunk:
                break
            self.wfile.write(chunk)
            left -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    conn_timeout = DEFAULT_TIMEOUT

    def set_limit(self, max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket, client_address) -> None:
        # Answered on the accept thread, so it must never block: a short send timeout, no reading.
        log.warning("bundle server: %s refused, all connections busy", client_address[0])
        try:
            request.settimeout(1.0)
            request.sendall(_BUSY)
            # Read what the client already sent: closing with unread bytes would send a reset,
            # which can discard the 503 before the client reads it.
            request.setblocking(False)
            request.recv(65536)
        except OSError:
            pass
        self.shutdown_request(request)


class BundleServer:
    """Serve `root` read-only over HTTP on `host:port` (port 0 picks a free one) in a thread.

    Use as a context manager, or `start()` / `stop()`; `url` is the base URL agents download from.
    """

    def __init__(
        self,
        root: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        handler: type = _Handler,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ConfigError(f"bundle server: {root} is not a directory")
        if not timeout > 0 or max_connections < 1:
            raise ConfigError("bundle server: timeout must be > 0 and max_connections >= 1")
        self.host, self.port = host, port
        self.timeout, self.max_connections = timeout, max_connections
        self._handler = handler
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise ConfigError("bundle server: not started")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self._server.server_address[1]}"

    def start(self) -> BundleServer:
        try:
            self._server = _Server((self.host, self.port), self._handler)
        except OSError as e:
            raise ConfigError(
                f"bundle server: cannot listen on {self.host}:{self.port} ({e.strerror or e})"
            ) from None
        self._server.root = self.root  # type: ignore[attr-defined]  # read by _Handler.root
        self._server.conn_timeout = self.timeout
        self._server.set_limit(self.max_connections)
        self._thread = threading.Thread(target=self._server.serve_forever, name="bundle-server", daemon=True)
        self._thread.start()
        log.info("serving %s read-only at %s", self.root, self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> BundleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def publish_file(root: str | Path, name: str, data: bytes) -> Path:
    """Place `data` under the served root atomically (adapters too large for MQTT go here)."""
    return atomic_write(Path(root) / name, data)


__all__ = ["BundleServer", "publish_file"]
