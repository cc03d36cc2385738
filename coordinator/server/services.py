"""What runs next to the rounds on the round loop's thread and transport: the bundle's HTTP server
and the rollout state machine (acks and stage decisions), with the coordinator's signing key."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from fedclip.coordinator.bundle_server import BundleServer
from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.registry import Registry
from fedclip.coordinator.rollout import RolloutManager
from fedclip.coordinator.rollout_sources import RegistrySource
from fedclip.coordinator.rollout_store import DB_NAME as ROLLOUT_DB
from fedclip.coordinator.rollout_store import RolloutStore
from fedclip.coordinator.trust import Trust
from fedclip.sdk.errors import FedclipError
from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.signing import Ed25519PrivateKey
from fedclip.sdk.transport import Transport
from fedclip.sdk.wire import Topics

log = logging.getLogger("fedclip.coordinator")

_TICK_S = 1.0  # how often open rollouts are advanced


class Services:
    """Started by `start`, stopped by `stop`; in between `offer` each incoming message."""

    def __init__(
        self,
        cfg: CoordConfig,
        transport: Transport,
        topics: Topics,
        registry: Registry,
        key: Ed25519PrivateKey,
        trust: Trust | None = None,
        on_reject: Callable[[str, str, str], None] | None = None,
    ):
        self.cfg = cfg
        self.on_reject = on_reject
        self.key = key
        self.trust = trust
        self.transport = transport
        self.topics = topics
        self.registry = registry
        self.bundles: BundleServer | None = None
        self.rollouts: RolloutManager | None = None
        self.rollout_store: RolloutStore | None = None
        self._next_tick = 0.0

    def start(self) -> Services:
        """The bundle server and the rollout manager (subscribed: call before the
        transport connects, so the subscription is part of its session)."""
        if self.cfg.http:
            self.bundles = BundleServer(self.cfg.bundle, self.cfg.http_host, self.cfg.http_port).start()
            log.info("bundle server: agents download this bundle from %s", self.bundles.url)
        self.rollout_store = RolloutStore(Path(self.cfg.state) / ROLLOUT_DB)
        self.rollouts = RolloutManager(
            self.transport,
            self.topics,
            self.rollout_store,
            self.key,
            RegistrySource(self.registry),
            publish_timeout=self.cfg.publish_timeout,
            # adapters too large for MQTT go by URL, next to the bundle (only with the HTTP server)
            url_root=self.cfg.bundle if self.bundles else None,
            url_base=self.bundles.url if self.bundles else None,
            trust=self.trust,
            on_reject=self.on_reject,
        )
        self.rollouts.subscribe()
        return self

    def stop(self) -> None:
        if self.bundles is not None:
            self.bundles.stop()
        if self.rollout_store is not None:
            self.rollout_store.close()

    @property
    def bundle_url(self) -> str | None:
        return self.bundles.url if self.bundles is not None else None

    def offer(self, msg: Incoming) -> bool:
        """Give `msg` to the rollout manager; True if it was a rollout ack (handled)."""
        return self._step(msg)

    def tick(self) -> None:
        """Advance open rollouts, at most once a second."""
        if time.monotonic() >= self._next_tick:
            self._next_tick = time.monotonic() + _TICK_S
            self._step(None)

    def _step(self, msg: Incoming | None) -> bool:
        """A rollout problem is logged, never allowed to stop the rounds: acks are idempotent and
        agents send them again, and the next tick (here, or `rollout watch`) retries a decision."""
        if self.rollouts is None:
            return False
        try:
            if msg is None:
                self.rollouts.tick()
                return True
            return self.rollouts.handle(msg)
        except (FedclipError, sqlite3.Error) as e:
            log.warning("rollout: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            return msg is not None
