"""Round close: aggregate the stored updates into new adapter versions, or fail the round.

Either way the outcome is committed to the store (versions, heads, metrics and the round's state in
one transaction) and appended to the metrics log. A broken aggregate (wrong names or shapes, not
finite) fails the round: it is never stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np

from fedclip.coordinator.metrics import fleet_gain_shares, fleet_gain_warning, weighted_means
from fedclip.coordinator.server.context import RoundContext
from fedclip.coordinator.server.tasks import RoundState
from fedclip.coordinator.strategies.aggregate import clip_delta
from fedclip.coordinator.strategies.base import Update
from fedclip.sdk.adapters import check_tensors
from fedclip.sdk.errors import AdapterError
from fedclip.sdk.messages import KNOWN_STATS

log = logging.getLogger("fedclip.coordinator")


def robust_caps(samples: list[int], norms: list[float], factor: float) -> tuple[int | None, float | None]:
    """(sample cap, norm cap) of one round: `factor` times the round's median, from 3 updates on (fewer
    have no median that one liar cannot move); (None, None) when `factor` is 0.

    One update claiming 10^9 samples would otherwise own the average, and one giant delta would drag it
    anywhere, even when every update is signed by an enrolled device (a compromised or broken one)."""
    if factor <= 0 or len(samples) < 3:
        return None, None
    sample_cap = max(1, int(factor * float(np.median(samples))))
    # Updates that did not move (a newcomer's statistics-only one) have no say in how far the
    # others may: with them the median would shrink, and be 0 once they are half the round.
    moved = [n for n in norms if n > 0]
    norm_cap = factor * float(np.median(moved)) if len(moved) >= 3 else None
    return sample_cap, norm_cap


class RoundCloser:
    """Closes rounds for one coordinator."""

    def __init__(self, ctx: RoundContext):
        self.manifest, self.strategy, self.metrics = ctx.manifest, ctx.strategy, ctx.metrics
        self.store, self.registry = ctx.store, ctx.registry
        self.exchanged = tuple(sorted(t.name for t in ctx.manifest.exchanged))
        self.robust_factor = ctx.cfg.robust_factor
        self.loss = ctx.cfg.loss  # resolved (Server.__init__): what the round's tasks asked for

    def _updates(self, st: RoundState) -> list[Update]:
        """The round's stored updates, their tensors read from disk on access, made robust (below)."""
        rows = self.store.updates(st.round)
        sample_cap, norm_cap = robust_caps(
            [r.num_samples for r in rows], [r.norm for r in rows if r.norm is not None], self.robust_factor
        )
        out = []
        for r in rows:
            base = self.registry.tensors(st.selected[r.agent])
            tensors: Mapping[str, np.ndarray] = self.store.blobs.tensors(r.blob, self.exchanged)
            if norm_cap is not None and r.norm is not None and r.norm > norm_cap:
                log.info(
                    "round %d: update of %s clipped to %.3g (norm %.3g)", st.round, r.agent, norm_cap, r.norm
                )
                tensors = clip_delta(dict(tensors), base, norm_cap)
            samples = r.num_samples if sample_cap is None else min(r.num_samples, sample_cap)
            stats = self.store.blobs.read_tensors(r.blob, KNOWN_STATS)
            out.append(Update(r.agent, samples, tensors, base, stats, r.metrics))
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
        round_metrics.update(fleet_gain_shares(per_agent))
        round_metrics.update(result.metrics)
        warning = fleet_gain_warning(st.round, round_metrics, self.strategy.personalized)
        if warning:
            log.warning(warning)
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
                "loss": self.loss,
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
                "loss": self.loss,
                "selected": len(st.selected),
                "updates": len(st.received),
                "closed_at": time.time(),
            }
        )
