"""`fedclip-coord partition`: split a labeled dataset into non-IID per-agent image folders."""

from __future__ import annotations

from pathlib import Path

import typer


def partition(
    dataset: str = typer.Option(
        ..., "--dataset", help="fashion-mnist | fashion-mnist-test | digits | imagefolder:PATH"
    ),
    agents: int = typer.Option(..., "--agents", min=1, help="Number of agents (one folder each)."),
    dirichlet: float = typer.Option(
        ...,
        "--dirichlet",
        help="Label skew: Dirichlet beta (0.1 = few labels per agent, 100 = near uniform).",
    ),
    out: Path = typer.Option(..., "--out", help="Directory to create: <out>/agent-XX/{train,test}/<label>/."),
    shift: str = typer.Option(
        "none", "--shift", help="none | per-agent (a fixed camera transform per agent)."
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Same seed, same files."),
    max_per_agent: int = typer.Option(
        None, "--max-per-agent", "--per-agent", min=1, help="Cap on images per agent (train + test)."
    ),
    test_fraction: float = typer.Option(
        0.2,
        "--test-fraction",
        min=0.0,
        max=0.95,
        help="Share of each agent's images held out as its test set.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Partition a dataset among agents with Dirichlet label skew and optional per-agent camera shifts."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from fedclip.sdk.errors import ConfigError
    from fedclip.sdk.partition import write_partition

    if shift not in ("none", "per-agent"):
        raise ConfigError(f"--shift: {shift!r} is not one of none, per-agent")
    if not dirichlet > 0:
        raise ConfigError(f"--dirichlet: must be > 0, got {dirichlet}")
    console = Console(stderr=True)
    with Progress(
        TextColumn("writing images"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("images", total=None)
        summary = write_partition(
            out,
            dataset,
            agents,
            dirichlet,
            shift="per-agent" if shift == "per-agent" else "none",  # checked above
            seed=seed,
            test_fraction=test_fraction,
            max_per_agent=max_per_agent,
            overwrite=force,
            on_total=lambda n: progress.update(task, total=n),
            on_image=lambda: progress.advance(task),
        )

    labels = summary["labels"]
    table = Table(title=f"{dataset}: {agents} agents, beta={dirichlet}, shift={shift}, seed={seed}")
    table.add_column("agent")
    table.add_column("shift")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    table.add_column("top labels (train)")
    for agent, entry in summary["counts"].items():
        train = entry["train"]
        top = sorted(labels, key=lambda k: -train[k])[:3]
        cam = entry["shift"]
        table.add_row(
            agent,
            cam["kind"] if cam["kind"] in ("none", "invert") else f"{cam['kind']} {cam['amount']:g}",
            str(sum(train.values())),
            str(sum(entry["test"].values())),
            ", ".join(f"{k} {train[k]}" for k in top if train[k]),
        )
    Console().print(table)
    print(f"partition written to {out}")
