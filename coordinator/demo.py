"""`fedclip-coord demo`: the whole job on one machine, with real processes and real MQTT.

Broker (embedded amqtt unless `--broker`), bundle export, non-IID partition of a real data set, the
coordinator and N `fedclip-agent start` processes; then an evaluation of every agent on its own
held-out test split after every round, and a report folder (JSON, Markdown table, PNG plot).

This module only orchestrates: every step is one of the public commands run as a child process
(`fedclip.coordinator.procs`), so the demo does exactly what a user's fleet would do, and the
benchmarks reuse `run_federation` to drive the same path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fedclip.coordinator.procs import (
    Child,
    ChildFailed,
    ProcessGroup,
    procs_wait,
    sigterm_as_interrupt,
    wait_port_free,
)
from fedclip.coordinator.rollout import KEY_DIR
from fedclip.sdk.errors import ConfigError, DataError, FedclipError
from fedclip.sdk.signing import ensure_keypair

log = logging.getLogger(__name__)

STRATEGY_ADAPTER = {"fedavg": "lora", "ce-lora": "tri-lora"}
FLEET = "demo"


@dataclass(frozen=True)
class DemoConfig:
    agents: int = 4
    rounds: int = 3
    strategy: str = "ce-lora"
    dataset: str = "auto"
    per_agent: int = 240
    dirichlet: float = 0.5
    shift: str = "per-agent"
    model: str = "fedclip-tiny"
    pretrained: str | None = None
    bundle: Path | None = None
    rank: int = 4
    alpha: float = 8.0
    targets: str = "q,v"
    towers: str = "vision,text"
    local_epochs: int = 1
    lr: float = 5e-3
    broker: str | None = None
    username: str | None = None
    password: str | None = None
    round_timeout: float = 120.0
    timeout: float = 900.0
    seed: int = 0
    # ce-lora's data-distance weight and temperature; None = the coordinator's defaults
    lam: float | None = None
    tau: float | None = None
    out: Path = Path("fedclip-demo")
    run_name: str = "run"
    fleet: str = FLEET

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_ADAPTER:
            raise ConfigError(f"--strategy: {self.strategy!r} is not one of {', '.join(STRATEGY_ADAPTER)}")
        if self.shift not in ("none", "per-agent"):
            raise ConfigError(f"--shift: {self.shift!r} is not one of none, per-agent")
        if self.dirichlet <= 0:
            raise ConfigError(f"--dirichlet: must be > 0, got {self.dirichlet}")
        if self.lr <= 0:
            raise ConfigError(f"--lr: must be > 0, got {self.lr}")
        if self.round_timeout <= 0 or self.timeout <= 0:
            raise ConfigError("--round-timeout, --timeout: must be > 0")
        if self.bundle is not None and not (Path(self.bundle) / "manifest.yaml").is_file():
            raise ConfigError(f"--bundle: {self.bundle} is not a bundle folder (no manifest.yaml)")

    @property
    def adapter(self) -> str:
        return STRATEGY_ADAPTER[self.strategy]

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / self.run_name


def _cli(module: str, *args: object) -> list[str]:
    """A fedclip command run by this interpreter, so the demo works without the venv on PATH."""
    return [sys.executable, "-m", module, *(str(a) for a in args)]


def coord_cli(*args: object) -> list[str]:
    return _cli("fedclip.coordinator.cli", *args)


def agent_cli(*args: object) -> list[str]:
    return _cli("fedclip.device_agent.cli", *args)


# ---- broker ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BrokerInfo:
    url: str  # without credentials: those go in flags and a 0600 file, never in `ps`
    username: str | None
    password_file: Path | None
    port: int | None  # the embedded broker's port, checked free again after the run


@contextlib.contextmanager
def broker_for(cfg: DemoConfig, secrets_dir: Path) -> Iterator[BrokerInfo]:
    pw_file = None
    if cfg.broker is not None:
        if cfg.password is not None:
            pw_file = _write_secret(secrets_dir / "broker-password", cfg.password)
        yield BrokerInfo(cfg.broker, cfg.username, pw_file, None)
        return
    from fedclip.sdk.broker import EmbeddedBroker

    broker = EmbeddedBroker()
    broker.start()
    try:
        pw_file = _write_secret(secrets_dir / "broker-password", broker.password)
        yield BrokerInfo(broker.plain_url, broker.username, pw_file, broker.port)
    finally:
        broker.stop()
        if not wait_port_free(broker.port, timeout_s=10):
            log.warning("port %d of the embedded broker is still taken after stop", broker.port)


def _write_secret(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


def flags(**options: object) -> list[str]:
    """`--name value` pairs for a command line; None is left out, underscores become dashes."""
    out: list[str] = []
    for name, value in options.items():
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def auth_flags(b: BrokerInfo) -> list[str]:
    return flags(username=b.username, password_file=b.password_file)


# ---- data and bundle ---------------------------------------------------------------------------
def resolve_dataset(name: str) -> str:
    """The partition command's --dataset for `name`; `auto` picks what this machine has."""
    from fedclip.sdk.partition import FASHION_MNIST_DIR

    if name != "auto":
        return name
    if all((FASHION_MNIST_DIR / f"{s}-labels-idx1-ubyte.gz").is_file() for s in ("train", "t10k")):
        return "fashion-mnist"
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        raise DataError(
            "no data set found: install Fashion-MNIST (Debian/Ubuntu: "
            "apt-get install dataset-fashion-mnist), or scikit-learn for its digits "
            "(pip install scikit-learn), or pass --dataset imagefolder:PATH"
        ) from None
    return "digits"


