"""The federated run: the coordinator and one agent process per id, watched round by round, then
the last round's adapters rolled out; and what the run cost, read back from the coordinator's state."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fedclip.coordinator import strategies
from fedclip.coordinator.demo.config import DemoConfig, agent_cli, coord_cli, flags
from fedclip.coordinator.demo.launch import BrokerInfo, agent_auth_flags, auth_flags, write_secret
from fedclip.coordinator.metrics import METRICS_FILE, MetricsLog
from fedclip.coordinator.procs import ChildFailed, ProcessGroup
from fedclip.coordinator.rollout import KEY_DIR
from fedclip.coordinator.rollout_store import DB_NAME as ROLLOUT_DB
from fedclip.coordinator.rollout_store import INSTALLED, PINNED, RolloutStore
from fedclip.coordinator.store import Store
from fedclip.sdk.config import read_secret
from fedclip.sdk.errors import StateError
from fedclip.sdk.ledger import Ledger
from fedclip.sdk.signing import ensure_keypair

log = logging.getLogger(__name__)


# ---- the federation ----------------------------------------------------------------------------
@dataclass
class FleetRun:
    """What one federated run left behind, for the report."""

    rounds: list[dict] = field(default_factory=list)  # the coordinator's per-round JSON lines
    seconds: float = 0.0
    costs: dict[int, dict[str, float | None]] = field(default_factory=dict)  # round -> seconds, bytes
    final_missing: list[str] = field(default_factory=list)  # agents without the last round's adapter
    coordinator_state: Path = Path()  # set by run_federation
    agent_states: dict[str, Path] = field(default_factory=dict)


def round_records(state_dir: Path) -> list[dict[str, Any]]:
    """Aggregated rounds from the coordinator's metrics log, one per round (the last record wins)."""
    records: dict[int, dict[str, Any]] = {}
    for rec in MetricsLog(state_dir / METRICS_FILE).read():
        if not isinstance(rec, dict) or not isinstance(rec.get("round"), int):
            continue
        if rec.get("state", "aggregated") == "aggregated":
            records[rec["round"]] = rec
    return [records[r] for r in sorted(records)]


def run_federation(
    cfg: DemoConfig,
    procs: ProcessGroup,
    broker: BrokerInfo,
    bundle: Path,
    data_dir: Path,
    agent_ids: list[str],
    work: Path,
    console: Console | None = None,
    running: Collection[str] = (),
) -> FleetRun:
    """Coordinator + one agent process per id; returns when the coordinator has run every round.

    `running`: ids whose agents run already (in `procs`, from an earlier call on the same `work`):
    not started again. A second call with more ids and more rounds is a fleet that new agents join."""
    run = FleetRun(coordinator_state=work / "coordinator")
    # `serve` takes broker credentials from its YAML config only (keeps them out of `ps`).
    coord_yaml = {"username": broker.username} if broker.username else {}
    if broker.password_file is not None:
        coord_yaml["password"] = read_secret(broker.password_file, "broker password file")
    config = write_secret(work / "secrets" / "coordinator.yaml", json.dumps(coord_yaml))  # JSON is YAML
    options = flags(
        config=config, broker=broker.url, fleet=cfg.fleet, bundle=bundle, state=run.coordinator_state,
        strategy=cfg.strategy, rounds=cfg.rounds, clients_per_round=len(agent_ids),
        min_updates=len(agent_ids), round_timeout=cfg.round_timeout, local_epochs=cfg.local_epochs,
        lr=cfg.lr, loss=cfg.loss, seed=cfg.seed, lam=cfg.lam, tau=cfg.tau,
    )  # fmt: skip
    # The key pair exists before any agent starts, so every agent gets its public half and only
    # signed rollouts (`deliver_final`) can change its adapter; `serve` reuses the pair.
    _, coordinator_key = ensure_keypair(run.coordinator_state / KEY_DIR)
    coordinator = procs.spawn("coordinator", coord_cli("serve", *options))
    for aid in agent_ids:
        run.agent_states[aid] = work / "agents" / aid
        if aid in running:
            continue
        options = flags(
            broker=broker.url, fleet=cfg.fleet, id=aid, bundle=bundle, data=data_dir / aid / "train",
            state=run.agent_states[aid], threads=1, coordinator_key=coordinator_key,
        )  # fmt: skip
        procs.spawn(f"agent-{aid}", agent_cli("start", *options, *agent_auth_flags(broker, aid)))
    t0 = time.monotonic()
    deadline = t0 + cfg.timeout
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
        transient=False,
    )
    with progress:
        bar = progress.add_task(
            f"{cfg.strategy}: {len(agent_ids)} agents, waiting for round 1", total=cfg.rounds
        )
        while True:
            rc = coordinator.proc.poll()
            run.rounds = round_records(run.coordinator_state)
            if run.rounds:
                last = run.rounds[-1]
                progress.update(bar, completed=len(run.rounds), description=_round_line(cfg, last))
            if rc is not None:
                coordinator.stopped = True
                if rc != 0:
                    raise ChildFailed(
                        f"coordinator exited with code {rc} (log: {coordinator.log_path})\n"
                        f"{coordinator.tail()}"
                    )
                break
            procs.check(allow_exit=("coordinator",))
            if time.monotonic() > deadline:
                raise ChildFailed(
                    f"the run did not finish within --timeout {cfg.timeout:g}s (logs: {procs.log_dir})"
                )
            time.sleep(0.5)
    run.seconds = time.monotonic() - t0
    return run


