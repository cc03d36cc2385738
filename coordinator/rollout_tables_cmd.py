"""The tables `fedclip-coord rollout status` (and `start`/`watch` when they end) print: the latest
rollouts, or one rollout's stages and one row per agent's acknowledgement."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from fedclip.coordinator.rollout_store import RolloutStore


def print_rollouts(console: Console, store: RolloutStore) -> None:
    """The latest rollouts, one row each, and the pins."""
    table = Table(title="rollouts")
    for col in ("id", "version", "target", "state", "started", "reason"):
        table.add_column(col)
    for r in store.rollouts():
        table.add_row(str(r.id), r.version, r.target, r.state, _when(r.created_at), r.reason)
    console.print(table)
    pins = store.pins()
    if pins:
        console.print("pinned: " + ", ".join(f"{a}={v}" for a, v in pins.items()))


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def _pct(x: float | None) -> str:
    return f"{x * 100:.1f}%" if x is not None else ""


def print_rollout(console: Console, store: RolloutStore, rid: int) -> None:
    r = store.get(rid)
    if r is None:
        return
    console.print(
        f"[bold]rollout {r.id}[/bold]: {r.version} to {r.target}, canary {r.canary}, "
        f"max regression {r.max_regression:g}, min acks {r.min_acks:.0%}"
        + (", with the global adapter as fallback" if r.fallback else "")
        + f": [bold]{r.state}[/bold]"
        + (f" ({r.reason})" if r.reason else "")
    )
    if r.skipped:
        console.print(f"pinned, left out: {', '.join(r.skipped)}")
    stages = Table(title="stages")
    for col in ("stage", "agents", "state", "mean regression (points)", "decision"):
        stages.add_column(col)
    for s in store.stages(rid):
        reg = f"{s.mean_regression:.2f}" if s.mean_regression is not None else ""
        stages.add_row(s.name, str(len(s.agents)), s.state, reg, s.reason)
    console.print(stages)
    acks = Table(title="acknowledgements")
    for col in (
        "agent",
        "stage",
        "status",
        "version",
        "accuracy current",
        "accuracy new",
        "regression",
        "reason",
    ):
        acks.add_column(col)
    by_agent = {a.agent: a for a in store.acks(rid)}
    for s in store.stages(rid):
        for agent in s.agents:
            a = by_agent.get(agent)
            if a is None:
                acks.add_row(agent, s.name, "pending", "", "", "", "", "")
                continue
            reg = f"{a.regression:.2f}" if a.regression is not None else ""
            acks.add_row(
                agent,
                s.name,
                a.status,
                a.version,
                _pct(a.current_accuracy),
                _pct(a.new_accuracy),
                reg,
                a.reason,
            )
    console.print(acks)