def read_partition(data_dir: Path) -> tuple[list[str], list[str]]:
    """(labels, agent ids) of a partition folder written by `fedclip-coord partition`."""
    meta = data_dir / "partition.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        labels = list(info["labels"])
        agents = list(info.get("agents") or [])
        if isinstance(agents, dict):
            agents = list(agents)
        agents = [a if isinstance(a, str) else a["id"] for a in agents]
    else:
        labels, agents = [], []
    if not agents:
        agents = sorted(p.name for p in data_dir.iterdir() if (p / "train").is_dir())
    if not labels or not agents:
        raise DataError(f"{data_dir}: the partition wrote no labels or no agents")
    return labels, agents


def partition(cfg: DemoConfig, procs: ProcessGroup, out: Path, dataset: str) -> Path:
    options = flags(
        dataset=dataset, agents=cfg.agents, dirichlet=cfg.dirichlet, shift=cfg.shift,
        per_agent=cfg.per_agent, seed=cfg.seed, out=out,
    )  # fmt: skip
    procs.run("partition", coord_cli("partition", *options), timeout_s=300)
    return out


def export(cfg: DemoConfig, procs: ProcessGroup, labels: list[str], out: Path) -> Path:
    # A labels file, not a comma list: class names may hold commas.
    labels_file = out.parent / f"{out.name}-labels.txt"
    labels_file.write_text("\n".join(labels) + "\n")
    options = flags(
        model=cfg.model, pretrained=cfg.pretrained, adapter=cfg.adapter, rank=cfg.rank, alpha=cfg.alpha,
        targets=cfg.targets, towers=cfg.towers, task="classify", labels=labels_file, seed=cfg.seed, out=out,
    )  # fmt: skip
    procs.run("export", coord_cli("export", *options), timeout_s=600)
    return out


def check_bundle(cfg: DemoConfig, bundle: Path, labels: list[str]) -> Path:
    """A given --bundle must fit the strategy and the data, or every agent would fail one by one."""
    from fedclip.sdk.manifest import Manifest

    manifest = Manifest.load(bundle)
    if manifest.adapter.kind != cfg.adapter:
        raise ConfigError(
            f"--bundle: has {manifest.adapter.kind} adapters; --strategy {cfg.strategy} needs {cfg.adapter}"
        )
    if manifest.task.kind != "classify" or list(manifest.task.labels) != list(labels):
        raise ConfigError(
            f"--bundle: its labels ({', '.join(manifest.task.labels[:5])}, ...) are not the data set's "
            f"({', '.join(labels[:5])}, ...); export it with --labels from the same data set"
        )
    return bundle


