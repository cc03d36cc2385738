"""The operator's HTTP endpoint of a coordinator: Prometheus `/metrics` and the read-only dashboard.

Routes (GET/HEAD only; anything else is 405): `/` the dashboard page, `/assets/<file>` its static
files (`dashboard_assets/`, vendored uPlot included), `/api/fleet` the JSON document the page polls
(`FleetView.document`), `/metrics` the Prometheus text format, `/healthz`. Everything is read from
the state dir on request, so this server never changes the coordinator's state and runs the same
inside `fedclip-coord serve` and alone (`fedclip-coord dashboard`). Bound to 127.0.0.1 unless told
otherwise; with credentials every route needs HTTP basic auth (Prometheus scrapes with `basic_auth`).
"""

from __future__ import annotations

import base64
import hmac
import logging
import sqlite3
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from fedclip.coordinator.bundle_server import BundleServer
from fedclip.coordinator.fleet_view import FleetView
from fedclip.coordinator.json_out import dumps
from fedclip.coordinator.prom import registry_for, render
from fedclip.sdk.errors import ConfigError, FedclipError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).with_name("dashboard_assets")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8"}  # fmt: skip


def read_credentials(path: str | Path) -> tuple[str, str]:
    """`user:password` from the first line of `path` (a file, so the password is not in `ps`)."""
    try:
        line = Path(path).read_text().splitlines()[0].strip() if Path(path).stat().st_size else ""
    except OSError as e:
        raise ConfigError(f"ops auth file {path}: cannot read ({e.strerror or e})") from None
    user, sep, password = line.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"ops auth file {path}: first line must be user:password")
    return user, password


class _Handler(BaseHTTPRequestHandler):
    server_version = "fedclip-ops"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    ops: OpsServer  # set on the per-server subclass

    def log_message(self, fmt: str, *args) -> None:  # route to logging, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, text: str = "", extra: dict[str, str] | None = None) -> None:
        body = f"{status.value} {status.phrase}{': ' + text if text else ''}\n".encode()
        self._send(status, body, "text/plain; charset=utf-8", extra)

    def _authorized(self) -> bool:
        creds = self.ops.credentials
        if creds is None:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        # both compared, always, in constant time: no early exit that tells which part was wrong
        ok_user = hmac.compare_digest(user.encode(), creds[0].encode())
        ok_password = hmac.compare_digest(password.encode(), creds[1].encode())
        return ok_user and ok_password

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if not self._authorized():
            self._error(HTTPStatus.UNAUTHORIZED, extra={"WWW-Authenticate": 'Basic realm="fedclip"'})
            return
        path = urlsplit(self.path).path
        try:
            if path == "/metrics":
                self._send(HTTPStatus.OK, self.ops.metrics(), CONTENT_TYPE_LATEST)
            elif path == "/api/fleet":
                self._send(HTTPStatus.OK, self.ops.document(), "application/json")
            elif path == "/healthz":
                self._send(HTTPStatus.OK, b'{"ok": true}\n', "application/json")
            elif path in ("/", "/index.html"):
                self._asset("index.html")
            elif path.startswith("/assets/"):
                self._asset(path.removeprefix("/assets/"))
            else:
                self._error(HTTPStatus.NOT_FOUND)
        except (FedclipError, sqlite3.Error) as e:
            log.warning("ops: %s failed: %s", path, e)
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(e).splitlines()[0])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; nothing to tell it

    def _asset(self, name: str) -> None:
        # only the files that ship in dashboard_assets, by exact name: no paths, no listings
        if name not in self.ops.assets:
            self._error(HTTPStatus.NOT_FOUND)
            return
        path = ASSETS / name
        self._send(HTTPStatus.OK, path.read_bytes(), _TYPES.get(path.suffix, "application/octet-stream"))

    def _not_allowed(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "read-only", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed


class OpsServer:
    """Serve `/metrics` and the dashboard for the state dir `state` on `host:port` (0: a free port).

    `start()` / `stop()` or a context manager; `url` once started. The state dir must already hold
    a coordinator database (`serve` starts this after its store is open).
    """

    def __init__(
        self,
        state: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        credentials: tuple[str, str] | None = None,
    ):
        self.view = FleetView(state)
        self._reading = threading.Lock()
        self.registry = registry_for(self.view)
        self.credentials = credentials
        self.assets = frozenset(p.name for p in ASSETS.iterdir() if p.is_file())
        handler = type("OpsHandler", (_Handler,), {"ops": self})
        self._http = BundleServer(ASSETS, host, port, handler=handler)

    @property
    def url(self) -> str:
        return self._http.url

    # One request reads the view at a time: its caches are not safe for concurrent updates, and two
    # scrapes at once would only double the database work.
    def metrics(self) -> bytes:
        with self._reading:
            return render(self.registry)

    def document(self) -> bytes:
        with self._reading:
            doc = self.view.document()
        return dumps(doc).encode()

    def start(self) -> OpsServer:
        try:
            self._http.start()
        except ConfigError as e:
            self.view.close()
            raise ConfigError(str(e).replace("bundle server", "ops server")) from None
        return self

    def stop(self) -> None:
        self._http.stop()
        self.view.close()

    def __enter__(self) -> OpsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["OpsServer", "read_credentials"]
