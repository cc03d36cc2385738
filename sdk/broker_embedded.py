"""`EmbeddedBroker`: amqtt in a background thread of this process, for `fedclip-coord serve` without
a broker of one's own.

It runs with its own asyncio loop, bound to 127.0.0.1 only. amqtt drops the messages of anonymous
sessions while they are away, so persistent sessions need authenticated clients. Without `acl` the
broker writes a password file with one generated login (argon2, via amqtt's own `pwdlib` dependency)
and exposes it as `.username` / `.password`; `.url` carries them. With `acl` (a provisioned fleet's
`FleetAcl`, from the enrolment registry) it admits exactly the fleet's logins and enforces their topic
rules, like the generated mosquitto config (`amqtt_plugins.py`); `reload(acl)` applies a new registry
at once, keeping sessions and retained messages.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any

from fedclip.sdk.broker_acl import FleetAcl, amqtt_plugins
from fedclip.sdk.broker_ports import LOCALHOST, free_port
from fedclip.sdk.errors import BrokerError

log = logging.getLogger(__name__)


def _argon2(password: str) -> str:
    """The hash amqtt's FileAuthPlugin checks. The password is 128 random bits, so a cheap argon2
    costs no security and keeps every CONNECT fast (the default parameters take ~0.5 s of CPU per
    connection on a small board)."""
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    return PasswordHash((Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1),)).hash(password)


class _Snapshots(dict):
    """amqtt's topic filter -> subscribers table, iterated over a copy.

    amqtt 0.12 iterates this dict and awaits inside the loop (the ACL plugin's check before each
    delivery; the retained messages of a connecting client): a SUBSCRIBE handled meanwhile adds a
    filter and the loop raises "dictionary changed size during iteration". A message then reaches
    only the subscribers before that point (measured: 2 of 400 statuses lost for the coordinator
    while 30 agents connected), and a connecting client is dropped. Iterating a snapshot makes both
    loops see the table as it was when they began; a filter added meanwhile waits for the next
    message, as on any broker.
    """

    def __iter__(self):
        return iter(list(super().keys()))

    def items(self):  # a list of the pairs (and of each subscriber list), not a view
        return [(k, list(v)) for k, v in super().items()]


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
            self._broker._subscriptions = _Snapshots(self._broker._subscriptions)
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
