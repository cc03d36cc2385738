"""Accuracy of every agent on its own held-out split, before federation and after each round, by
`fedclip-agent eval --json` child processes (two at a time, never two of one agent)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from fedclip.coordinator.demo.config import agent_cli, flags
from fedclip.coordinator.demo.federation import FleetRun, last_round, round_adapters
from fedclip.coordinator.procs import Child, ChildFailed, ProcessGroup, procs_wait


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
        adapters: dict[int, Path | None] = {**round_adapters(state, last_round(run))}
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
