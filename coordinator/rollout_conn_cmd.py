"""What every `fedclip-coord rollout` command connects with: the shared options, the broker session,
the adapter source (a registry version or a `.safetensors` file), and a `RolloutManager` with the
coordinator's signing key over the rollout database of the state dir."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from fedclip.coordinator.rollout import KEY_DIR, RolloutManager
from fedclip.coordinator.rollout_sources import AdapterSource, DictSource, RegistrySource
from fedclip.coordinator.rollout_store import DB_NAME, RolloutStore
from fedclip.coordinator.trust import Trust
from fedclip.sdk.config import read_secret
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.ids import check_id
from fedclip.sdk.mqtt import MqttSession
from fedclip.sdk.wire import Topics

STATE = typer.Option(
    Path("coordinator-state"), "--state", help="Coordinator state dir (database, keys, registry)."
)
BROKER = typer.Option(
    "mqtt://127.0.0.1:1883", "--broker", help="Broker URL, mqtt://host:port or mqtts://host:port."
)
FLEET = typer.Option("default", "--fleet", help="Fleet id (topic root fedclip/<fleet>/).")
USER = typer.Option(None, "--username", help="Broker user name.")
PWFILE = typer.Option(None, "--password-file", help="File holding the broker password.")
CA = typer.Option(None, "--ca-file", help="CA certificate for mqtts://.")


def open_store(state: Path) -> RolloutStore:
    """The rollout database of a coordinator state dir."""
    return RolloutStore(state / DB_NAME)


def session(
    broker: str,
    fleet: str,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    persistent: bool = True,
) -> MqttSession:
    """A connected MQTT session for a rollout command."""
    check_id(fleet, "--fleet")
    # A fixed id and a persistent session: acks that arrive while no rollout command runs wait in
    # the broker and are recorded by the next one. The fleet snapshot uses a clean session so the
    # broker does not keep queueing every status change for a command that has ended.
    return MqttSession(
        broker,
        f"fedclip-rollout-{fleet}" if persistent else f"fedclip-rollout-{fleet}-fleet",
        username=username,
        password=read_secret(password_file, "--password-file") if password_file else None,
        ca_file=str(ca_file) if ca_file else None,
        clean_session=not persistent,
    ).connect(timeout=15)


def adapter_source(state: Path, version: str) -> tuple[str, AdapterSource]:
    """A path to an adapter file rolls that file out; anything else is a registry version."""
    path = Path(version)
    if path.suffix == ".safetensors" and path.is_file():
        from fedclip.sdk.adapters import load_adapter

        tensors, meta = load_adapter(path)
        return meta.version, DictSource({meta.version: (tensors, meta)})
    check_id(version, "VERSION")
    from fedclip.coordinator.registry import Registry
    from fedclip.coordinator.store import DB_NAME as STORE_DB
    from fedclip.coordinator.store import Store

    if not (state / STORE_DB).is_file():
        raise ConfigError(f"--state {state}: no coordinator registry there; give an adapter file instead")
    store = Store(state, readonly=True)
    return version, RegistrySource(Registry(store, bundle_id=""))


def _manager(
    state: Path,
    transport: MqttSession,
    fleet: str,
    source: AdapterSource,
    console: Console,
    url_root: Path | None = None,
    url_base: str | None = None,
    inline_limit_kb: int = 4096,
    on_event: Callable[[int, str], None] | None = None,
) -> RolloutManager:
    from fedclip.sdk.signing import ensure_keypair

    if (url_root is None) != (url_base is None):
        raise ConfigError(
            "--url-root, --url-base: give both (the folder `serve` exposes and its URL) or neither"
        )
    key, _ = ensure_keypair(state / KEY_DIR)
    return RolloutManager(
        transport,
        Topics(fleet),
        open_store(state),
        key,
        source,
        inline_limit=inline_limit_kb * 1024,
        url_root=url_root,
        url_base=url_base,
        on_event=on_event or (lambda rid, text: console.print(f"rollout {rid}: {text}")),
        trust=Trust.for_state(state),  # a provisioned fleet: only acks its agents signed count
    )


@contextmanager
def connected(
    state: Path,
    broker: str,
    fleet: str,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    source: AdapterSource,
    console: Console,
    **manager_options: Any,
) -> Iterator[RolloutManager]:
    """A manager on its own persistent MQTT session; both closed when the command ends."""
    transport = session(broker, fleet, username, password_file, ca_file)
    try:
        manager = _manager(state, transport, fleet, source, console, **manager_options)
        try:
            yield manager
        finally:
            manager.store.close()
    finally:
        transport.close()
