"""`fedclip-coord rollout ...`: start, watch, roll back and pin adapter rollouts.

Every command works on the coordinator's state dir (`--state`): the rollout database
(`rollout.sqlite`), the signing key (`keys/`, made on first use) and the adapter registry. Commands
that publish connect to the broker themselves, so they work whether or not `fedclip-coord serve` is
running; `serve` also drives open rollouts (acks and stage decisions) while it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedclip.coordinator.fleet import read_fleet
from fedclip.coordinator.fleet_view import rollout_record
from fedclip.coordinator.json_out import JSON_OPTION, print_json, print_json_line
from fedclip.coordinator.rollout import KEY_DIR, RolloutManager
from fedclip.coordinator.rollout_policy import RolloutParams, Target
from fedclip.coordinator.rollout_sources import DictSource, RegistrySource
from fedclip.coordinator.rollout_store import DB_NAME, FINAL_STATES, ROLLED_BACK, RolloutError, RolloutStore
from fedclip.coordinator.trust import Trust
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.ids import check_id
from fedclip.sdk.wire import Topics

app = typer.Typer(
    help="Roll adapters out to the fleet: canary first, signed, with automatic rollback.",
    no_args_is_help=True,
    add_completion=False,
)

_STATE = typer.Option(
    Path("coordinator-state"), "--state", help="Coordinator state dir (database, keys, registry)."
)
_BROKER = typer.Option(
    "mqtt://127.0.0.1:1883", "--broker", help="Broker URL, mqtt://host:port or mqtts://host:port."
)
_FLEET = typer.Option("default", "--fleet", help="Fleet id (topic root fedclip/<fleet>/).")
_USER = typer.Option(None, "--username", help="Broker user name.")
_PWFILE = typer.Option(None, "--password-file", help="File holding the broker password.")
_CA = typer.Option(None, "--ca-file", help="CA certificate for mqtts://.")


def _store(state: Path) -> RolloutStore:
    return RolloutStore(state / DB_NAME)


def _password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"--password-file: cannot read {path} ({e.strerror or e})") from None


def _session(
    broker: str,
    fleet: str,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    persistent: bool = True,
):
    from fedclip.sdk.mqtt import MqttSession

    check_id(fleet, "--fleet")
    # A fixed id and a persistent session: acks that arrive while no rollout command runs wait in
    # the broker and are recorded by the next one. The fleet snapshot uses a clean session so the
    # broker does not keep queueing every status change for a command that has ended.
    return MqttSession(
        broker,
        f"fedclip-rollout-{fleet}" if persistent else f"fedclip-rollout-{fleet}-fleet",
        username=username,
        password=_password(password_file),
        ca_file=str(ca_file) if ca_file else None,
        clean_session=not persistent,
    ).connect(timeout=15)


def _source(state: Path, version: str):
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
    session,
    fleet: str,
    source,
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
        session,
        Topics(fleet),
        _store(state),
        key,
        source,
        inline_limit=inline_limit_kb * 1024,
        url_root=url_root,
        url_base=url_base,
        on_event=on_event or (lambda rid, text: console.print(f"rollout {rid}: {text}")),
        trust=Trust.for_state(state),  # a provisioned fleet: only acks its agents signed count
    )


@contextmanager
def _connected(
    state: Path,
    broker: str,
    fleet: str,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    source,
    console: Console,
    **manager_options,
) -> Iterator[RolloutManager]:
    """A manager on its own persistent MQTT session; both closed when the command ends."""
    session = _session(broker, fleet, username, password_file, ca_file)
    try:
        manager = _manager(state, session, fleet, source, console, **manager_options)
        try:
            yield manager
        finally:
            manager.store.close()
    finally:
        session.close()


@app.command()
def start(
    version: str = typer.Argument(
        ..., help="Adapter version in the registry, or a .safetensors adapter file."
    ),
    to: str = typer.Option(..., "--to", help="all, group:NAME or agents:a,b"),
    canary: str = typer.Option(
        "10%", "--canary", help="Canary share (10%) or count (2); 0 skips the canary."
    ),
    max_regression: float = typer.Option(
        1.0, "--max-regression", help="Largest mean accuracy loss (points) the canary may show."
    ),
    min_acks: float = typer.Option(0.9, "--min-acks", help="Share of canary agents that must acknowledge."),
    stage_timeout: float = typer.Option(300.0, "--stage-timeout", help="Seconds a stage waits for acks."),
    wait: bool = typer.Option(False, "--wait", help="Stay until the rollout completes or rolls back."),
    wait_timeout: float = typer.Option(
        3600.0, "--wait-timeout", help="Give up waiting after this many seconds."
    ),
    fleet_wait: float = typer.Option(
        1.0, "--fleet-wait", help="Seconds to collect agent statuses before starting."
    ),
    inline_limit_kb: int = typer.Option(
        4096,
        "--inline-limit-kb",
        min=1,
        help="Adapters larger than this go by URL instead of inside the message.",
    ),
    url_root: Path | None = typer.Option(
        None, "--url-root", help="Folder the bundle server exposes (for large adapters)."
    ),
    url_base: str | None = typer.Option(None, "--url-base", help="URL agents reach --url-root at."),
    state: Path = _STATE,
    broker: str = _BROKER,
    fleet: str = _FLEET,
    username: str | None = _USER,
    password_file: Path | None = _PWFILE,
    ca_file: Path | None = _CA,
    as_json: bool = JSON_OPTION,
) -> None:
    """Start a rollout: canary stage, then (if it passes) everyone else; `--wait` drives it to the end.

    With `--json`, stdout gets one rollout record (the final one with `--wait`); messages go to stderr.
    """
    console = Console(stderr=as_json)
    version, source = _source(state, version)
    params = RolloutParams(version, Target.parse(to), canary, max_regression, min_acks, stage_timeout)
    broker_args = (broker, fleet, username, password_file, ca_file)
    with _connected(
        state,
        *broker_args,
        source,
        console,
        url_root=url_root,
        url_base=url_base,
        inline_limit_kb=inline_limit_kb,
    ) as manager:
        manager.subscribe()
        snapshot = _session(*broker_args, persistent=False)
        try:
            agents = read_fleet(
                snapshot,
                manager.topics,
                quiet=fleet_wait,
                timeout=max(5.0, fleet_wait * 5),
                trust=manager.trust,
            )
        finally:
            snapshot.close()
        rid = manager.start(params, agents)
        console.print(f"rollout {rid} started: {version} to {params.target}")
        if not wait:
            console.print(
                f"`fedclip-coord serve` or `fedclip-coord rollout watch {rid}` drives it on from here."
            )
            if as_json:
                row = manager.store.get(rid)
                assert row is not None  # `start` just created it
                print_json(rollout_record(manager.store, row))
            return
        row = _watch(manager, rid, wait_timeout, console)
        if as_json:
            print_json(rollout_record(manager.store, row))
        else:
            _print_rollout(console, manager.store, rid)
    if row.state == ROLLED_BACK:
        raise SystemExit(1)  # sdk.cli.run turns typer.Exit into 0 outside standalone mode


@app.command()
def watch(
    rollout_id: int = typer.Argument(..., help="Rollout id."),
    wait_timeout: float = typer.Option(3600.0, "--wait-timeout", help="Give up after this many seconds."),
    state: Path = _STATE,
    broker: str = _BROKER,
    fleet: str = _FLEET,
    username: str | None = _USER,
    password_file: Path | None = _PWFILE,
    ca_file: Path | None = _CA,
    as_json: bool = JSON_OPTION,
) -> None:
    """Record acks and take the stage decisions of a running rollout until it completes or rolls back.

    With `--json`, stdout is JSON lines: `{"type": "event", ...}` as things happen, then one
    `{"type": "rollout", ...}` with the rollout record when it ends or the wait times out.
    """
    console = Console(stderr=as_json)

    def as_line(rid: int, text: str) -> None:
        print_json_line({"type": "event", "rollout": rid, "at": time.time(), "text": text})

    events = as_line if as_json else None
    broker_args = (broker, fleet, username, password_file, ca_file)
    with _connected(state, *broker_args, DictSource(), console, on_event=events) as manager:
        row = manager.store.get(rollout_id)
        if row is None:
            raise RolloutError(f"rollout {rollout_id} does not exist")
        _, manager.adapters = _source(state, row.version)
        manager.subscribe()
        row = _watch(manager, rollout_id, wait_timeout, console)
        if as_json:
            print_json_line({"type": "rollout", **rollout_record(manager.store, row)})
        else:
            _print_rollout(console, manager.store, rollout_id)
    if row.state == ROLLED_BACK:
        raise SystemExit(1)  # sdk.cli.run turns typer.Exit into 0 outside standalone mode


def _watch(manager: RolloutManager, rid: int, timeout: float, console: Console):
    with console.status(f"rollout {rid}: waiting for acknowledgements"):
        row = manager.wait(rid, timeout)
    if row.state not in FINAL_STATES:
        console.print(f"rollout {rid}: still {row.state} after {timeout:g}s")
    return row


@app.command()
def status(
    rollout_id: int | None = typer.Argument(None, help="Rollout id; without it, the latest rollouts."),
    state: Path = _STATE,
    as_json: bool = JSON_OPTION,
) -> None:
    """Rollouts, their stages and every acknowledgement, from the coordinator's database.

    With `--json`: one rollout record, or `{"rollouts": [...], "pins": {agent: version}}`.
    """
    console = Console()
    if not (state / DB_NAME).is_file():
        raise ConfigError(f"--state {state}: no rollouts yet ({DB_NAME} missing)")
    store = _store(state)
    if rollout_id is not None:
        row = store.get(rollout_id)
        if row is None:
            raise RolloutError(f"rollout {rollout_id} does not exist")
        if as_json:
            print_json(rollout_record(store, row))
        else:
            _print_rollout(console, store, rollout_id)
        return
    if as_json:
        print_json({"rollouts": [rollout_record(store, r) for r in store.rollouts()], "pins": store.pins()})
        return
    table = Table(title="rollouts")
    for col in ("id", "version", "target", "state", "started", "reason"):
        table.add_column(col)
    for r in store.rollouts():
        table.add_row(str(r.id), r.version, r.target, r.state, _when(r.created_at), r.reason)
    console.print(table)
    pins = store.pins()
    if pins:
        console.print("pinned: " + ", ".join(f"{a}={v}" for a, v in pins.items()))


@app.command()
def rollback(
    rollout_id: int = typer.Argument(..., help="Rollout id."),
    state: Path = _STATE,
    broker: str = _BROKER,
    fleet: str = _FLEET,
    username: str | None = _USER,
    password_file: Path | None = _PWFILE,
    ca_file: Path | None = _CA,
) -> None:
    """Send every agent of a rollout a signed rollback to the adapter it had before."""
    console = Console()
    with _connected(state, broker, fleet, username, password_file, ca_file, DictSource(), console) as manager:
        manager.rollback(rollout_id, "rolled back by operator")


@app.command()
def pin(
    agent: str = typer.Argument(..., help="Agent id."),
    version: str = typer.Argument(..., help="Adapter version (registry) or .safetensors file to keep it on."),
    state: Path = _STATE,
    broker: str = _BROKER,
    fleet: str = _FLEET,
    username: str | None = _USER,
    password_file: Path | None = _PWFILE,
    ca_file: Path | None = _CA,
) -> None:
    """Keep AGENT on VERSION: rollouts leave it out until `unpin`."""
    console = Console()
    version, source = _source(state, version)
    with _connected(state, broker, fleet, username, password_file, ca_file, source, console) as manager:
        manager.pin(agent, version)
    console.print(f"{agent} pinned to {version}")


@app.command()
def unpin(
    agent: str = typer.Argument(..., help="Agent id."),
    state: Path = _STATE,
    broker: str = _BROKER,
    fleet: str = _FLEET,
    username: str | None = _USER,
    password_file: Path | None = _PWFILE,
    ca_file: Path | None = _CA,
) -> None:
    """Let AGENT take part in rollouts again."""
    console = Console()
    with _connected(state, broker, fleet, username, password_file, ca_file, DictSource(), console) as manager:
        manager.unpin(agent)
    console.print(f"{agent} unpinned")


# ---- tables --------------------------------------------------------------------------------------


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def _pct(x: float | None) -> str:
    return f"{x * 100:.1f}%" if x is not None else ""


def _print_rollout(console: Console, store: RolloutStore, rid: int) -> None:
    r = store.get(rid)
    if r is None:
        return
    console.print(
        f"[bold]rollout {r.id}[/bold]: {r.version} to {r.target}, canary {r.canary}, "
        f"max regression {r.max_regression:g}, min acks {r.min_acks:.0%}: [bold]{r.state}[/bold]"
        + (f" ({r.reason})" if r.reason else "")
    )
    if r.skipped:
        console.print(f"pinned, left out: {', '.join(r.skipped)}")
    stages = Table(title="stages")
    for col in ("stage", "agents", "state", "mean regression (points)", "decision"):
        stages.add_column(col)
    for s in store.stages(rid):
        reg = f"{s.mean_regression:.2f}" if s.mean_regression is not None else ""
        stages.add_row(s.name, str(len(s.agents)), s.state, reg, s.reason)
    console.print(stages)
    acks = Table(title="acknowledgements")
    for col in (
        "agent",
        "stage",
        "status",
        "version",
        "accuracy current",
        "accuracy new",
        "regression",
        "reason",
    ):
        acks.add_column(col)
    by_agent = {a.agent: a for a in store.acks(rid)}
    for s in store.stages(rid):
        for agent in s.agents:
            a = by_agent.get(agent)
            if a is None:
                acks.add_row(agent, s.name, "pending", "", "", "", "", "")
                continue
            reg = f"{a.regression:.2f}" if a.regression is not None else ""
            acks.add_row(
                agent,
                s.name,
                a.status,
                a.version,
                _pct(a.current_accuracy),
                _pct(a.new_accuracy),
                reg,
                a.reason,
            )
    console.print(acks)
