"""`fedclip-coord serve` (the round loop) and `fedclip-coord status` (the fleet table from the state dir)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import typer

from fedclip.coordinator.json_out import JSON_OPTION, print_json
from fedclip.sdk.cli import setup_logging


class _LiveView:
    """A rich progress bar per round (updates received / selected, time left), on terminals only."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

        console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
            disable=not console.is_terminal,
        )
        self.task: TaskID | None = None
        self.round = None
        self.progress.start()

    def __call__(self, event: str, server) -> None:
        st = server.current
        if event == "waiting":
            online = server.fleet.eligible_count(server.manifest.bundle_id)
            note = f"waiting for agents ({online} online)"
            self._show("idle", 0, 1, note)
        elif st is not None:
            left = max(0.0, st.deadline - time.time())
            self._show(
                f"round {st.round}",
                len(st.received),
                len(st.selected),
                f"{left:.0f}s left" + (" (extended)" if st.extended else ""),
            )

    def _show(self, desc: str, done: int, total: int, note: str) -> None:
        if self.task is None:
            self.task = self.progress.add_task(desc, total=total, note=note)
        self.progress.update(self.task, description=desc, completed=done, total=total, note=note)

    def stop(self) -> None:
        self.progress.stop()


def serve(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML file; flags given override it."),
    broker: str | None = typer.Option(None, help="Broker URL, mqtt://host:port or mqtts://host:port."),
    username: str | None = typer.Option(None, help="Broker user (fedclip.coordinator when provisioned)."),
    password_file: Path | None = typer.Option(
        None, "--password-file", help="File holding the broker password (not world-readable)."
    ),
    fleet: str | None = typer.Option(None, help="Fleet name (topic root fedclip/<fleet>/)."),
    bundle: Path | None = typer.Option(None, help="Bundle directory from `fedclip-coord export`."),
    state: Path | None = typer.Option(
        None, help="State directory (SQLite + adapter blobs); reuse it to resume."
    ),
    strategy: str | None = typer.Option(
        None, help="fedavg, trimmed-mean, ce-lora, fleet-core or fleet-lora (docs/aggregation.md)."
    ),
    rounds: int | None = typer.Option(None, help="Aggregated rounds to run, then exit."),
    clients_per_round: int | None = typer.Option(None, help="Agents per round (0: all online)."),
    min_updates: int | None = typer.Option(None, help="Quorum: updates needed to aggregate a round."),
    round_timeout: float | None = typer.Option(None, help="Seconds until a round's deadline."),
    local_epochs: int | None = typer.Option(None, help="Local epochs per round."),
    lr: float | None = typer.Option(None, help="Local learning rate."),
    loss: str | None = typer.Option(
        None,
        help="Local loss: auto (default: balanced-softmax where the bundle can train it, else ce), ce, or "
        "balanced-softmax (agents train without their label mix and add it back at inference; "
        "docs/aggregation.md).",
    ),
    seed: int | None = typer.Option(None, help="Seed for agent selection."),
    selection: str | None = typer.Option(
        None, help="How K agents are picked: random (seeded), fair (least recently selected first) or all."
    ),
    group_by: str | None = typer.Option(
        None, help="Share K among agent groups: an agent's group is its first group label with this prefix."
    ),
    group_quota: str | None = typer.Option(None, help="With --group-by: proportional (default) or equal."),
    max_status_age: float | None = typer.Option(
        None, help="Select only agents heard from within this many seconds (default 0: no limit)."
    ),
    max_missed: int | None = typer.Option(
        None, help="Rest an agent that left this many tasks in a row unanswered until it speaks (0: never)."
    ),
    batch_size: int | None = typer.Option(None, help="Local batch size."),
    lam: float | None = typer.Option(None, help="ce-lora: weight of the data distance (0..1)."),
    tau: float | None = typer.Option(None, help="ce-lora: softmax temperature over distances."),
    trim_fraction: float | None = typer.Option(None, help="trimmed-mean: share dropped at each end."),
    neighbours: int | None = typer.Option(
        None, help="ce-lora: weights over each agent's k nearest agents (default 32; 0 = all)."
    ),
    stats_refresh_rounds: int | None = typer.Option(
        None,
        help="ce-lora: ask agents for their data statistics again once the held ones are this many "
        "rounds old (default 0: only when an agent's data changes).",
    ),
    max_update_norm: float | None = typer.Option(None, help="L2 bound on an update (0: none)."),
    robust_factor: float | None = typer.Option(
        None, help="Cap samples and clip deltas at this factor x the round's median, from 3 updates (0: off)."
    ),
    norm_action: str | None = typer.Option(None, help="What to do above the bound: clip or reject."),
    http: bool | None = typer.Option(
        None, "--http/--no-http", help="Serve the bundle over HTTP for agents (default: on)."
    ),
    http_host: str | None = typer.Option(None, help="Address of the bundle server (default 127.0.0.1)."),
    http_port: int | None = typer.Option(None, help="Port of the bundle server (default 0: a free one)."),
    ops_port: int | None = typer.Option(
        None, help="Serve /metrics (Prometheus) and the read-only dashboard on this port (0: a free one)."
    ),
    ops_host: str | None = typer.Option(None, help="Address of the ops endpoint (default 127.0.0.1)."),
    ops_auth_file: Path | None = typer.Option(
        None, help="File with user:password: the ops endpoint asks for HTTP basic auth."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run federated rounds over MQTT until --rounds rounds are aggregated; resumes from --state.

    Meanwhile it serves the bundle over HTTP (URL logged and in the retained coordinator status),
    signs with the key in <state>/keys (made on first start) and drives open rollouts.
    """
    from fedclip.coordinator.config import CoordConfig
    from fedclip.coordinator.registry import load_initial_adapter
    from fedclip.coordinator.server import Server
    from fedclip.sdk.manifest import Manifest

    setup_logging(verbose, quiet)
    flags = dict(
        broker=broker,
        username=username,
        password_file=password_file,
        fleet=fleet,
        bundle=bundle,
        state=state,
        strategy=strategy,
        rounds=rounds,
        clients_per_round=clients_per_round,
        min_updates=min_updates,
        round_timeout=round_timeout,
        local_epochs=local_epochs,
        lr=lr,
        loss=loss,
        seed=seed,
        max_update_norm=max_update_norm,
        robust_factor=robust_factor,
        norm_action=norm_action,
        selection=selection,
        group_by=group_by,
        group_quota=group_quota,
        max_status_age=max_status_age,
        max_missed=max_missed,
        batch_size=batch_size,
        lam=lam,
        tau=tau,
        trim_fraction=trim_fraction,
        neighbours=neighbours,
        stats_refresh_rounds=stats_refresh_rounds,
        http=http,
        http_host=http_host,
        http_port=http_port,
        ops_port=ops_port,
        ops_host=ops_host,
        ops_auth_file=ops_auth_file,
    )
    cfg = CoordConfig.load(config, {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()})
    cfg = cfg.with_secret()
    manifest = Manifest.load(cfg.bundle)
    view = _LiveView() if sys.stderr.isatty() else None
    ops = None
    try:
        server = Server.from_config(cfg, manifest, load_initial_adapter(cfg.bundle, manifest), view)
        ops = start_ops(cfg.state, cfg.ops_host, cfg.ops_port, cfg.ops_auth_file)
        server.run()
    finally:
        if ops is not None:
            ops.stop()
        if view is not None:
            view.stop()


def start_ops(state: Path | str, host: str, port: int | None, auth_file: str | Path | None):
    """The ops endpoint (`/metrics`, dashboard) on `host:port`, or None when no port is given."""
    if port is None:
        return None
    from fedclip.coordinator.ops_server import OpsServer, read_credentials

    creds = read_credentials(auth_file) if auth_file else None
    ops = OpsServer(state, host, port, creds).start()
    logging.getLogger("fedclip.coordinator").info(
        "ops: dashboard at %s/ and Prometheus metrics at %s/metrics%s",
        ops.url,
        ops.url,
        " (basic auth)" if creds else "",
    )
    return ops


def status(
    state: Path = typer.Option(..., help="The coordinator's state directory."),
    plot: Path | None = typer.Option(None, help="Also write the per-round metrics plot (PNG) here."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show the fleet: agents, online, last round, adapter versions, metrics."""
    from rich.console import Console
    from rich.table import Table

    from fedclip.coordinator.fleet_view import FleetView
    from fedclip.coordinator.metrics import METRICS_FILE, MetricsLog, headline
    from fedclip.coordinator.metrics import plot as plot_metrics

    with FleetView(state) as view:
        doc = {**view.summary(), "fleet_metrics": view.fleet_metrics(), "agents": view.agents()}
    if plot is not None:
        out = plot_metrics(MetricsLog(Path(state) / METRICS_FILE).read(), plot)
        doc["plot"] = str(out)
    if as_json:
        print_json(doc)
        return
    console = Console()
    bundle, rounds = doc["bundle_id"] or "", doc["round_counts"]
    console.print(
        f"fleet [bold]{doc['fleet']}[/]  bundle {bundle[:12]}  strategy {doc['strategy']}  "
        f"global adapter {doc['global_version']}"
    )
    if rounds["last"] is not None:
        console.print(
            f"rounds: {rounds['aggregated']} aggregated, {rounds['failed']} failed; "
            f"last round {rounds['last']} is {rounds['last_state']}"
        )
    last_done = doc["fleet_metrics"]["round"]
    table = Table("agent", "online", "bundle", "adapter version", "last round", "personal adapter", "metrics")
    for a in doc["agents"]:
        m = a["metrics"] if a["metrics_round"] == last_done else {}
        shown = ", ".join(f"{k}={v:.3g}" for k, v in sorted(m.items()) if v is not None and headline(k))
        table.add_row(
            a["agent"],
            "yes" if a["online"] else "no",
            (a["bundle_id"] or "")[:12],
            (a["adapter_version"] or "-")
            + (f" (fallback {a['open_set_fallback']})" if a["open_set_fallback"] else ""),
            str(a["last_round"]),
            a["personal_version"] or "-",
            shown or "-",
        )
    console.print(table)
    fleet_metrics = doc["fleet_metrics"]["metrics"]
    if fleet_metrics:
        console.print(
            "fleet metrics (last round): "
            + ", ".join(f"{k}={v:.4g}" for k, v in sorted(fleet_metrics.items()) if v is not None)
        )
    if plot is not None:
        console.print(f"plot written to {doc['plot']}")
