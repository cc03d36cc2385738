"""`fedclip-coord demo`: the typer command and `run_demo`, which runs every step in order and
releases every process and port it started, on success, Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console

from fedclip.coordinator.demo.base import choose_base, client_dataset
from fedclip.coordinator.demo.comparison import compare
from fedclip.coordinator.demo.config import BASES, DEFAULT_STRATEGY, STRATEGY_BUNDLE, DemoConfig
from fedclip.coordinator.demo.federation import deliver_final, round_costs, run_federation
from fedclip.coordinator.demo.launch import (
    broker_for,
    check_bundle,
    export,
    partition,
    read_partition,
    resolve_dataset,
    write_all_class,
)
from fedclip.coordinator.demo.plot import plot_accuracy
from fedclip.coordinator.demo.report import build_report, report_tables, write_markdown
from fedclip.coordinator.procs import ChildFailed, ProcessGroup, sigterm_as_interrupt
from fedclip.sdk.cli import setup_logging
from fedclip.sdk.config import read_secret
from fedclip.sdk.errors import ConfigError, FedclipError


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
    phases: dict[str, float] = {}
    notes: list[str] = []
    with sigterm_as_interrupt(), ProcessGroup(log_dir=work / "logs") as procs:
        with _timed(phases, "base"):
            base = choose_base(cfg, procs, console)
        if base.kind == "pretrained":
            cfg = replace(cfg, pretrained=base.weights)
        dataset = client_dataset(base, resolve_dataset(cfg.dataset))
        with (
            _timed(phases, "data"),
            _status(console, f"partitioning {dataset} into {cfg.agents} non-IID agents"),
        ):
            data_dir = partition(cfg, procs, work / "data", dataset)
            no_all_class = write_all_class(cfg, data_dir, dataset)
        notes += [n for n in (base.note, no_all_class) if n]
        labels, agent_ids = read_partition(data_dir)
        with _timed(phases, "export"):
            if cfg.bundle is not None:
                bundle = check_bundle(cfg, Path(cfg.bundle), labels)
            else:
                init = f", init {cfg.init}" if cfg.init else ""
                with _status(
                    console, f"exporting {cfg.model} with {cfg.adapter} adapters (rank {cfg.rank}{init})"
                ):
                    bundle = export(cfg, procs, labels, work / "bundle")
        with (
            _timed(phases, "federation"),
            broker_for(cfg, work / "secrets", work / "coordinator", agent_ids) as broker,
        ):
            kind = f" (embedded amqtt, {len(broker.kits)} provisioned devices)" if broker.port else ""
            say(f"broker: {broker.url}{kind}")
            run = run_federation(cfg, procs, broker, bundle, data_dir, agent_ids, work, console)
            with _status(console, "rolling the last round's adapters out to the agents"):
                run.final_missing = deliver_final(cfg, procs, broker, run)
            procs.stop_all()  # the agents are done; evaluation reads the adapters they installed
        run.costs = round_costs(run.coordinator_state)
        with _timed(phases, "evaluation"):
            comparison = compare(cfg, procs, bundle, data_dir, run, work, console)
    report = build_report(
        cfg, dataset, labels, run, comparison.own_per_round, time.monotonic() - t0,
        comparison=comparison, base=base, phases=phases, notes=notes,
    )  # fmt: skip
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
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        phases[name] = time.monotonic() - t0


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
        DEFAULT_STRATEGY,
        "--strategy",
        help=f"The coordinator's aggregation: {', '.join(STRATEGY_BUNDLE)} (docs/aggregation.md); the "
        "bundle is exported with the adapters it needs.",
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
    base: str = typer.Option(
        "pretrained",
        "--base",
        help=f"{' or '.join(BASES)}: start fedclip-tiny from its Fashion-MNIST pretraining (made on the "
        "first run, then cached) or from random weights.",
    ),
    base_steps: int = typer.Option(300, "--base-steps", min=1, help="Pretraining steps of the base."),
    base_cache: Path | None = typer.Option(
        None,
        "--base-cache",
        help="Folder of the cached base (default: $FEDCLIP_BASE_CACHE_DIR or ~/.cache/fedclip/base).",
    ),
    all_class_per_label: int = typer.Option(
        20, "--all-class-per-label", min=1, help="Images of every label in each agent's all-class test set."
    ),
    rank: int | None = typer.Option(
        None, "--rank", min=1, help="Adapter rank (default: the strategy's: fleet-core 6, else 4)."
    ),
    alpha: float | None = typer.Option(None, "--alpha", help="Adapter alpha (default: 2 x rank)."),
    targets: str = typer.Option("q,v", "--targets", help="Attention projections that get adapters."),
    towers: str = typer.Option("vision,text", "--towers", help="Towers that get adapters."),
    local_epochs: int = typer.Option(1, "--local-epochs", min=1, help="Local epochs per round."),
    lr: float | None = typer.Option(
        None, "--lr", help="Local learning rate (default: the strategy's: fleet-core 0.15, else 0.005)."
    ),
    loss: str = typer.Option(
        DemoConfig.loss,
        "--loss",
        help="The agents' loss: balanced-softmax (each trains without its label mix and adds it back "
        "at inference; docs/aggregation.md) or ce.",
    ),
    personal_mu: float = typer.Option(
        0.0,
        "--personal-mu",
        help="Also show personal tuning: each agent's final adapter tuned on its own images with this "
        "proximal weight, as an agent with `personal: {mu}` serves it (1.5 with --strategy fedavg "
        "keeps the labels an agent has not seen; docs/aggregation.md). 0: off.",
    ),
    open_set_q: float = typer.Option(
        DemoConfig.open_set_q,
        "--open-set-quantile",
        help="Also show each agent's adapter served with the open-set gate (`serve-inference --open-set`: "
        "the label prior only for images like the agent's own; this share of those may be sent away; "
        "docs/inference.md). Balanced softmax only. 0: off.",
    ),
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

    Starts fedclip-tiny from its pretrained base (made on the first run, then cached). Shows progress,
    then every agent's accuracy on its own test split and on an all-class set (every label, under its
    camera) for zero-shot, local-only training and fedclip, and bytes and time per round; writes
    OUT/report.json, OUT/report.md and OUT/accuracy.png. Every process and port it starts is
    released on exit, on Ctrl-C and on SIGTERM; a second run needs no cleanup.
    """
    setup_logging(verbose=verbose, quiet=not verbose)
    if password_file is not None and broker is None:
        raise ConfigError("--password-file: only with --broker (the embedded broker makes its own)")
    password = read_secret(password_file, "--password-file") if password_file is not None else None
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
        base=base,
        base_steps=base_steps,
        base_cache=base_cache,
        all_class_per_label=all_class_per_label,
        rank=rank,
        alpha=alpha,
        targets=targets,
        towers=towers,
        local_epochs=local_epochs,
        lr=lr,
        loss=loss,
        personal_mu=personal_mu,
        open_set_q=open_set_q,
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
