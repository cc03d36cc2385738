"""Brokers fedclip can start itself: the embedded amqtt one, and mosquitto for tests and users.

`EmbeddedBroker` runs amqtt in a background thread with its own asyncio loop, bound to 127.0.0.1 only.
amqtt drops the messages of anonymous sessions while they are away, so persistent sessions need
authenticated clients. Without `acl` the broker writes a password file with one generated login
(argon2, via amqtt's own `pwdlib` dependency) and exposes it as `.username` / `.password`; `.url`
carries them. With `acl` (a provisioned fleet's `FleetAcl`, from the enrolment registry) it admits
exactly the fleet's logins and enforces their topic rules, like the generated mosquitto config
(`amqtt_plugins.py`); `reload(acl)` applies a new registry at once, keeping sessions and retained
messages.

`MosquittoBroker` writes a config in a temp dir and runs `mosquitto -c` as a subprocess: listener on
127.0.0.1, optional password file (`mosquitto_passwd`), optional TLS (CA and server cert made with
`openssl`), persistence on so `restart()` keeps sessions and retained messages. With `include_dir`
it runs a config `fedclip-coord provision broker` generated instead of its own listener and logins;
`reload()` (SIGHUP) makes mosquitto reread the password and ACL files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedclip.sdk.broker_acl import FleetAcl, amqtt_plugins
from fedclip.sdk.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, alive=lambda: True) -> bool:
    """Poll until something accepts TCP connections on host:port; False on timeout or death."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _argon2(password: str) -> str:
    """The hash amqtt's FileAuthPlugin checks. The password is 128 random bits, so a cheap argon2
    costs no security and keeps every CONNECT fast (the default parameters take ~0.5 s of CPU per
    connection on a small board)."""
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    return PasswordHash((Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1),)).hash(password)


