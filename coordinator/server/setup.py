"""A coordinator's parts from its settings: the state dir claimed for one fleet, bundle and strategy,
the initial adapter recorded once, the MQTT session whose last will announces it offline, the
signing key, and the trust that decides whose messages count."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.registry import Registry
from fedclip.coordinator.rollout import KEY_DIR
from fedclip.coordinator.store import Store
from fedclip.coordinator.strategies.base import Strategy
from fedclip.coordinator.trust import Trust
from fedclip.sdk import label_prior, messages
from fedclip.sdk.adapters import check_tensors
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.messages import CoordinatorStatus
from fedclip.sdk.mqtt import MqttSession, Will
from fedclip.sdk.signing import Ed25519PrivateKey, ensure_keypair
from fedclip.sdk.wire import Topics

log = logging.getLogger("fedclip.coordinator")

COORDINATOR = "coordinator"  # the envelope's agent field of the coordinator's own status


def status_payload(fleet: str, status: CoordinatorStatus, key: Ed25519PrivateKey | None = None) -> bytes:
    """The coordinator's retained status message, signed with its key when given."""
    return messages.encode(status, fleet, COORDINATOR, key=key)


def load_key(cfg: CoordConfig) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 signing key (made on first start); agents verify it with the public
    half (`coordinator_key`), and `provision init` shares the same one."""
    key, public = ensure_keypair(Path(cfg.state) / KEY_DIR)
    log.info("coordinator public key: %s (give it to agents as coordinator_key)", public)
    return key


def load_trust(cfg: CoordConfig) -> Trust:
    """A provisioned fleet (enrolment registry in the state dir) counts only signed messages of its
    enrolled devices; otherwise (closed test setups) only the envelope is checked."""
    trust = Trust.for_state(cfg.state)
    if trust.required:
        log.info("fleet is provisioned: only signed messages of enrolled, unrevoked devices count")
    return trust


def check_state_dir(store: Store, cfg: CoordConfig, bundle_id: str, strategy: str) -> None:
    """Claim the state dir for this fleet, bundle and strategy; ConfigError if it holds another's."""
    for key, value in (("fleet", cfg.fleet), ("bundle_id", bundle_id), ("strategy", strategy)):
        have = store.get_meta(key)
        if have is None:
            store.set_meta(key, value)
        elif have != value:
            raise ConfigError(f"state dir {cfg.state}: belongs to {key} {have!r}, not {value!r}")


def check_bundle(cfg: CoordConfig, manifest: Manifest) -> None:
    """Refuse, before any round, settings the bundle cannot train (every task would be refused)."""
    why = label_prior.unsupported(label_prior.resolve(cfg.loss, manifest), manifest, str(cfg.bundle))
    if why:
        raise ConfigError(f"loss: {why}")


def open_parts(
    cfg: CoordConfig,
    manifest: Manifest,
    initial: Mapping[str, np.ndarray],
    strategy: Strategy,
    key: Ed25519PrivateKey | None = None,
) -> tuple[MqttSession, Store, Registry]:
    """(session, store, registry) for `Server`; the session is not connected yet."""
    check_bundle(cfg, manifest)
    store = Store(cfg.state)
    try:
        check_state_dir(store, cfg, manifest.bundle_id, strategy.name)
        registry = Registry(store, manifest.bundle_id, manifest.adapter.kind)
        registry.ensure_initial(check_tensors(initial, manifest.exchanged, "initial adapter"), strategy.name)
        last = store.last_round()
        offline = CoordinatorStatus("offline", manifest.bundle_id, last.round if last else 0, strategy.name)
        will = status_payload(cfg.fleet, offline, key)
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
