"""Update intake: decode, validate, store an agent's update for the open round, or reject it.

Every outcome is decided here and recorded before the caller acknowledges the message: an accepted
update's blob and row are committed first (the (round, agent) key turns a redelivery into a no-op),
a rejected one is logged and written to the `rejections` table with its one-line reason.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Literal

from fedclip.coordinator.server.context import RoundContext
from fedclip.coordinator.server.tasks import RoundState
from fedclip.coordinator.validation import Accepted, HeldStats, NormBound, validate_update
from fedclip.sdk.adapters import encode_tensors
from fedclip.sdk.errors import AdapterError, WireError
from fedclip.sdk.messages import KNOWN_STATS
from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.wire import Message, MsgType, decode

log = logging.getLogger("fedclip.coordinator")

# Fault injection for the kill -9 tests: "<point>:<agent>" makes the process SIGKILL itself there.
CRASH_ENV = "FEDCLIP_COORD_CRASH_AT"

Outcome = Literal["stored", "duplicate", "conflict", "late", "rejected"]


def _crash_point(point: str, agent: str) -> None:
    if os.environ.get(CRASH_ENV) == f"{point}:{agent}":
        os.kill(os.getpid(), signal.SIGKILL)


class UpdateIntake:
    """Takes `agents/<id>/update` messages for the round the caller has open."""

    def __init__(self, ctx: RoundContext):
        self.cfg, self.manifest, self.strategy = ctx.cfg, ctx.manifest, ctx.strategy
        self.store, self.registry, self.trust = ctx.store, ctx.registry, ctx.trust

    def on_update(self, agent: str, msg: Incoming, st: RoundState | None) -> Outcome:
        """Handle one update that came on `agent`'s topic; `st.received` grows when it is stored."""
        where = f"update on the topic of {agent}"
        round_id = -1
        try:
            decoded = decode(
                msg.payload,
                fleet=self.cfg.fleet,
                expect=MsgType.UPDATE,
                max_bytes=self.cfg.max_payload_bytes,
                where=where,
            )
            round_id = decoded.envelope.round
            self.trust.check(agent, decoded, where)  # before anything else: only the agent speaks for it
            accepted = self._validate(agent, decoded, st, where)
        except (WireError, AdapterError) as e:
            self.reject(msg.topic, agent, round_id, str(e))
            return "rejected"
        except (ValueError, TypeError, KeyError, OverflowError) as e:  # a shape no check foresaw
            self.reject(msg.topic, agent, round_id, f"{where}: malformed update ({type(e).__name__}: {e})")
            return "rejected"
        if accepted is None:
            return "late"
        assert st is not None  # _validate matched the update to the open round
        return self._store(st, agent, accepted, msg, where)

    def _store(self, st: RoundState, agent: str, accepted: Accepted, msg: Incoming, where: str) -> Outcome:
        _crash_point("update-received", agent)
        # The stored update holds its statistics whether they travelled or were the held ones, so
        # aggregation reads every round's updates the same way; `wire_bytes` keeps what travelled.
        blob = self.store.blobs.put(
            encode_tensors({**accepted.tensors, **accepted.stats}, {"agent": agent, "round": str(st.round)})
        )
        # Statistics that travelled become the agent's held ones: the update's blob has them.
        held = (accepted.data_digest, blob) if accepted.stats_sent else None
        outcome = self.store.add_update(
            st.round,
            agent,
            accepted.sha,
            blob,
            accepted.num_samples,
            accepted.metrics,
            accepted.norm,
            accepted.clipped,
            wire_bytes=len(msg.payload),
            stats=held,
        )
        _crash_point("update-stored", agent)  # committed, not yet acknowledged
        if outcome == "stored":
            st.received.add(agent)
            log.info(
                "round %d: update from %s accepted (%d samples, norm %.3g%s) [%d/%d]",
                st.round,
                agent,
                accepted.num_samples,
                accepted.norm,
                ", clipped" if accepted.clipped else "",
                len(st.received),
                len(st.selected),
            )
            return "stored"
        if outcome == "duplicate":
            log.info("round %d: duplicate update from %s ignored (redelivery)", st.round, agent)
            return "duplicate"
        self.reject(
            msg.topic,
            agent,
            st.round,
            f"{where}: a different update for round {st.round} was already accepted from this agent",
        )
        return "conflict"

    def _validate(self, agent: str, msg: Message, st: RoundState | None, where: str) -> Accepted | None:
        """The checks of `validation`, after matching the round; None for a late update (recorded)."""
        env = msg.envelope
        if env.agent != agent:
            raise WireError(f"{where}: claims to be from agent {env.agent!r}")
        if st is None or env.round != st.round:
            row = self.store.get_round(env.round) if env.round >= 0 else None
            if row is not None and row.state != "collecting":
                log.info("round %d: late update from %s dropped (round is %s)", env.round, agent, row.state)
                self.store.add_rejection(
                    f"agents/{agent}/update", agent, env.round, f"late: round {row.state}"
                )
                return None
            current = st.round if st else "none"
            raise WireError(f"{where}: round {env.round} is not the current round ({current})")
        return validate_update(
            agent,
            msg,
            round_id=st.round,
            selected=st.selected,
            manifest=self.manifest,
            strategy=self.strategy.name,
            needed_stats=self.strategy.stats,
            start_tensors=self.registry.tensors,
            bound=NormBound(self.cfg.max_update_norm, self.cfg.norm_action),
            held_stats=self.held_stats,
            where=where,
        )

    def held_stats(self, agent: str) -> HeldStats | None:
        held = self.store.agent_stats(agent)
        if held is None or not held.data_digest:
            return None
        try:
            stats = self.store.blobs.read_tensors(held.blob, KNOWN_STATS)
        except Exception as e:  # a lost or damaged blob: none held, so the update is rejected
            log.warning("held statistics of %s unreadable (%s)", agent, e)
            return None
        return HeldStats(held.data_digest, stats)

    def reject(self, topic: str, agent: str, round_id: int, reason: str) -> None:
        log.warning("rejected: %s", reason)
        self.store.add_rejection(topic, agent, round_id, reason)
