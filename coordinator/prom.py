"""Prometheus metrics of a coordinator, read from its state dir when scraped.

A custom `prometheus_client` collector: every scrape reads the durable state (the SQLite store, the
rollout database, metrics.jsonl) through `FleetView`, so the round loop carries no instrumentation,
the numbers survive restarts (a counter is a count of stored rows, never lost with the process), and
`fedclip-coord dashboard` can expose the same metrics for a state dir with no coordinator running.
Metric names and labels are listed in docs/operations.md.
"""

from __future__ import annotations

import bisect
import logging
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from fedclip.coordinator.fleet_view import FleetView, groups_of

log = logging.getLogger(__name__)

ROUND_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
AGGREGATE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0)


def histogram(name: str, doc: str, values: Sequence[float], bounds: Sequence[float]) -> HistogramMetricFamily:
    """A histogram family from raw observations (cumulative buckets, +Inf last)."""
    ordered = sorted(values)
    buckets = [(repr(b), bisect.bisect_right(ordered, b)) for b in bounds]
    buckets.append(("+Inf", len(ordered)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=float(sum(ordered)))


class FleetCollector:
    """Yields the coordinator's metric families from `view` on each `collect()` (one scrape)."""

    def __init__(self, view: FleetView):
        self.view = view

    def describe(self) -> list[Metric]:
        return []  # families are only known at scrape time; registering must not read the state

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except sqlite3.Error as e:  # a locked or half-written database: report it, not a 500
            log.warning("metrics: cannot read the state (%s)", e)
            up = GaugeMetricFamily("fedclip_state_readable", "1 if the state dir could be read")
            up.add_metric([], 0)
            yield up

    def _collect(self) -> Iterator[Metric]:
        v = self.view
        summary, rounds, agents = v.summary(), v.rounds(), v.agents(metrics=False)

        up = GaugeMetricFamily("fedclip_state_readable", "1 if the state dir could be read")
        up.add_metric([], 1)
        yield up

        by_state = GaugeMetricFamily("fedclip_rounds", "Rounds by state", labels=["state"])
        for state in ("collecting", "aggregated", "failed"):
            by_state.add_metric([state], summary["round_counts"].get(state, 0))
        yield by_state
        last = GaugeMetricFamily("fedclip_round_last", "Number of the latest round (0: none yet)")
        last.add_metric([], summary["round_counts"]["last"] or 0)
        yield last

        accepted = CounterMetricFamily("fedclip_updates_accepted", "Updates stored for aggregation")
        accepted.add_metric([], sum(r["updates"] for r in rounds))
        yield accepted
        rejected = CounterMetricFamily(
            "fedclip_updates_rejected", "Messages rejected and dropped, by reason", labels=["reason"]
        )
        for kind, n in sorted(v.rejection_counts().items()):
            rejected.add_metric([kind], n)
        yield rejected

        closed = [r["duration_s"] for r in rounds if r["duration_s"] is not None]
        yield histogram(
            "fedclip_round_duration_seconds", "Start to close of closed rounds", closed, ROUND_BUCKETS
        )
        agg = [r["aggregate_s"] for r in rounds if isinstance(r["aggregate_s"], (int, float))]
        yield histogram(
            "fedclip_aggregation_duration_seconds", "Strategy aggregation time", agg, AGGREGATE_BUCKETS
        )

        b_in = CounterMetricFamily("fedclip_update_bytes_received", "Bytes of accepted updates as received")
        b_in.add_metric([], sum(r["bytes_in"] for r in rounds))
        yield b_in
        b_out = CounterMetricFamily("fedclip_task_bytes_sent", "Bytes of the task messages sent to agents")
        b_out.add_metric([], sum(r["bytes_out"] for r in rounds))
        yield b_out

        known = GaugeMetricFamily("fedclip_agents_known", "Agents that ever announced themselves")
        known.add_metric([], len(agents))
        yield known
        online = GaugeMetricFamily(
            "fedclip_agents_online",
            'Online agents by group ("" for none) and bundle (first 12 hex digits)',
            labels=["group", "bundle"],
        )
        for (group, bundle), n in sorted(groups_of(agents).items()):
            online.add_metric([group, bundle], n)
        yield online
        # Which fleet adapter the online devices' open-set gates fall back to ("" none: the bundle's own
        # model). Fallbacks are global versions (g-r<N>), so the label stays a handful of values even
        # where every device serves its own adapter (whose versions would be one label per agent).
        gate = GaugeMetricFamily(
            "fedclip_agents_open_set_fallback",
            'Online agents by the fleet adapter their open-set gate falls back to ("" for none)',
            labels=["version"],
        )
        kept = Counter(a["open_set_fallback"] or "" for a in agents if a["online"])
        for version, n in sorted(kept.items()):
            gate.add_metric([version], n)
        yield gate

        fleet = GaugeMetricFamily(
            "fedclip_fleet_metric",
            "Fleet (sample-weighted) metrics of the last aggregated round",
            labels=["name"],
        )
        for name, value in sorted(v.fleet_metrics()["metrics"].items()):
            if value is not None:
                fleet.add_metric([name], value)
        yield fleet

        rollouts = v.rollouts(limit=1000)
        r_state = GaugeMetricFamily("fedclip_rollouts", "Rollouts by state", labels=["state"])
        stages = GaugeMetricFamily(
            "fedclip_rollout_stages", "Rollout stages by name and state", labels=["stage", "state"]
        )
        acks = GaugeMetricFamily(
            "fedclip_rollout_acks", "Rollout acknowledgements by status", labels=["status"]
        )
        counts: dict[tuple[str, ...], int] = {}
        for r in rollouts:
            counts[("r", r["state"])] = counts.get(("r", r["state"]), 0) + 1
            for s in r["stages"]:
                counts[("s", s["name"], s["state"])] = counts.get(("s", s["name"], s["state"]), 0) + 1
            for a in r["acks"]:
                counts[("a", a["status"])] = counts.get(("a", a["status"]), 0) + 1
        for key, n in sorted(counts.items()):
            {"r": r_state, "s": stages, "a": acks}[key[0]].add_metric(list(key[1:]), n)
        yield from (r_state, stages, acks)


def registry_for(view: FleetView) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FleetCollector(view))
    return reg


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of one scrape."""
    return generate_latest(registry)