# ---- the federation ----------------------------------------------------------------------------
@dataclass
class FleetRun:
    """What one federated run left behind, for the report."""

    rounds: list[dict] = field(default_factory=list)  # the coordinator's per-round JSON lines
    seconds: float = 0.0
    costs: dict[int, dict[str, float]] = field(default_factory=dict)  # round -> seconds, bytes
    final_missing: list[str] = field(default_factory=list)  # agents without the last round's adapter
    coordinator_state: Path | None = None
    agent_states: dict[str, Path] = field(default_factory=dict)


def round_records(state_dir: Path) -> list[dict]:
    """Aggregated rounds from the coordinator's per-round JSON lines (`metrics.jsonl` in its state dir)."""
    records: dict[int, dict] = {}
    for path in sorted(state_dir.glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written right now
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
) -> FleetRun:
    """Coordinator + one agent process per id; returns when the coordinator has run every round."""
    run = FleetRun(coordinator_state=work / "coordinator")
    # `serve` takes broker credentials from its YAML config only (keeps them out of `ps`).
    coord_yaml = {"username": broker.username} if broker.username else {}
    if broker.password_file is not None:
        coord_yaml["password"] = broker.password_file.read_text().strip()
    config = _write_secret(work / "secrets" / "coordinator.yaml", json.dumps(coord_yaml))  # JSON is YAML
    options = flags(
        config=config, broker=broker.url, fleet=cfg.fleet, bundle=bundle, state=run.coordinator_state,
        strategy=cfg.strategy, rounds=cfg.rounds, clients_per_round=len(agent_ids),
        min_updates=len(agent_ids), round_timeout=cfg.round_timeout, local_epochs=cfg.local_epochs,
        lr=cfg.lr, seed=cfg.seed, lam=cfg.lam, tau=cfg.tau,
    )  # fmt: skip
    # The key pair exists before any agent starts, so every agent gets its public half and only
    # signed rollouts (`deliver_final`) can change its adapter; `serve` reuses the pair.
    _, coordinator_key = ensure_keypair(run.coordinator_state / KEY_DIR)
    coordinator = procs.spawn("coordinator", coord_cli("serve", *options))
    for aid in agent_ids:
        run.agent_states[aid] = work / "agents" / aid
        options = flags(
            broker=broker.url, fleet=cfg.fleet, id=aid, bundle=bundle, data=data_dir / aid / "train",
            state=run.agent_states[aid], threads=1, coordinator_key=coordinator_key,
        )  # fmt: skip
        procs.spawn(f"agent-{aid}", agent_cli("start", *options, *auth_flags(broker)))
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


def round_costs(state_dir: Path) -> dict[int, dict[str, float]]:
    """Per aggregated round: seconds from start to close, bytes down (tasks) and up (updates).

    Read from the coordinator's store: a task blob is the exact payload sent; an update's
    `wire_bytes` is its payload as received. Rows from before that column fall back to the stored
    blob's size (its tensors and statistics, without the envelope's few hundred bytes); the blob is
    not the uplink any more, since it also holds statistics the coordinator already had.
    """
    from fedclip.coordinator.store import Store

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


def _size(store, blob: str) -> int:
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


# ---- final adapters and evaluation --------------------------------------------------------------
def agent_adapters(state_dir: Path, rollout_round: int | None = None) -> dict[int, Path]:
    """after_round -> adapter file, from the agent's state record.

    An adapter that came with the task of round r is the model after round r - 1 (round 1's is the
    exported one); one that came by rollout of round r's version is the model after round r. Signed
    rollouts record no round; the demo's only rollout (`deliver_final`) is of round `rollout_round`,
    under per-agent versions for personalized strategies, so the source alone places it.
    """
    try:
        record = json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    found: dict[int, tuple[float, Path]] = {}
    for entry in record.get("adapters", {}).values():
        path = state_dir / entry["file"]
        rnd = int(entry.get("round", -1))
        if rnd < 0 and entry.get("source") == "rollout":
            rnd = -1 if rollout_round is None else rollout_round
        if not path.is_file() or rnd < 0:
            continue
        after = rnd - 1 if entry.get("source") == "task" else rnd
        at = float(entry.get("installed_at", 0.0))
        if after not in found or at >= found[after][0]:  # the latest install of a round wins
            found[after] = (at, path)
    return {r: p for r, (_, p) in sorted(found.items())}


