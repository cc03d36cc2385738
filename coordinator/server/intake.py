"""Update intake: decode, validate and store agents' updates for the open round, or reject them.

Updates are taken in batches (group commit): `stage` decides each one's fate at once (decoded, signature
and every check of `validation`, or a one-line rejection) and keeps it; `flush` makes the whole batch
durable together: every accepted update's blob on disk (`Blobs.put_many`: all written, then all
fsynced together), then every row and rejection in one transaction (one commit). Only after `flush`
returns may the caller acknowledge the batch's messages (`group_commit`), so a message is never
acknowledged before what it caused is on disk, and a coordinator killed at any point gets every
unacknowledged update again from the broker; the (round, agent) key turns that redelivery, or a second
copy in the same batch, into a no-op. `on_update` is a batch of one.

Under load a batch's payloads are decoded, their signatures checked and the updates that may be
accepted stored ahead, in a worker process, while the batch before is handled (`decode_ahead`,
`coordinator.intake_decode`); `stage` then takes what the worker made as `decode`, `Trust.check`
and the blob write would have made it, and checks the rest in the loop as always.

Agents' statuses ride along (`stage_agent`): their `agents` rows join the batch's transaction, the
last status of an agent in a batch winning, instead of one fsynced commit per status: in a connect
storm of 10,000 agents the row, not the decode, was what each status cost
(benchmarks/results/selection.md).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Literal

from fedclip.coordinator.intake_decode import (
    Batch,
    Decoded,
    DecodePool,
    Job,
    Pending,
    default_workers,
    update_blob,
)
from fedclip.coordinator.server.context import RoundContext
from fedclip.coordinator.server.tasks import RoundState
from fedclip.coordinator.store import NewUpdate
from fedclip.coordinator.validation import Accepted, HeldStats, NormBound, validate_update
from fedclip.sdk.errors import AdapterError, WireError
from fedclip.sdk.messages import KNOWN_STATS
from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.wire import Message, MsgType, Topics, decode

log = logging.getLogger("fedclip.coordinator")

# Fault injection for the kill -9 tests: "<point>:<agent>" makes the process SIGKILL itself at that
# point of the flush of the batch holding the agent's update, "<point>:batch>=<n>" in the first batch
# of at least n updates. Points: "update-received" (no row written; a decode worker may have stored
# blobs), "blobs-written" (blobs durable, rows not committed), "update-stored" (committed, not
# acknowledged).
CRASH_ENV = "FEDCLIP_COORD_CRASH_AT"

Outcome = Literal["stored", "duplicate", "conflict", "late", "rejected"]
Decoding = tuple[list[Incoming], Pending | None]  # a batch's updates, decoding ahead


def _crash_point(point: str, agents: list[str]) -> None:
    want = os.environ.get(CRASH_ENV, "")
    if not want.startswith(f"{point}:"):
        return
    target = want.split(":", 1)[1]
    if target.startswith("batch>="):
        hit = len(agents) >= int(target.removeprefix("batch>="))
    else:
        hit = target in agents
    if hit:
        # One unbuffered line first, so a test can tell which batch the kill hit.
        line = f"crash point {point} in a batch of {len(agents)} updates: {' '.join(agents)}\n"
        os.write(2, line.encode())
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Staged:
    """One update message taken by `stage`; `outcome` is final once its batch is flushed."""

    agent: str
    msg: Incoming
    outcome: Outcome | None = None
    accepted: Accepted | None = None
    st: RoundState | None = None
    blob: bytes = b""  # what is stored: the tensors and the statistics, as one safetensors file
    sha: str = ""  # set instead when a decode worker stored that blob already


class UpdateIntake:
    """Takes `agents/<id>/update` messages for the round the caller has open."""

    def __init__(self, ctx: RoundContext):
        self.cfg, self.manifest, self.strategy = ctx.cfg, ctx.manifest, ctx.strategy
        self.store, self.registry, self.trust = ctx.store, ctx.registry, ctx.trust
        self._batch: list[Staged] = []  # accepted, waiting for `flush`
        self._rejections: list[tuple[str, str, int, str]] = []  # (topic, agent, round, reason)
        self._agents: dict[str, tuple] = {}  # agent -> its `agents` row from its latest status
        self.topics = Topics(self.cfg.fleet)
        workers = self.cfg.intake_workers if self.cfg.intake_workers is not None else default_workers()
        self.pool = DecodePool(workers)
        # (topic, payload) -> that payload decoded ahead: equal messages decode equally
        self._decoded: dict[tuple[str, bytes], Decoded] = {}
        self.stored_ahead = 0  # accepted updates whose blob a decode worker had stored

    def close(self) -> None:
        self.pool.close()

    # ---- decoding ahead (intake_decode) ----------------------------------------------------------
    def decode_ahead(self, batch: list[Incoming], st: RoundState | None) -> Decoding:
        """Start decoding the batch's updates in the worker pool (none when it is not worth it); those
        that may be accepted into round `st` are stored there too."""
        updates, jobs = [], []
        for msg in batch:
            try:
                agent, kind = self.topics.parse_agent(msg.topic)
            except WireError:
                continue
            if kind == "update" and msg.payload:
                updates.append(msg)
                where = f"update on the topic of {agent}"
                jobs.append(Job(msg.payload, where, self.trust.sender_key(agent), self.trust.signer(agent)))
        shared = Batch(
            self.cfg.fleet,
            self.cfg.max_payload_bytes,
            blobs=str(self.store.blobs.root) if st is not None else "",
            round=st.round if st is not None else -1,
            specs=tuple(self.manifest.exchanged),
            provisioned=self.trust.required,
        )
        return updates, self.pool.submit(jobs, shared)

    def take_decoded(self, ahead: Decoding) -> None:
        """Wait for what `decode_ahead` started; `stage` uses it for those messages."""
        updates, future = ahead
        results = self.pool.result(future)
        pairs = zip(updates, results, strict=True) if results is not None else ()
        self._decoded = {(m.topic, m.payload): d for m, d in pairs}

    def on_update(self, agent: str, msg: Incoming, st: RoundState | None) -> Outcome:
        """Handle one update that came on `agent`'s topic, durably (a batch of one)."""
        staged = self.stage(agent, msg, st)
        self.flush()
        assert staged.outcome is not None  # flush decided it
        return staged.outcome

    def stage_agent(self, values: tuple) -> None:
        """Keep an agent's `agents` row (`rows.agent_values`) for the next `flush`."""
        self._agents[values[0]] = values

    def stage(self, agent: str, msg: Incoming, st: RoundState | None) -> Staged:
        """Decode and check one update; keep it (or its rejection) for the next `flush`."""
        staged = Staged(agent, msg)
        where = f"update on the topic of {agent}"
        round_id = -1
        ahead = self._decoded.get((msg.topic, msg.payload))
        try:
            if ahead is not None and ahead.error:
                raise WireError(ahead.error)
            if ahead is not None and ahead.msg is not None:
                decoded = ahead.msg
            else:
                decoded = decode(
                    msg.payload,
                    fleet=self.cfg.fleet,
                    expect=MsgType.UPDATE,
                    max_bytes=self.cfg.max_payload_bytes,
                    where=where,
                )
            round_id = decoded.envelope.round
            verified = (ahead.key, ahead.verify_error) if ahead is not None and ahead.key else None
            # before anything else: only the agent speaks for it
            self.trust.check(agent, decoded, where, verified)
            accepted = self._validate(agent, decoded, st, where)
        except (WireError, AdapterError) as e:
            self.reject(msg.topic, agent, round_id, str(e))
            staged.outcome = "rejected"
            return staged
        except (ValueError, TypeError, KeyError, OverflowError) as e:  # a shape no check foresaw
            self.reject(msg.topic, agent, round_id, f"{where}: malformed update ({type(e).__name__}: {e})")
            staged.outcome = "rejected"
            return staged
        if accepted is None:
            staged.outcome = "late"
            return staged
        assert st is not None  # _validate matched the update to the open round
        staged.accepted, staged.st = accepted, st
        if (
            ahead is not None
            and ahead.blob
            and not accepted.clipped
            and set(accepted.stats) == set(decoded.stats)
        ):
            # what the worker stored is what the loop would: the tensors and statistics as sent
            staged.sha = ahead.blob
            self.stored_ahead += 1
        else:
            # The stored update holds its statistics whether they travelled or were the held ones,
            # so aggregation reads every round's updates the same way; `wire_bytes` keeps what
            # travelled.
            staged.blob = update_blob(accepted.tensors, accepted.stats, agent, st.round)
        self._batch.append(staged)
        return staged

    def flush(self) -> None:
        """Make every staged update and rejection durable: blobs, then rows in one transaction."""
        batch, rejections, agent_rows = self._batch, self._rejections, list(self._agents.values())
        if not batch and not rejections and not agent_rows:
            return
        self._batch, self._rejections, self._agents = [], [], {}
        started = time.monotonic()
        agents = [s.agent for s in batch]
        _crash_point("update-received", agents)
        written = iter(self.store.blobs.put_many([s.blob for s in batch if not s.sha]))
        blobs = [s.sha or next(written) for s in batch]  # the workers' blobs are durable already
        _crash_point("blobs-written", agents)
        rows = [self._row(s, blob) for s, blob in zip(batch, blobs, strict=True)]
        outcomes = self.store.add_updates(rows, rejections, agent_rows)
        _crash_point("update-stored", agents)  # committed, not yet acknowledged
        conflicts = []
        for s, outcome in zip(batch, outcomes, strict=True):
            s.outcome = outcome
            self._log(s)
            if s.outcome == "conflict":
                assert s.st is not None
                reason = (
                    f"update on the topic of {s.agent}: a different update for round {s.st.round} was "
                    "already accepted from this agent"
                )
                log.warning("rejected: %s", reason)
                conflicts.append((s.msg.topic, s.agent, s.st.round, reason))
        if conflicts:  # rare (a second, different update): recorded before the batch is acknowledged
            self.store.add_rejections(conflicts)
        if len(batch) > 1:  # how big the batches get under load, and what one costs
            ms = (time.monotonic() - started) * 1000
            ahead = sum(1 for s in batch if s.sha)
            log.info(
                "group commit: %d updates (%d stored ahead by a decode worker) and %d rejections in %.0f ms",
                len(batch),
                ahead,
                len(rejections),
                ms,
            )

    def _row(self, s: Staged, blob: str) -> NewUpdate:
        a, st = s.accepted, s.st
        assert a is not None and st is not None  # only accepted updates are batched
        # Statistics that travelled become the agent's held ones: the update's blob has them.
        held = (a.data_digest, blob) if a.stats_sent else None
        return NewUpdate(
            st.round, s.agent, a.sha, blob, a.num_samples, a.metrics, a.norm, a.clipped,
            wire_bytes=len(s.msg.payload), stats=held,
        )  # fmt: skip

    def _log(self, s: Staged) -> None:
        a, st = s.accepted, s.st
        assert a is not None and st is not None
        if s.outcome == "stored":
            st.received.add(s.agent)
            log.info(
                "round %d: update from %s accepted (%d samples, norm %.3g%s) [%d/%d]",
                st.round,
                s.agent,
                a.num_samples,
                a.norm,
                ", clipped" if a.clipped else "",
                len(st.received),
                len(st.selected),
            )
        elif s.outcome == "duplicate":
            log.info("round %d: duplicate update from %s ignored (redelivery)", st.round, s.agent)

    def _validate(self, agent: str, msg: Message, st: RoundState | None, where: str) -> Accepted | None:
        """The checks of `validation`, after matching the round; None for a late update (recorded)."""
        env = msg.envelope
        if env.agent != agent:
            raise WireError(f"{where}: claims to be from agent {env.agent!r}")
        if st is None or env.round != st.round:
            row = self.store.get_round(env.round) if env.round >= 0 else None
            if row is not None and row.state != "collecting":
                log.info("round %d: late update from %s dropped (round is %s)", env.round, agent, row.state)
                late = (f"agents/{agent}/update", agent, env.round, f"late: round {row.state}")
                self._rejections.append(late)
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
        """Log `reason` and record it with the next flush (before the message is acknowledged)."""
        log.warning("rejected: %s", reason)
        self._rejections.append((topic, agent, round_id, reason))
