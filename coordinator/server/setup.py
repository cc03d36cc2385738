"""A coordinator's parts from its settings: the state dir claimed for one fleet, bundle and strategy,
the initial adapter recorded once, and the MQTT session whose last will announces it offline."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.registry import Registry
from fedclip.coordinator.store import Store
from fedclip.coordinator.strategies.base import Strategy
from fedclip.sdk.adapters import check_tensors
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.mqtt import MqttSession, Will
from fedclip.sdk.wire import Envelope, MsgType, Topics, encode


def status_payload(
    fleet: str, bundle_id: str, strategy: str, round_id: int, state: str, **extra: object
) -> bytes:
    """The coordinator's retained status message (`state` online or offline)."""
    body = {"state": state, "bundle_id": bundle_id, "round": round_id, "strategy": strategy, **extra}
    return encode(Envelope(MsgType.STATUS, fleet, "coordinator", round=round_id, body=body))


def check_state_dir(store: Store, cfg: CoordConfig, bundle_id: str, strategy: str) -> None:
    """Claim the state dir for this fleet, bundle and strategy; ConfigError if it holds another's."""
    for key, value in (("fleet", cfg.fleet), ("bundle_id", bundle_id), ("strategy", strategy)):
        have = store.get_meta(key)
        if have is None:
            store.set_meta(key, value)
        elif have != value:
            raise ConfigError(f"state dir {cfg.state}: belongs to {key} {have!r}, not {value!r}")


def open_parts(
    cfg: CoordConfig, manifest: Manifest, initial: Mapping[str, np.ndarray], strategy: Strategy
) -> tuple[MqttSession, Store, Registry]:
    """(session, store, registry) for `Server`; the session is not connected yet."""
    store = Store(cfg.state)
    try:
        check_state_dir(store, cfg, manifest.bundle_id, strategy.name)
        registry = Registry(store, manifest.bundle_id, manifest.adapter.kind)
        registry.ensure_initial(check_tensors(initial, manifest.exchanged, "initial adapter"), strategy.name)
        last = store.last_round()
        will = status_payload(
            cfg.fleet, manifest.bundle_id, strategy.name, last.round if last else 0, "offline"
        )
        session = MqttSession(
            cfg.broker,
            cfg.mqtt_client_id,
            username=cfg.username,
            password=cfg.password,
            ca_file=cfg.ca_file,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            insecure=cfg.insecure,
            clean_session=False,
            will=Will(Topics(cfg.fleet).coordinator_status, will),
            manual_ack=True,
        )
    except BaseException:
        store.close()
        raise
    return session, store, registry
