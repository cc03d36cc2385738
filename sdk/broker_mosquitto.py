"""`MosquittoBroker`: a mosquitto subprocess fedclip starts for tests, benchmarks and users.

It writes a config in a temp dir and runs `mosquitto -c`: listener on 127.0.0.1, optional password
file (`mosquitto_passwd`), optional TLS (CA and server cert from `broker_certs`), persistence on so
`restart()` keeps sessions and retained messages. With `include_dir` it runs a config
`fedclip-coord provision broker` generated instead of its own listener and logins; `reload()`
(SIGHUP) makes mosquitto reread the password and ACL files.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from fedclip.sdk.broker_certs import make_test_certs
from fedclip.sdk.broker_ports import LOCALHOST, free_port, wait_for_port
from fedclip.sdk.errors import BrokerError, ConfigError


def find_mosquitto() -> str | None:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


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