def round_costs(state_dir: Path) -> dict[int, dict[str, float | None]]:
    """Per aggregated round: seconds from start to close, bytes down (tasks) and up (updates).

    Read from the coordinator's store: a task blob is the exact payload sent; an update's
    `wire_bytes` is its payload as received. Rows from before that column fall back to the stored
    blob's size (its tensors and statistics, without the envelope's few hundred bytes); the blob is
    not the uplink any more, since it also holds statistics the coordinator already had.
    """
    store = Store(state_dir, readonly=True)
    out = {}
    try:
        for row in store.rounds():
            if row.state != "aggregated":
                continue
            down = sum(_size(store, blob) for _, blob in store.selections(row.round).values())
            up = sum(
                u.wire_bytes if u.wire_bytes is not None else _size(store, u.blob)
                for u in store.updates(row.round)
            )
            secs = (row.closed_at - row.started_at) if row.closed_at else None
            out[row.round] = {"seconds": secs, "uplink_bytes": up, "downlink_bytes": down}
    finally:
        store.close()
    return out


def _size(store: Store, blob: str) -> int:
    return store.blobs.size(blob) or 0


def _round_line(cfg: DemoConfig, rec: dict) -> str:
    metrics = rec.get("metrics") or {}
    acc = metrics.get("accuracy_after", metrics.get("accuracy"))
    acc_s = f", mean acc {acc:.3f}" if isinstance(acc, (int, float)) else ""
    n = _count(rec.get("updates", rec.get("agents")))
    return f"{cfg.strategy}: round {rec['round']}/{cfg.rounds}, {n} updates{acc_s}"


def _count(x: object) -> str:
    if isinstance(x, (list, dict)):
        return str(len(x))
    return "?" if x is None else str(x)


# ---- adapters after each round ------------------------------------------------------------------
def round_adapters(agent_state: Path, rollout_round: int | None) -> dict[int, Path]:
    """after_round -> the adapter file an agent had after that round, from its ledger (`sdk.ledger`):
    for tri-lora the file holds the agent's own A and B beside the fleet's core, which the
    coordinator's registry does not have."""
    try:
        return Ledger.read(agent_state).after_rounds(rollout_round)
    except StateError:
        return {}


def _installed(coordinator_state: Path, version: str) -> set[str]:
    """Agents that acknowledged installing the latest rollout of `version`."""
    store = RolloutStore(coordinator_state / ROLLOUT_DB)
    try:
        rows = [r for r in store.rollouts(limit=20) if r.version == version]
        if not rows:
            return set()
        return {a.agent for a in store.acks(rows[0].id) if a.status in (INSTALLED, PINNED)}
    finally:
        store.close()


def last_round(run: FleetRun) -> int | None:
    return int(run.rounds[-1]["round"]) if run.rounds else None


def deliver_final(
    cfg: DemoConfig, procs: ProcessGroup, broker: BrokerInfo, run: FleetRun, wait_s: float = 60.0
) -> list[str]:
    """Roll the last round's adapters out to the agents (each its own, for personalized strategies,
    with the round's global adapter beside it for an open-set gate where that adapter is a model a
    device can serve: `rollout start --fallback`, `Strategy.shared_global`).

    The round loop only hands an aggregate to an agent with its next task, so without this the
    agents would never run the result of the last round. Returns the agents that did not install it.
    """
    if not run.rounds or not run.rounds[-1].get("global_version"):
        return sorted(run.agent_states)
    last = run.rounds[-1]
    options = flags(
        to="all", canary=0, fleet_wait=2, state=run.coordinator_state, broker=broker.url, fleet=cfg.fleet,
        stage_timeout=wait_s, wait_timeout=wait_s + 30,
    )  # fmt: skip
    strategy = strategies.get(cfg.strategy)
    if strategy.personalized and strategy.shared_global:
        options.append("--fallback")
    try:
        # --wait: `serve` has finished, so the rollout command itself records the agents' acks
        procs.run("rollout", coord_cli("rollout", "start", last["global_version"], "--wait", *options,
                                       *auth_flags(broker)), timeout_s=wait_s + 120)  # fmt: skip
    except ChildFailed as e:
        log.warning("final rollout failed: %s", e)
    # The rollout's acks tell which agents installed it (`installed`, or `pinned` to it).
    missing = sorted(set(run.agent_states) - _installed(run.coordinator_state, last["global_version"]))
    return missing