def _last_round(run: FleetRun) -> int | None:
    return int(run.rounds[-1]["round"]) if run.rounds else None


def deliver_final(
    cfg: DemoConfig, procs: ProcessGroup, broker: BrokerInfo, run: FleetRun, wait_s: float = 60.0
) -> list[str]:
    """Roll the last round's adapters out to the agents (each its own, for personalized strategies).

    The round loop only hands an aggregate to an agent with its next task, so without this the
    agents would never run the result of the last round. Returns the agents that did not install it.
    """
    if not run.rounds or not run.rounds[-1].get("global_version"):
        return sorted(run.agent_states)
    last = run.rounds[-1]
    options = flags(
        to="all", canary=0, fleet_wait=2, state=run.coordinator_state, broker=broker.url, fleet=cfg.fleet,
    )  # fmt: skip
    try:
        procs.run("rollout", coord_cli("rollout", "start", last["global_version"], *options,
                                       *auth_flags(broker)), timeout_s=120)  # fmt: skip
    except ChildFailed as e:
        log.warning("final rollout failed: %s", e)
        return sorted(run.agent_states)
    deadline = time.monotonic() + wait_s
    missing = sorted(run.agent_states)
    while missing and time.monotonic() < deadline:
        procs.check(allow_exit=("coordinator",))
        missing = [
            a for a in missing if last["round"] not in agent_adapters(run.agent_states[a], _last_round(run))
        ]
        time.sleep(0.5)
    return missing


def spawn_eval(
    procs: ProcessGroup,
    name: str,
    bundle: Path,
    data: Path,
    adapter: Path | None,
    cache_dir: Path | None = None,
) -> Child:
    """Start `fedclip-agent eval --json` on one split; `finish_eval` collects its result.

    `cache_dir`: the image-embedding cache of text-tower bundles. Give each agent its own: evals
    running side by side on one cache folder can lose its data file (see docs/demo.md).
    """
    options = flags(bundle=bundle, data=data, adapter=adapter, threads=1, cache_dir=cache_dir)
    args = ["eval", *options, "--quiet", "--json"]
    return procs.spawn(name, agent_cli(*args), capture=True)


def finish_eval(child: Child, timeout_s: float = 300.0) -> dict:
    """The JSON (accuracy, loss, num_samples) an eval child printed; ChildFailed if it failed."""
    text = procs_wait(child, timeout_s)
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            result = json.loads(line)
            if isinstance(result, dict) and isinstance(result.get("accuracy"), (int, float)):
                return result
    raise ChildFailed(f"{child.name}: `fedclip-agent eval --json` printed no accuracy")


def accuracy_per_round(
    procs: ProcessGroup, bundle: Path, data_dir: Path, run: FleetRun, rounds: int, console: Console | None
) -> dict[str, list[float | None]]:
    """accuracy[agent][r] on the agent's test split: r = 0 before any round, r = k after round k."""
    acc: dict[str, list[float | None]] = {}
    jobs = []
    for aid, state in run.agent_states.items():
        acc[aid] = [None] * (rounds + 1)
        adapters = agent_adapters(state, _last_round(run))
        adapters[0] = None  # the bundle's own initial adapter
        jobs += [(aid, r, adapters[r]) for r in range(rounds + 1) if r in adapters]
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, disable=console is None) as progress:
        bar = progress.add_task("evaluating every agent on its own test split", total=len(jobs))
        # Two at a time (each eval is one ORT session on one thread), never two of one agent.
        pending = sorted(jobs, key=lambda j: (j[1], j[0]))
        running: list[tuple[str, int, Child]] = []
        while pending or running:
            while pending and len(running) < 2:
                aid, r, adapter = pending.pop(0)
                cache = run.agent_states[aid] / "eval-embeddings"
                child = spawn_eval(procs, f"eval-{aid}-r{r}", bundle, data_dir / aid / "test", adapter, cache)
                running.append((aid, r, child))
            aid, r, child = running.pop(0)
            acc[aid][r] = float(finish_eval(child)["accuracy"])
            progress.advance(bar)
    # A round an agent sat out keeps its previous adapter.
    for series in acc.values():
        for r in range(1, len(series)):
            if series[r] is None:
                series[r] = series[r - 1]
    return acc


