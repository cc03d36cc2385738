"""`fedclip-coord rollout ...`: start, watch, roll back and pin adapter rollouts.

Every command works on the coordinator's state dir (`--state`): the rollout database
(`rollout.sqlite`), the signing key (`keys/`, made on first use) and the adapter registry. Commands
that publish connect to the broker themselves, so they work whether or not `fedclip-coord serve` is
running; `serve` also drives open rollouts (acks and stage decisions) while it runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from fedclip.coordinator.fleet import read_fleet
from fedclip.coordinator.fleet_view import rollout_record
from fedclip.coordinator.json_out import JSON_OPTION, print_json, print_json_line
from fedclip.coordinator.rollout import RolloutManager
from fedclip.coordinator.rollout_conn_cmd import (
    BROKER,
    CA,
    FLEET,
    PWFILE,
    STATE,
    USER,
    adapter_source,
    connected,
    open_store,
    session,
)
from fedclip.coordinator.rollout_policy import RolloutParams, Target
from fedclip.coordinator.rollout_sources import DictSource
from fedclip.coordinator.rollout_store import DB_NAME, FINAL_STATES, ROLLED_BACK, RolloutError, RolloutRow
from fedclip.coordinator.rollout_tables_cmd import print_rollout, print_rollouts
from fedclip.sdk.errors import ConfigError

app = typer.Typer(
    help="Roll adapters out to the fleet: canary first, signed, with automatic rollback.",
    no_args_is_help=True,
    add_completion=False,
)


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
    fallback: bool = typer.Option(
        False,
        "--fallback",
        help="Send agents that get their own adapter of a personalized round the round's global one "
        "too, where their open-set gate sends unfamiliar images (docs/rollout.md).",
    ),
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
    state: Path = STATE,
    broker: str = BROKER,
    fleet: str = FLEET,
    username: str | None = USER,
    password_file: Path | None = PWFILE,
    ca_file: Path | None = CA,
    as_json: bool = JSON_OPTION,
) -> None:
    """Start a rollout: canary stage, then (if it passes) everyone else; `--wait` drives it to the end.

    With `--json`, stdout gets one rollout record (the final one with `--wait`); messages go to stderr.
    """
    console = Console(stderr=as_json)
    version, source = adapter_source(state, version)
    params = RolloutParams(
        version, Target.parse(to), canary, max_regression, min_acks, stage_timeout, fallback
    )
    broker_args = (broker, fleet, username, password_file, ca_file)
    with connected(
        state,
        *broker_args,
        source,
        console,
        url_root=url_root,
        url_base=url_base,
        inline_limit_kb=inline_limit_kb,
    ) as manager:
        manager.subscribe()
        snapshot = session(*broker_args, persistent=False)
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
            print_rollout(console, manager.store, rid)
    if row.state == ROLLED_BACK:
        raise SystemExit(1)  # sdk.cli.run turns typer.Exit into 0 outside standalone mode


@app.command()
def watch(
    rollout_id: int = typer.Argument(..., help="Rollout id."),
    wait_timeout: float = typer.Option(3600.0, "--wait-timeout", help="Give up after this many seconds."),
    state: Path = STATE,
    broker: str = BROKER,
    fleet: str = FLEET,
    username: str | None = USER,
    password_file: Path | None = PWFILE,
    ca_file: Path | None = CA,
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
    with connected(state, *broker_args, DictSource(), console, on_event=events) as manager:
        row = manager.store.get(rollout_id)
        if row is None:
            raise RolloutError(f"rollout {rollout_id} does not exist")
        _, manager.adapters = adapter_source(state, row.version)
        manager.subscribe()
        row = _watch(manager, rollout_id, wait_timeout, console)
        if as_json:
            print_json_line({"type": "rollout", **rollout_record(manager.store, row)})
        else:
            print_rollout(console, manager.store, rollout_id)
    if row.state == ROLLED_BACK:
        raise SystemExit(1)  # sdk.cli.run turns typer.Exit into 0 outside standalone mode


def _watch(manager: RolloutManager, rid: int, timeout: float, console: Console) -> RolloutRow:
    with console.status(f"rollout {rid}: waiting for acknowledgements"):
        row = manager.wait(rid, timeout)
    if row.state not in FINAL_STATES:
        console.print(f"rollout {rid}: still {row.state} after {timeout:g}s")
    return row


@app.command()
def status(
    rollout_id: int | None = typer.Argument(None, help="Rollout id; without it, the latest rollouts."),
    state: Path = STATE,
    as_json: bool = JSON_OPTION,
) -> None:
    """Rollouts, their stages and every acknowledgement, from the coordinator's database.

    With `--json`: one rollout record, or `{"rollouts": [...], "pins": {agent: version}}`.
    """
    console = Console()
    if not (state / DB_NAME).is_file():
        raise ConfigError(f"--state {state}: no rollouts yet ({DB_NAME} missing)")
    store = open_store(state)
    if rollout_id is not None:
        row = store.get(rollout_id)
        if row is None:
            raise RolloutError(f"rollout {rollout_id} does not exist")
        if as_json:
            print_json(rollout_record(store, row))
        else:
            print_rollout(console, store, rollout_id)
        return
    if as_json:
        print_json({"rollouts": [rollout_record(store, r) for r in store.rollouts()], "pins": store.pins()})
        return
    print_rollouts(console, store)


@app.command()
def rollback(
    rollout_id: int = typer.Argument(..., help="Rollout id."),
    state: Path = STATE,
    broker: str = BROKER,
    fleet: str = FLEET,
    username: str | None = USER,
    password_file: Path | None = PWFILE,
    ca_file: Path | None = CA,
) -> None:
    """Send every agent of a rollout a signed rollback to the adapter it had before."""
    console = Console()
    with connected(state, broker, fleet, username, password_file, ca_file, DictSource(), console) as manager:
        manager.rollback(rollout_id, "rolled back by operator")


@app.command()
def pin(
    agent: str = typer.Argument(..., help="Agent id."),
    version: str = typer.Argument(..., help="Adapter version (registry) or .safetensors file to keep it on."),
    state: Path = STATE,
    broker: str = BROKER,
    fleet: str = FLEET,
    username: str | None = USER,
    password_file: Path | None = PWFILE,
    ca_file: Path | None = CA,
) -> None:
    """Keep AGENT on VERSION: rollouts leave it out until `unpin`."""
    console = Console()
    version, source = adapter_source(state, version)
    with connected(state, broker, fleet, username, password_file, ca_file, source, console) as manager:
        manager.pin(agent, version)
    console.print(f"{agent} pinned to {version}")


@app.command()
def unpin(
    agent: str = typer.Argument(..., help="Agent id."),
    state: Path = STATE,
    broker: str = BROKER,
    fleet: str = FLEET,
    username: str | None = USER,
    password_file: Path | None = PWFILE,
    ca_file: Path | None = CA,
) -> None:
    """Let AGENT take part in rollouts again."""
    console = Console()
    with connected(state, broker, fleet, username, password_file, ca_file, DictSource(), console) as manager:
        manager.unpin(agent)
    console.print(f"{agent} unpinned")