class EmbeddedBroker:
    """amqtt on 127.0.0.1 in a thread. `start()` returns the URL (credentials included)."""

    def __init__(
        self,
        port: int | None = None,
        username: str | None = "fedclip",
        password: str | None = None,
        *,
        acl: FleetAcl | None = None,
    ):
        self.host = LOCALHOST
        self.port = port or free_port()
        self.acl = acl
        # With an ACL the broker knows only hashes: `url` carries the credentials given here (the
        # caller's own login, e.g. the coordinator's), or none.
        self.username = username if acl is None or password is not None else None
        self.password = password or (secrets.token_urlsafe(16) if acl is None else None)
        self._dir: tempfile.TemporaryDirectory | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None  # amqtt's Broker (amqtt has no type information)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._key = f"embedded-{id(self)}-{secrets.token_hex(4)}"

    @property
    def url(self) -> str:
        if self.username is None or self.password is None:
            return self.plain_url
        return f"mqtt://{self.username}:{self.password}@{self.host}:{self.port}"

    @property
    def plain_url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self, password_file: Path) -> dict:
        # The format of amqtt 0.12 (amqtt.contexts.BrokerConfig): plugins keyed by dotted class path.
        if self.acl is not None:
            plugins = amqtt_plugins(key=self._key)
        else:
            plugins = {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(password_file)}}
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "timeout_disconnect_delay": 0,
            "plugins": plugins,
        }

    def start(self, timeout: float = 15) -> str:
        try:
            import amqtt  # noqa: F401
        except ImportError:
            raise BrokerError("the embedded broker needs amqtt: pip install amqtt") from None
        if self._thread is not None:
            raise BrokerError("embedded broker already started")
        # amqtt and its state machine library log every connection and transition at INFO; quiet them
        # unless the application chose a level for them.
        for name in ("transitions", "amqtt"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        self._dir = tempfile.TemporaryDirectory(prefix="fedclip-amqtt-")
        pw_file = Path(self._dir.name) / "passwd"
        if self.acl is not None:
            from fedclip.sdk.amqtt_plugins import LIVE

            LIVE[self._key] = self.acl
        else:
            assert self.password is not None  # generated in __init__ when none is given
            pw_file.write_text(f"{self.username}:{_argon2(self.password)}\n")
        self._started.clear()
        self._error = None
        self._thread = threading.Thread(
            target=self._run, args=(self._config(pw_file),), name="fedclip-amqtt", daemon=True
        )
        self._thread.start()
        if not self._started.wait(timeout):
            raise BrokerError(f"embedded broker did not start within {timeout:g}s")
        if self._error is not None:
            self._thread.join(timeout=5)
            self._thread = None
            raise BrokerError(f"embedded broker failed to start on {self.plain_url}: {self._error}")
        log.info("embedded MQTT broker listening on %s", self.plain_url)
        return self.url

    def _run(self, config: dict) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as e:
            self._error = e
            self._started.set()
            return
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            self._broker = Broker(config, loop=loop)
            loop.run_until_complete(self._broker.start())
        except Exception as e:  # reported to start() as a BrokerError
            self._error = e
            self._started.set()
            self._close_loop(loop)
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            self._close_loop(loop)

    @staticmethod
    def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
        # Client handlers amqtt leaves behind would otherwise hold sockets open after stop().
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def reload(self, acl: FleetAcl) -> None:
        """Enforce `acl` from the next packet on (a revoked login can no longer connect, publish or
        receive); sessions and retained messages stay."""
        if self.acl is None:
            raise BrokerError("embedded broker: reload needs a broker started with an acl")
        from fedclip.sdk.amqtt_plugins import LIVE

        self.acl = acl
        LIVE[self._key] = acl

    def stop(self, timeout: float = 15) -> None:
        if self.acl is not None:
            from fedclip.sdk.amqtt_plugins import LIVE

            LIVE.pop(self._key, None)
        if self._thread is None:
            return
        loop, broker = self._loop, self._broker
        if loop is not None and broker is not None and not loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            try:
                fut.result(timeout)
            except Exception as e:  # a half-stopped broker is still stopped below
                log.warning("embedded broker shutdown: %s", e)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        self._thread = None
        self._loop = None
        self._broker = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_mosquitto() -> str | None:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise BrokerError(f"openssl {args[0]} failed: {r.stderr.strip().splitlines()[-1:]}")


def make_test_certs(out: Path, host: str = LOCALHOST) -> dict[str, Path]:
    """A throwaway CA, a server cert for `host` and a client cert, all signed by the CA (openssl)."""
    if shutil.which("openssl") is None:
        raise BrokerError("openssl is needed to make TLS certificates")
    out.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=fedclip-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=out,
    )
    (out / "server.ext").write_text(f"subjectAltName=IP:{host},DNS:localhost\n")
    for name, subj in (("server", "/CN=localhost"), ("client", "/CN=fedclip-client")):
        _openssl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            subj,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=out,
        )
        ext = ["-extfile", "server.ext"] if name == "server" else []
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.crt",
            *ext,
            cwd=out,
        )
    return {k: out / f"{k}" for k in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


class MosquittoBroker:
    """A mosquitto subprocess on 127.0.0.1:free port with its config and state in a temp dir."""

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        require_client_cert: bool = False,
        binary: str | None = None,
        port: int | None = None,
        include_dir: str | Path | None = None,
    ):
        found = binary or find_mosquitto()
        if found is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary: str = found
        if (username is None) != (password is None):
            raise ConfigError("mosquitto: username and password go together")
        self.username = username
        self.password = password
        self.tls = tls
        self.require_client_cert = require_client_cert
        # A generated config (`provision broker`): its listeners and logins replace ours.
        self.include_dir = Path(include_dir).resolve() if include_dir is not None else None
        if self.include_dir is not None and (username is not None or port is None):
            raise ConfigError("mosquitto include_dir: give the port it listens on, and no username")
        self.host = LOCALHOST
        self.port = port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="fedclip-mosquitto-")
        self.dir = Path(self._tmp.name)
        self.certs: dict[str, Path] = {}
        self._proc: subprocess.Popen | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.dir / "mosquitto.log"

    def _write_config(self) -> None:
        (self.dir / "data").mkdir()
        lines = [
            # mosquitto started as root drops to user `mosquitto`, which cannot read our temp dir.
            "user root" if os.geteuid() == 0 else "",
            "persistence true",
            f"persistence_location {self.dir / 'data'}/",
            "autosave_interval 1",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "max_queued_messages 10000",
        ]
        if self.include_dir is not None:
            # mosquitto reads include_dir last; everything about listeners and logins is in there.
            lines.append(f"include_dir {self.include_dir}")
            (self.dir / "mosquitto.conf").write_text("\n".join(line for line in lines if line) + "\n")
            return
        lines.insert(1, f"listener {self.port} {self.host}")
        if self.username is not None:
            pw = self.dir / "passwd"
            pw.touch(mode=0o600)
            r = subprocess.run(
                [
                    shutil.which("mosquitto_passwd") or "mosquitto_passwd",
                    "-b",
                    str(pw),
                    self.username,
                    str(self.password),  # given with the username (checked above)
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if r.returncode != 0:
                raise BrokerError(f"mosquitto_passwd failed: {r.stderr.strip()}")
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls:
            self.certs = make_test_certs(self.dir / "certs")
            lines += [
                f"cafile {self.certs['ca.crt']}",
                f"certfile {self.certs['server.crt']}",
                f"keyfile {self.certs['server.key']}",
                f"require_certificate {'true' if self.require_client_cert else 'false'}",
            ]
        (self.dir / "mosquitto.conf").write_text("\n".join(line for line in lines if line) + "\n")

    def start(self, timeout: float = 15) -> str:
        if self.running:
            raise BrokerError("mosquitto already running")
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        # stderr to a file, not a pipe nobody reads: a chatty broker must never block on it.
        with open(self.dir / "stderr.log", "ab") as err:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.dir / "mosquitto.conf")],
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        if not self._wait_running(timeout, offset):
            self.kill()
            stderr = (self.dir / "stderr.log").read_text(errors="replace")
            lines = (self._log_since(offset) + stderr).splitlines()
            raise BrokerError(f"mosquitto did not start on port {self.port}: {' | '.join(lines[-3:])}")
        return self.url

    def _log_since(self, offset: int) -> str:
        if not self.log_file.exists():
            return ""
        with open(self.log_file, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def _wait_running(self, timeout: float, offset: int) -> bool:
        # The port alone does not prove it is ours (another process may hold it): mosquitto logs
        # "running" once its listeners are open, and exits when one cannot bind.
        deadline = time.monotonic() + timeout
        alive = lambda: self._proc is not None and self._proc.poll() is None  # noqa: E731
        while time.monotonic() < deadline and alive():
            if " running" in self._log_since(offset):
                return wait_for_port(self.host, self.port, deadline - time.monotonic(), alive=alive)
            time.sleep(0.05)
        return False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM: mosquitto writes its persistence file and exits."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._close_proc()

    def kill(self) -> None:
        """SIGKILL: what a crash or power loss looks like (state since the last autosave is lost)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self._close_proc()

    def _close_proc(self) -> None:
        self._proc = None

    def reload(self, timeout: float = 15) -> None:
        """SIGHUP: mosquitto rereads its password and ACL files (a revoked login stops working)."""
        if not self.running:
            raise BrokerError("mosquitto is not running")
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self._proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]  # started above: not None
        deadline = time.monotonic() + timeout
        while "Reloading config" not in self._log_since(offset):
            if time.monotonic() > deadline or not self.running:
                raise BrokerError(f"mosquitto did not reload within {timeout:g}s")
            time.sleep(0.05)

    def restart(self, timeout: float = 15) -> str:
        """Stop and start again on the same port with the same persistence file."""
        self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        self.kill()
        self._tmp.cleanup()

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