# ---- report ------------------------------------------------------------------------------------
def _num(rec: dict, *keys: str) -> float | None:
    for k in keys:
        v = rec.get(k)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def build_report(
    cfg: DemoConfig,
    dataset: str,
    labels: list[str],
    run: FleetRun,
    acc: dict[str, list[float | None]],
    wall_s: float,
) -> dict:
    rounds = []
    for rec in run.rounds:
        rec = {**rec, **run.costs.get(rec["round"], {})}
        up, down = _num(rec, "uplink_bytes"), _num(rec, "downlink_bytes")
        rounds.append(
            {
                "round": rec["round"],
                "seconds": _num(rec, "seconds"),
                "uplink_bytes": up,
                "downlink_bytes": down,
                "bytes": (up or 0) + (down or 0) if up is not None or down is not None else None,
                "updates": rec.get("updates"),
                "agent_metrics": rec.get("metrics", {}),
            }
        )
    agents = {
        aid: {"accuracy_before": s[0], "accuracy_after": s[-1], "accuracy_per_round": s}
        for aid, s in acc.items()
    }
    before = [a["accuracy_before"] for a in agents.values() if a["accuracy_before"] is not None]
    after = [a["accuracy_after"] for a in agents.values() if a["accuracy_after"] is not None]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "password"}
    return {
        "config": config,
        "dataset": dataset,
        "labels": labels,
        "agents": agents,
        "rounds": rounds,
        "mean_accuracy_before": sum(before) / len(before) if before else None,
        "mean_accuracy_after": sum(after) / len(after) if after else None,
        "bytes_total": sum(r["bytes"] or 0 for r in rounds),
        "federation_seconds": run.seconds,
        "total_seconds": wall_s,
        "run_dir": str(cfg.run_dir),
        "notes": _notes(cfg, run),
    }


