"""Short-lived agent commands run two at a time (`run_jobs`), and the accuracy of every agent on its own
held-out split before federation and after each round (`accuracy_per_round`), by `fedclip-agent eval
--json` child processes."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from fedclip.coordinator.demo.config import agent_cli, flags
from fedclip.coordinator.demo.federation import FleetRun, last_round, round_adapters
from fedclip.coordinator.procs import Child, ChildFailed, ProcessGroup, procs_wait


def eval_argv(
    bundle: Path, data: Path, adapter: Path | None, cache_dir: Path | None = None, **options: object
) -> list[str]:
    """`fedclip-agent eval --json` on one split, with `adapter` (None: the bundle's initial one) and
    any more `options` of the command (`flags`).

    `cache_dir`: the image-embedding cache of text-tower bundles. Give each agent its own: evals
    running side by side on one cache folder can lose its data file (see docs/demo.md).
    """
    argv = flags(bundle=bundle, data=data, adapter=adapter, threads=1, cache_dir=cache_dir, **options)
    return agent_cli("eval", *argv, "--quiet", "--json")


def gated_eval_argv(
    bundle: Path, data: Path, adapter: Path | None, own_images: Path, quantile: float, fallback: Path | None
) -> list[str]:
    """`fedclip-agent eval --open-set --json`: `adapter` as `serve-inference --open-set` serves it, its
    gate fitted on `own_images` (the agent's training folder), the images it sends away scored by
    `fallback` (None: the bundle's own model)."""
    return eval_argv(
        bundle, data, adapter, open_set=own_images, open_set_quantile=quantile, open_set_fallback=fallback
    )


def spawn_eval(
    procs: ProcessGroup,
    name: str,
    bundle: Path,
    data: Path,
    adapter: Path | None,
    cache_dir: Path | None = None,
) -> Child:
    """Start `fedclip-agent eval --json` on one split; `finish_eval` collects its result."""
    return procs.spawn(name, eval_argv(bundle, data, adapter, cache_dir), capture=True)


def json_result(child: Child, timeout_s: float = 300.0) -> dict:
    """The last JSON object a `--json` child printed; ChildFailed if it failed or printed none."""
    text = procs_wait(child, timeout_s)
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            result = json.loads(line)
            if isinstance(result, dict):
                return result
    raise ChildFailed(f"{child.name}: printed no JSON result (log: {child.log_path})")


def finish_eval(child: Child, timeout_s: float = 300.0) -> dict:
    """The JSON (accuracy, loss, num_samples) an eval child printed; ChildFailed if it failed."""
    result = json_result(child, timeout_s)
    if not isinstance(result.get("accuracy"), (int, float)):
        raise ChildFailed(f"{child.name}: `fedclip-agent eval --json` printed no accuracy")
    return result


# ---- the job runner -----------------------------------------------------------------------------
@dataclass
class Job:
    """One `--json` child for one agent; `done` gets the JSON it printed."""

    agent: str
    name: str
    argv: list[str]
    done: Callable[[dict], None]


def run_jobs(
    procs: ProcessGroup,
    jobs: list[Job],
    console: Console | None,
    title: str,
    slots: int = 2,
    timeout_s: float = 300.0,
) -> None:
    """Run `jobs` `slots` at a time (each is one single-threaded ORT process), in list order, never
    two of one agent at once: they share the agent's embedding cache, and a job that needs an
    earlier one's output (an eval of the adapter a local training wrote) comes after it in the list,
    so it cannot start before that one has finished."""
    pending = list(jobs)
    running: list[tuple[Job, Child, float]] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, disable=console is None) as progress:
        bar = progress.add_task(title, total=len(jobs))
        while pending or running:
            busy = {job.agent for job, _, _ in running}
            for job in list(pending):
                if len(running) >= slots:
                    break
                if job.agent not in busy:
                    pending.remove(job)
                    busy.add(job.agent)
                    running.append((job, procs.spawn(job.name, job.argv, capture=True), time.monotonic()))
            finished = []
            for entry in running:
                job, child, started = entry
                if child.proc.poll() is not None:
                    finished.append(entry)
                elif time.monotonic() - started > timeout_s:
                    procs.stop(child)
                    raise ChildFailed(
                        f"{job.name} did not finish within {timeout_s:g}s (log: {child.log_path})"
                    )
            if not finished:
                time.sleep(0.05)
                continue
            for entry in finished:
                running.remove(entry)
                entry[0].done(json_result(entry[1], timeout_s=5.0))
                progress.advance(bar)


# ---- accuracy per round ---------------------------------------------------------------------------
def eval_cache(run: FleetRun, agent: str) -> Path:
    """The agent's own embedding cache for evaluations (never shared between agents)."""
    return run.agent_states[agent] / "eval-embeddings"


def round_eval_jobs(
    bundle: Path, data_dir: Path, run: FleetRun, rounds: int
) -> tuple[dict[str, list[float | None]], list[Job]]:
    """(accuracy[agent][r], filled in as the jobs finish; the jobs): every agent on its own test
    split with the adapter it held before any round (r = 0) and after each round k (r = k)."""
    acc: dict[str, list[float | None]] = {}
    jobs: list[tuple[int, str, Job]] = []
    for aid, state in run.agent_states.items():
        acc[aid] = [None] * (rounds + 1)
        adapters: dict[int, Path | None] = {**round_adapters(state, last_round(run))}
        adapters[0] = None  # the bundle's own initial adapter
        for r in (a for a in adapters if a <= rounds):
            argv = eval_argv(bundle, data_dir / aid / "test", adapters[r], eval_cache(run, aid))
            jobs.append((r, aid, Job(aid, f"eval-{aid}-r{r}", argv, _store(acc[aid], r))))
    jobs.sort(key=lambda j: j[:2])  # round by round, agents interleaved
    return acc, [job for _, _, job in jobs]


def _store(series: list[float | None], r: int) -> Callable[[dict], None]:
    def done(result: dict) -> None:
        series[r] = accuracy_of(result)

    return done


def accuracy_of(result: dict) -> float:
    acc = result.get("accuracy")
    if not isinstance(acc, (int, float)):
        raise ChildFailed(f"`fedclip-agent eval --json` printed no accuracy: {result}")
    return float(acc)


def fill_skipped_rounds(acc: dict[str, list[float | None]]) -> None:
    """A round an agent sat out keeps its previous adapter, so it keeps the previous accuracy."""
    for series in acc.values():
        for r in range(1, len(series)):
            if series[r] is None:
                series[r] = series[r - 1]


def accuracy_per_round(
    procs: ProcessGroup, bundle: Path, data_dir: Path, run: FleetRun, rounds: int, console: Console | None
) -> dict[str, list[float | None]]:
    """accuracy[agent][r] on the agent's test split: r = 0 before any round, r = k after round k."""
    acc, jobs = round_eval_jobs(bundle, data_dir, run, rounds)
    run_jobs(procs, jobs, console, "evaluating every agent on its own test split")
    fill_skipped_rounds(acc)
    return acc
