"""What the fleet gave each agent, beside what it would have had alone.

For every agent, three adapters on two test sets:
- adapters: zero-shot (the bundle's initial adapter), local-only (the agent's own torch-free
  training, `fedclip-agent train`, on the same images with the same epochs, batch size, learning
  rate and held-out share, from the same initial adapter, without the fleet), federated (the
  adapter the agent ended the run with, its label prior added to every image), gated (the same
  adapter served with the open-set gate, `--open-set-quantile`: the prior only for images like the
  agent's own, the others scored by the fleet's adapter the final rollout delivered beside it, else
  by the bundle's own model), and with `--personal-mu` personal (that adapter tuned the same way
  with the proximal term toward it, `train --prox-mu`: what an agent with `personal:` serves);
- sets: its own held-out test split (its label mix and camera), and its all-class set (every label
  in equal numbers under its camera, `fedclip.sdk.all_class`): what it faces when a label it has
  not trained on shows up.
All of it runs after the federation, as one queue of child processes two at a time
(`evaluation.run_jobs`), together with the per-round evaluations of the own split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from fedclip.coordinator.demo.config import AGENT_HOLDOUT, DemoConfig, agent_cli, flags
from fedclip.coordinator.demo.evaluation import (
    Job,
    accuracy_of,
    eval_argv,
    eval_cache,
    fill_skipped_rounds,
    gated_eval_argv,
    round_eval_jobs,
    run_jobs,
)
from fedclip.coordinator.demo.federation import FleetRun, last_round, round_adapters
from fedclip.coordinator.procs import ProcessGroup
from fedclip.sdk.all_class import ALL_SPLIT
from fedclip.sdk.errors import StateError
from fedclip.sdk.ledger import installed
from fedclip.sdk.messages.rounds import Hyperparameters

COLUMNS = ("zero_shot", "local_only", "federated")
GATED = "gated"  # the column `--open-set-quantile` adds (with balanced softmax, by default)
PERSONAL = "personal"  # the column `--personal-mu` adds
SETS = ("own", "all_class")


def columns(cfg: DemoConfig) -> tuple[str, ...]:
    return (*COLUMNS, *((GATED,) if cfg.gated else ()), *((PERSONAL,) if cfg.personal_mu else ()))


@dataclass
class Comparison:
    """Accuracies per agent: `own_per_round[agent][r]`, and `table[set][agent][column]` for the
    sets of SETS and the columns of COLUMNS (None where a set is missing)."""

    own_per_round: dict[str, list[float | None]]
    table: dict[str, dict[str, dict[str, float | None]]]
    local_train_seconds: dict[str, float] = field(default_factory=dict)
    # agent -> what its gate did (the gated column): {"fallback": the version it sent images to (None:
    # the bundle's own model), "sent_away": {set: images}, "images": {set: images}}
    gate: dict[str, dict] = field(default_factory=dict)


def local_train_argv(
    cfg: DemoConfig, bundle: Path, data: Path, out: Path, cache: Path, personal: bool = False,
    start: Path | None = None,
) -> list[str]:  # fmt: skip
    """Local-only training: what the agent does in the rounds (rounds x local epochs over the same
    images, the coordinator's batch size), with no one to share with. `personal`: the same training
    from `start` (the federated adapter; None: the bundle's own), held near it by `--prox-mu`."""
    options = flags(
        bundle=bundle, data=data, epochs=cfg.rounds * cfg.local_epochs, batch_size=Hyperparameters.batch_size,
        lr=cfg.lr, holdout=AGENT_HOLDOUT, seed=cfg.seed, out=out, threads=1, cache_dir=cache,
    )  # fmt: skip
    if personal:
        options += flags(adapter=start, prox_mu=cfg.personal_mu)
    return agent_cli("train", *options, "--quiet", "--json")


def final_adapter(run: FleetRun, agent: str, rounds: int) -> Path | None:
    """The adapter the agent ended the run with (None: it never installed one)."""
    adapters = {
        r: p for r, p in round_adapters(run.agent_states[agent], last_round(run)).items() if r <= rounds
    }
    return adapters[max(adapters)] if adapters else None


def final_fallback(run: FleetRun, agent: str, final: Path | None) -> Path | None:
    """The fleet's adapter the final rollout delivered beside `final` (`rollout start --fallback`),
    where the agent serves `final` now; None: the gate sends its images to the bundle's own model."""
    if final is None:
        return None
    try:
        now = installed(run.agent_states[agent])
    except StateError:  # no ledger to read (the agent never started): the gate has the base only
        return None
    return now.fallback if now.file == final else None


def compare(
    cfg: DemoConfig,
    procs: ProcessGroup,
    bundle: Path,
    data_dir: Path,
    run: FleetRun,
    work: Path,
    console: Console | None,
) -> Comparison:
    """Evaluate every agent as the module docstring says; the all-class set is used where the agent's
    data folder has one (`<agent>/all/`)."""
    own_per_round, round_jobs = round_eval_jobs(bundle, data_dir, run, cfg.rounds)
    table = {s: {a: dict.fromkeys(columns(cfg)) for a in run.agent_states} for s in SETS}
    result = Comparison(own_per_round, table)
    train_jobs, eval_jobs = [], []
    for aid in run.agent_states:
        cache = eval_cache(run, aid)
        final = final_adapter(run, aid, cfg.rounds)
        trained = {"local_only": work / "local" / f"{aid}.safetensors"}
        if cfg.personal_mu:
            trained[PERSONAL] = work / PERSONAL / f"{aid}.safetensors"
        for column, out in trained.items():
            out.parent.mkdir(parents=True, exist_ok=True)
            mine = column == PERSONAL
            argv = local_train_argv(cfg, bundle, data_dir / aid / "train", out, cache, mine, final)
            done = _seconds(result.local_train_seconds, aid) if column == "local_only" else _ignore
            train_jobs.append(Job(aid, f"{_SHORT[column]}-{aid}-train", argv, done))
        sets = {"own": data_dir / aid / "test"}
        if (data_dir / aid / ALL_SPLIT).is_dir():
            sets["all_class"] = data_dir / aid / ALL_SPLIT
            for column, adapter in (("zero_shot", None), ("federated", final)):
                argv = eval_argv(bundle, sets["all_class"], adapter, cache)
                eval_jobs.append(
                    Job(aid, f"eval-{aid}-all-{column}", argv, _put(table["all_class"][aid], column))
                )
        for name, data in sets.items():
            if cfg.gated:
                fallback = final_fallback(run, aid, final)
                argv = gated_eval_argv(
                    bundle, data, final, data_dir / aid / "train", cfg.open_set_q, fallback
                )
                done = _gated(table[name][aid], result.gate.setdefault(aid, {}), name)
                eval_jobs.append(Job(aid, f"eval-{aid}-{name}-gated", argv, done))
            for column, adapter in trained.items():
                argv = eval_argv(bundle, data, adapter, cache)
                job = f"eval-{aid}-{name}-{_SHORT[column]}"
                eval_jobs.append(Job(aid, job, argv, _put(table[name][aid], column)))
    # Trainings first, so their evaluations are not left for the end; each evaluation of a local
    # adapter is listed after its training, and run_jobs never runs two jobs of one agent at once.
    run_jobs(procs, train_jobs + round_jobs + eval_jobs, console, "local-only training and evaluations")
    fill_skipped_rounds(own_per_round)
    for aid, series in own_per_round.items():
        table["own"][aid]["zero_shot"] = series[0]
        table["own"][aid]["federated"] = series[-1]
    return result


_SHORT = {"local_only": "local", PERSONAL: PERSONAL}  # in the children's names (their log files)


def _ignore(res: dict) -> None:
    return None


def _put(row: dict[str, float | None], column: str) -> Callable[[dict], None]:
    def done(res: dict) -> None:
        row[column] = accuracy_of(res)

    return done


def _gated(row: dict[str, float | None], gate: dict, name: str) -> Callable[[dict], None]:
    def done(res: dict) -> None:
        # No gate where the adapter carries no label prior (the agent never installed one): the
        # column would be the plain adapter's accuracy under another name, so it stays empty.
        row[GATED] = accuracy_of(res) if res.get("open_set") else None
        gate["fallback"] = res.get("open_set_fallback")
        gate.setdefault("sent_away", {})[name] = int(res.get("open_set_sent_away") or 0)
        gate.setdefault("images", {})[name] = int(res.get("num_samples") or 0)

    return done


def _seconds(out: dict[str, float], agent: str) -> Callable[[dict], None]:
    def done(res: dict) -> None:
        secs = res.get("train_seconds")
        if isinstance(secs, (int, float)):
            out[agent] = float(secs)

    return done
