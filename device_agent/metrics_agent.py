"""Prometheus metrics of the training agent, read from its state dir when scraped.

The agent itself serves no HTTP and carries no instrumentation: every round it finishes is already
recorded in its state file (`state.json`: the round's status, training seconds, steps and held-out
metrics, the round in progress, the adapter in use). `serve-inference --state DIR` adds this collector
to its `/metrics`, so one scrape of the device shows both the inference endpoint and the agent beside
it; reading the small state file costs well under a millisecond and survives agent restarts. Names
are listed in docs/inference.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from fedclip.sdk.errors import FedclipError
from fedclip.sdk.ledger import read_record

log = logging.getLogger(__name__)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class AgentStateCollector:
    """The agent's rounds and adapter from `state_dir`, on each `collect()` (one scrape)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)

    def describe(self) -> list[Metric]:
        return []  # registering must not read the state

    def collect(self) -> Iterator[Metric]:
        readable = GaugeMetricFamily("fedclip_agent_state_readable", "1 if the state file could be read")
        try:
            record = read_record(self.state_dir)
        except (FedclipError, OSError) as e:  # mid-replace or a broken file: say so, never a 500
            log.warning("metrics: cannot read the agent state (%s)", e)
            readable.add_metric([], 0)
            yield readable
            return
        readable.add_metric([], 1)
        yield readable
        yield from self._families(record)

    def _families(self, record: dict[str, Any]) -> Iterator[Metric]:
        rounds = record.get("rounds") or {}
        by_status = GaugeMetricFamily(
            "fedclip_agent_rounds",
            "Rounds kept in the state dir: built (update on disk, not yet acknowledged) or done (published)",
            labels=["status"],
        )
        for status in ("built", "done"):
            by_status.add_metric([status], sum(1 for e in rounds.values() if e.get("status") == status))
        yield by_status

        numbered = {int(r): e for r, e in rounds.items()}  # keys are round numbers (AgentState)
        last = max(numbered, default=-1)
        g = GaugeMetricFamily("fedclip_agent_last_round", "The latest round this agent trained (-1: none)")
        g.add_metric([], last)
        yield g
        prog = record.get("in_progress") or {}
        g = GaugeMetricFamily("fedclip_agent_round_in_progress", "The round being trained now (-1: none)")
        g.add_metric([], prog.get("round", -1) if isinstance(prog.get("round"), int) else -1)
        yield g
        g = GaugeMetricFamily(
            "fedclip_agent_adapter_installed",
            "1 for the adapter the agent has installed for inference (version empty: the bundle's own)",
            labels=["version"],
        )
        g.add_metric([str(record.get("current_adapter") or "")], 1)
        yield g
        if last < 0:
            return
        entry = numbered[last]
        seconds = _number(entry.get("train_seconds"))
        metrics = entry.get("metrics") or {}
        steps = _number(metrics.get("steps"))
        if seconds is not None:
            g = GaugeMetricFamily(
                "fedclip_agent_last_round_train_seconds", "Training time of the latest round"
            )
            g.add_metric([], seconds)
            yield g
            if steps:
                g = GaugeMetricFamily(
                    "fedclip_agent_last_round_step_seconds",
                    "Mean optimizer step time of the latest round (training seconds / steps)",
                )
                g.add_metric([], seconds / steps)
                yield g
        g = GaugeMetricFamily(
            "fedclip_agent_last_round_metric",
            "Metrics of the latest round's update (accuracy_before, accuracy_after, loss, steps, ...)",
            labels=["name"],
        )
        for name, value in sorted(metrics.items()):
            v = _number(value)
            if v is not None:
                g.add_metric([str(name)], v)
        yield g
        built_at = _number(entry.get("built_at"))
        if built_at is not None:
            g = GaugeMetricFamily(
                "fedclip_agent_last_round_built_timestamp_seconds", "Unix time the latest update was built"
            )
            g.add_metric([], built_at)
            yield g
