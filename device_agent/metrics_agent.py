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

from fedclip.device_agent.state_summary import summarize_record
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
            info = summarize_record(self.state_dir, record)  # what `fedclip-agent status` shows
        except (FedclipError, OSError, KeyError, TypeError, ValueError) as e:
            # mid-replace or a broken file: say so, never a 500
            log.warning("metrics: cannot read the agent state (%s)", e)
            readable.add_metric([], 0)
            yield readable
            return
        readable.add_metric([], 1)
        yield readable
        yield from self._families(record, info)

    def _families(self, record: dict[str, Any], info: dict[str, Any]) -> Iterator[Metric]:
        by_status = GaugeMetricFamily(
            "fedclip_agent_rounds",
            "Rounds kept in the state dir: built (update on disk, not yet acknowledged) or done (published)",
            labels=["status"],
        )
        by_status.add_metric(["built"], len(info["pending_updates"]))
        by_status.add_metric(["done"], info["rounds_done"])
        yield by_status

        last = info["last_round"]
        yield _gauge("fedclip_agent_last_round", "The latest round this agent trained (-1: none)", last)
        in_progress = -1 if info["in_progress"] is None else info["in_progress"]
        yield _gauge("fedclip_agent_round_in_progress", "The round being trained now (-1: none)", in_progress)
        installed = GaugeMetricFamily(
            "fedclip_agent_adapter_installed",
            "1 for the adapter the agent has installed for inference (version empty: the bundle's own)",
            labels=["version"],
        )
        installed.add_metric([str(info["adapter_version"] or "")], 1)
        yield installed
        if last < 0:
            return
        entry = record["rounds"][str(last)]
        metrics = info["last_metrics"]
        seconds, steps = _number(entry.get("train_seconds")), _number(metrics.get("steps"))
        built_at = _number(entry.get("built_at"))
        if seconds is not None:
            yield _gauge("fedclip_agent_last_round_train_seconds", "Latest round's training time", seconds)
        if seconds is not None and steps:
            doc = "Mean optimizer step time of the latest round (training seconds / steps)"
            yield _gauge("fedclip_agent_last_round_step_seconds", doc, seconds / steps)
        if built_at is not None:
            doc = "Unix time the latest update was built"
            yield _gauge("fedclip_agent_last_round_built_timestamp_seconds", doc, built_at)
        by_name = GaugeMetricFamily(
            "fedclip_agent_last_round_metric",
            "Metrics of the latest round's update (accuracy_before, accuracy_after, loss, steps, ...)",
            labels=["name"],
        )
        for name, value in sorted(metrics.items()):
            v = _number(value)
            if v is not None:
                by_name.add_metric([str(name)], v)
        yield by_name


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family
