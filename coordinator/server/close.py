"""Round close: aggregate the stored updates into new adapter versions, or fail the round.

Either way the outcome is committed to the store (versions, heads, metrics and the round's state in
one transaction) and appended to the metrics log. A broken aggregate (wrong names or shapes, not
finite) fails the round: it is never stored.
"""

from __future__ import annotations

import logging
import time

from fedclip.coordinator.metrics import weighted_means
from fedclip.coordinator.server.context import RoundContext
from fedclip.coordinator.server.tasks import RoundState
from fedclip.coordinator.strategies.base import Update
from fedclip.sdk.adapters import check_tensors
from fedclip.sdk.errors import AdapterError
from fedclip.sdk.messages import KNOWN_STATS

log = logging.getLogger("fedclip.coordinator")


class RoundCloser:
    """Closes rounds for one coordinator."""

    def __init__(self, ctx: RoundContext):
        self.manifest, self.strategy, self.metrics = ctx.manifest, ctx.strategy, ctx.metrics
        self.store, self.registry = ctx.store, ctx.registry
        self.exchanged = tuple(sorted(t.name for t in ctx.manifest.exchanged))

    def _updates(self, st: RoundState) -> list[Update]:
        """The round's stored updates, their tensors read from disk on access."""
        out = []
        for r in self.store.updates(st.round):
            out.append(
                Update(
                    r.agent,
                    r.num_samples,
                    self.store.blobs.tensors(r.blob, self.exchanged),
                    self.registry.tensors(st.selected[r.agent]),
                    self.store.blobs.read_tensors(r.blob, KNOWN_STATS),
                    r.metrics,
                )
            )
        return out

    def aggregate(self, st: RoundState) -> str | None:
        """Aggregate and commit the round; returns the new global version, or None if it failed."""
        updates = self._updates(st)
        t0 = time.perf_counter()
        try:
            result = self.strategy.aggregate(st.round, updates)
            for scope, tensors in [("global", result.global_tensors), *result.per_agent.items()]:
                check_tensors(tensors, self.manifest.exchanged, f"round {st.round}: aggregate for {scope}")
        except (AdapterError, ValueError, FloatingPointError) as e:  # never store a broken adapter
            self.fail(st, f"aggregation failed: {e}")
            return None
        seconds = time.perf_counter() - t0
        per_agent = {u.agent: dict(u.metrics) for u in updates}
        samples = {u.agent: u.num_samples for u in updates}
        round_metrics = weighted_means(per_agent, samples)
        round_metrics.update(result.metrics)
        gv = self.registry.commit_round(
            st.round, self.strategy.name, result, st.selected, per_agent, round_metrics
        )
        log.info(
            "round %d: aggregated %d updates with %s in %.2fs -> %s%s",
            st.round,
            len(updates),
            self.strategy.name,
            seconds,
            gv,
            f" (+{len(result.per_agent)} personalized)" if result.per_agent else "",
        )
        self.metrics.append(
            {
                "round": st.round,
                "state": "aggregated",
                "strategy": self.strategy.name,
                "global_version": gv,
                "selected": len(st.selected),
                "updates": len(updates),
                "metrics": round_metrics,
                "agents": per_agent,
                "samples": samples,
                "aggregate_seconds": seconds,
                "closed_at": time.time(),
            }
        )
        return gv

    def fail(self, st: RoundState, reason: str) -> None:
        self.store.fail_round(st.round, reason)
        log.warning("round %d: failed (%s); starting a new round", st.round, reason)
        self.metrics.append(
            {
                "round": st.round,
                "state": "failed",
                "reason": reason,
                "strategy": self.strategy.name,
                "selected": len(st.selected),
                "updates": len(st.received),
                "closed_at": time.time(),
            }
        )