def _notes(cfg: DemoConfig, run: FleetRun) -> list[str]:
    notes = []
    if cfg.pretrained is None and cfg.bundle is None:
        notes.append(f"{cfg.model} has random weights (no --pretrained): accuracies start near chance")
    if run.final_missing:
        notes.append(
            "the last round's adapter did not reach "
            + ", ".join(run.final_missing)
            + "; their 'after' accuracy is that of the round before"
        )
    return notes


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _fmt_acc(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def report_tables(report: dict) -> tuple[Table, Table]:
    agents = Table(title="accuracy on each agent's own test split")
    for col in ("agent", "before", "after", "change"):
        agents.add_column(col, justify="left" if col == "agent" else "right")
    for aid, a in report["agents"].items():
        b, f = a["accuracy_before"], a["accuracy_after"]
        delta = "-" if b is None or f is None else f"{100 * (f - b):+.1f}"
        agents.add_row(aid, _fmt_acc(b), _fmt_acc(f), delta)
    agents.add_row(
        "mean",
        _fmt_acc(report["mean_accuracy_before"]),
        _fmt_acc(report["mean_accuracy_after"]),
        "",
        style="bold",
    )
    rounds = Table(title="rounds")
    for col in ("round", "seconds", "uplink", "downlink", "updates"):
        rounds.add_column(col, justify="right")
    total_s = sum(r["seconds"] or 0 for r in report["rounds"])
    total_up = sum(r["uplink_bytes"] or 0 for r in report["rounds"])
    total_down = sum(r["downlink_bytes"] or 0 for r in report["rounds"])
    for r in report["rounds"]:
        rounds.add_row(
            str(r["round"]),
            "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
            _fmt_bytes(r["uplink_bytes"]),
            _fmt_bytes(r["downlink_bytes"]),
            str(r["updates"] or "-"),
        )
    rounds.add_row("total", f"{total_s:.1f}", _fmt_bytes(total_up), _fmt_bytes(total_down), "", style="bold")
    return agents, rounds


def write_markdown(report: dict, path: Path) -> None:
    lines = [
        f"# fedclip demo: {report['config']['strategy']}, {len(report['agents'])} agents, "
        f"{report['dataset']}",
        "",
        "| agent | before | after |",
        "|---|---:|---:|",
    ]
    for aid, a in report["agents"].items():
        lines.append(f"| {aid} | {_fmt_acc(a['accuracy_before'])} | {_fmt_acc(a['accuracy_after'])} |")
    lines.append(
        f"| **mean** | {_fmt_acc(report['mean_accuracy_before'])} | "
        f"{_fmt_acc(report['mean_accuracy_after'])} |"
    )
    lines += ["", "| round | seconds | uplink | downlink |", "|---:|---:|---:|---:|"]
    for r in report["rounds"]:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(
            f"| {r['round']} | {secs} | {_fmt_bytes(r['uplink_bytes'])} | {_fmt_bytes(r['downlink_bytes'])} |"
        )
    lines += ["", f"Total wall time {report['total_seconds']:.0f} s; run folder `{report['run_dir']}`.", ""]
    path.write_text("\n".join(lines))


def plot_accuracy(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a device or in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    series = [a["accuracy_per_round"] for a in report["agents"].values()]
    for aid, ys in zip(report["agents"], series, strict=True):
        ax.plot(
            range(len(ys)), [float("nan") if y is None else y for y in ys], marker="o", label=aid, alpha=0.6
        )
    if series:
        mean = [sum(v for v in col if v is not None) / max(1, sum(v is not None for v in col))
                for col in zip(*series, strict=True)]  # fmt: skip
        ax.plot(range(len(mean)), mean, "k-", lw=2.5, marker="s", label="mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = before federation)")
    ax.set_ylabel("accuracy on own test split")
    ax.set_title(f"fedclip demo: {report['config']['strategy']} on {report['dataset']}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the command -------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    """Everything `fedclip-coord demo` does; returns the report (also written to cfg.out)."""
    t0 = time.monotonic()
    work = cfg.run_dir
    work.mkdir(parents=True, exist_ok=False)
    say = console.print if console is not None else (lambda *a, **k: None)
    say(
        f"[bold]fedclip demo[/bold]: {cfg.agents} agents, {cfg.rounds} rounds of {cfg.strategy}; "
        f"run folder {work}"
    )
    with (
        sigterm_as_interrupt(),
        broker_for(cfg, work / "secrets") as broker,
        ProcessGroup(log_dir=work / "logs") as procs,
    ):
        say(f"broker: {broker.url}" + (" (embedded amqtt)" if broker.port else ""))
        dataset = resolve_dataset(cfg.dataset)
        with _status(console, f"partitioning {dataset} into {cfg.agents} non-IID agents"):
            data_dir = partition(cfg, procs, work / "data", dataset)
        labels, agent_ids = read_partition(data_dir)
        if cfg.bundle is not None:
            bundle = check_bundle(cfg, Path(cfg.bundle), labels)
        else:
            with _status(console, f"exporting {cfg.model} with {cfg.adapter} adapters (rank {cfg.rank})"):
                bundle = export(cfg, procs, labels, work / "bundle")
        run = run_federation(cfg, procs, broker, bundle, data_dir, agent_ids, work, console)
        with _status(console, "rolling the last round's adapters out to the agents"):
            run.final_missing = deliver_final(cfg, procs, broker, run)
        procs.stop_all()  # the agents are done; evaluation reads the adapters they installed
        run.costs = round_costs(run.coordinator_state)
        acc = accuracy_per_round(procs, bundle, data_dir, run, cfg.rounds, console)
    report = build_report(cfg, dataset, labels, run, acc, time.monotonic() - t0)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (work / "report.json").write_text(json.dumps(report, indent=1))
    (cfg.out / "report.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, cfg.out / "report.md")
    plot_accuracy(report, cfg.out / "accuracy.png")
    if console is not None:
        for table in report_tables(report):
            console.print(table)
    return report


@contextlib.contextmanager
def _status(console: Console | None, text: str) -> Iterator[None]:
    if console is None:
        yield
        return
    with console.status(text):
        yield
    console.print(f"[green]done[/green] {text}")


def demo(
    agents: int = typer.Option(
        4, "--agents", min=1, max=64, help="Number of device agents (processes) to start."
    ),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Federated rounds to run."),
    strategy: str = typer.Option(
        "ce-lora", "--strategy", help="ce-lora (tri-LoRA, personalized) or fedavg (LoRA, plain averaging)."
    ),
    dataset: str = typer.Option(
        "auto",
        "--dataset",
        help="auto (Fashion-MNIST if installed, else sklearn digits), fashion-mnist, digits, "
        "or imagefolder:PATH.",
    ),
    per_agent: int = typer.Option(240, "--per-agent", min=8, help="Images per agent (train + test)."),
    dirichlet: float = typer.Option(
        0.5, "--dirichlet", help="Label skew: Dirichlet beta (smaller = less IID)."
    ),
    shift: str = typer.Option("per-agent", "--shift", help="Per-agent camera shift: none or per-agent."),
    model: str = typer.Option(
        "fedclip-tiny", "--model", help="Model to export (built-in, open_clip name or JSON)."
    ),
    pretrained: str | None = typer.Option(
        None, "--pretrained", help="Weights file or open_clip tag for --model."
    ),
    bundle: Path | None = typer.Option(
        None, "--bundle", help="Use this exported bundle instead of exporting one."
    ),
    rank: int = typer.Option(4, "--rank", min=1, help="LoRA rank."),
    alpha: float = typer.Option(8.0, "--alpha", help="LoRA alpha."),
    targets: str = typer.Option("q,v", "--targets", help="Attention projections that get adapters."),
    towers: str = typer.Option("vision,text", "--towers", help="Towers that get adapters."),
    local_epochs: int = typer.Option(1, "--local-epochs", min=1, help="Local epochs per round."),
    lr: float = typer.Option(5e-3, "--lr", help="Local learning rate."),
    broker: str | None = typer.Option(
        None, "--broker", help="Use this MQTT broker (mqtt://host:port) instead of starting the embedded one."
    ),
    username: str | None = typer.Option(None, "--username", help="Username for --broker."),
    password_file: Path | None = typer.Option(
        None, "--password-file", help="File with the password for --broker."
    ),
    round_timeout: float = typer.Option(120.0, "--round-timeout", help="Seconds a round waits for updates."),
    timeout: float = typer.Option(900.0, "--timeout", help="Give up (and clean up) after this many seconds."),
    seed: int = typer.Option(0, "--seed", help="Seed for the partition and the training."),
    out: Path = typer.Option(
        Path("fedclip-demo"), "--out", help="Report folder; each run's files go to OUT/runs/."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details."),
) -> None:
    """Run the main job end to end on this machine: broker, export, partition, coordinator, N agents.

    Shows progress, then a table of per-agent accuracy before/after and bytes and time per round, and
    writes OUT/report.json, OUT/report.md and OUT/accuracy.png. Every process and port it starts is
    released on exit, on Ctrl-C and on SIGTERM; a second run needs no cleanup.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if password_file is not None and broker is None:
        raise ConfigError("--password-file: only with --broker (the embedded broker makes its own)")
    password = None
    if password_file is not None:
        try:
            password = password_file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"--password-file: cannot read {password_file} ({e.strerror or e})") from None
    cfg = DemoConfig(
        agents=agents,
        rounds=rounds,
        strategy=strategy,
        dataset=dataset,
        per_agent=per_agent,
        dirichlet=dirichlet,
        shift=shift,
        model=model,
        pretrained=pretrained,
        bundle=bundle,
        rank=rank,
        alpha=alpha,
        targets=targets,
        towers=towers,
        local_epochs=local_epochs,
        lr=lr,
        broker=broker,
        username=username,
        password=password,
        round_timeout=round_timeout,
        timeout=timeout,
        seed=seed,
        out=out,
        run_name=f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}",
    )
    console = Console()
    try:
        run_demo(cfg, console)
    except ChildFailed as e:
        raise FedclipError(f"demo stopped: {e}") from None
    except KeyboardInterrupt:
        # run_demo's context managers have stopped the children and the broker by now.
        console.print(
            f"[yellow]interrupted[/yellow]: every process the demo started is stopped; files in {cfg.run_dir}"
        )
        raise
    console.print(
        f"[bold]report:[/bold] {cfg.out / 'report.json'}, {cfg.out / 'report.md'}, {cfg.out / 'accuracy.png'}"
    )
