"""`fedclip-coord serve` (the round loop) and `fedclip-coord status` (the fleet table from the state dir)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from fedclip.sdk.cli import setup_logging


class _LiveView:
    """A rich progress bar per round (updates received / selected, time left), on terminals only."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
            disable=not console.is_terminal,
        )
        self.task = None
        self.round = None
        self.progress.start()

    def __call__(self, event: str, server) -> None:
        st = server.current
        if event == "waiting":
            online = len(server.fleet.compatible_online(server.manifest.bundle_id))
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
    fleet: str | None = typer.Option(None, help="Fleet name (topic root fedclip/<fleet>/)."),
    bundle: Path | None = typer.Option(None, help="Bundle directory from `fedclip-coord export`."),
    state: Path | None = typer.Option(
        None, help="State directory (SQLite + adapter blobs); reuse it to resume."
    ),
    strategy: str | None = typer.Option(None, help="fedavg, trimmed-mean or ce-lora."),
    rounds: int | None = typer.Option(None, help="Aggregated rounds to run, then exit."),
    clients_per_round: int | None = typer.Option(None, help="Agents per round (0: all online)."),
    min_updates: int | None = typer.Option(None, help="Quorum: updates needed to aggregate a round."),
    round_timeout: float | None = typer.Option(None, help="Seconds until a round's deadline."),
    local_epochs: int | None = typer.Option(None, help="Local epochs per round."),
    lr: float | None = typer.Option(None, help="Local learning rate."),
    seed: int | None = typer.Option(None, help="Seed for agent selection."),
    selection: str | None = typer.Option(None, help="How K agents are picked: random (seeded) or all."),
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
    norm_action: str | None = typer.Option(None, help="What to do above the bound: clip or reject."),
    http: bool | None = typer.Option(
        None, "--http/--no-http", help="Serve the bundle over HTTP for agents (default: on)."
    ),
    http_host: str | None = typer.Option(None, help="Address of the bundle server (default 127.0.0.1)."),
    http_port: int | None = typer.Option(None, help="Port of the bundle server (default 0: a free one)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run federated rounds over MQTT until --rounds rounds are aggregated; resumes from --state.

    Meanwhile it serves the bundle over HTTP (URL logged and in the retained coordinator status),
    signs with the key in <state>/keys (made on first start) and drives open rollouts.
    """
    from fedclip.coordinator.config import CoordConfig
    from fedclip.coordinator.server import Server, load_initial_adapter
    from fedclip.sdk.manifest import Manifest

    setup_logging(verbose, quiet)
    flags = dict(
        broker=broker,
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
        seed=seed,
        max_update_norm=max_update_norm,
        norm_action=norm_action,
        selection=selection,
        batch_size=batch_size,
        lam=lam,
        tau=tau,
        trim_fraction=trim_fraction,
        neighbours=neighbours,
        stats_refresh_rounds=stats_refresh_rounds,
        http=http,
        http_host=http_host,
        http_port=http_port,
    )
    cfg = CoordConfig.load(config, {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()})
    manifest = Manifest.load(cfg.bundle)
    view = _LiveView() if sys.stderr.isatty() else None
    try:
        server = Server(cfg, manifest, load_initial_adapter(cfg.bundle, manifest), progress=view)
        server.run()
    finally:
        if view is not None:
            view.stop()


def status(
    state: Path = typer.Option(..., help="The coordinator's state directory."),
    plot: Path | None = typer.Option(None, help="Also write the per-round metrics plot (PNG) here."),
) -> None:
    """Show the fleet: agents, online, last round, adapter versions, metrics."""
    from rich.console import Console
    from rich.table import Table

    from fedclip.coordinator.metrics import METRICS_FILE, MetricsLog
    from fedclip.coordinator.metrics import plot as plot_metrics
    from fedclip.coordinator.store import Store

    console = Console()
    with Store(state, readonly=True) as store:
        agents = store.agents()
        rounds = store.rounds()
        heads = {v.agent: v.version for v in store.versions("agent")}
        gv = store.head("global")
        per_agent: dict[str, dict[str, float]] = {}
        last_done = next((r for r in reversed(rounds) if r.state == "aggregated"), None)
        if last_done is not None:
            for _rnd, agent, name, value in store.metrics(last_done.round):
                per_agent.setdefault(agent, {})[name] = value
        fleet, bundle = store.get_meta("fleet"), store.get_meta("bundle_id") or ""
        strategy = store.get_meta("strategy")
    last = rounds[-1] if rounds else None
    console.print(f"fleet [bold]{fleet}[/]  bundle {bundle[:12]}  strategy {strategy}  global adapter {gv}")
    if last is not None:
        done = sum(r.state == "aggregated" for r in rounds)
        failed = sum(r.state == "failed" for r in rounds)
        console.print(f"rounds: {done} aggregated, {failed} failed; last round {last.round} is {last.state}")
    table = Table("agent", "online", "bundle", "adapter version", "last round", "personal adapter", "metrics")
    for a in agents:
        m = per_agent.get(a["agent"], {})
        shown = ", ".join(f"{k}={v:.3g}" for k, v in sorted(m.items()) if "acc" in k or "loss" in k)
        table.add_row(
            a["agent"],
            "yes" if a["online"] else "no",
            (a["bundle_id"] or "")[:12],
            a["adapter_version"] or "-",
            str(a["last_round"]),
            heads.get(a["agent"], "-"),
            shown or "-",
        )
    console.print(table)
    if "" in per_agent:
        console.print(
            "fleet metrics (last round): "
            + ", ".join(f"{k}={v:.4g}" for k, v in sorted(per_agent[""].items()))
        )
    if plot is not None:
        out = plot_metrics(MetricsLog(Path(state) / METRICS_FILE).read(), plot)
        console.print(f"plot written to {out}")
