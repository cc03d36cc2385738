"""The round loop: wait for agents, start or resume a round, collect until done, close, repeat.

One thread does the work; transport callbacks only enqueue. The transport uses manual
acknowledgements: a QoS 1 message is acknowledged only after what it caused is committed, so a
coordinator killed at any point gets every unacknowledged update again from the broker after a
restart, and the (round, agent) primary key turns that redelivery into a no-op. The round itself
(selection, tasks, deadline, whether it was extended) lives in the store, so a restarted coordinator
continues the same round.

Its helpers each do one job: `tasks` builds the task messages, `intake` takes updates, `close`
aggregates or fails a round, `setup` builds the parts from the settings, and `services` runs beside
the rounds on the same thread and transport: the bundle's HTTP server and the open rollouts.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedclip.coordinator import strategies
from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.fleet import Fleet, decode_status
from fedclip.coordinator.metrics import METRICS_FILE, MetricsLog
from fedclip.coordinator.registry import Registry
from fedclip.coordinator.selection import Selector
from fedclip.coordinator.server.close import RoundCloser
from fedclip.coordinator.server.context import RoundContext
from fedclip.coordinator.server.group_commit import GroupCommit
from fedclip.coordinator.server.intake import UpdateIntake
from fedclip.coordinator.server.services import Services
from fedclip.coordinator.server.setup import (
    check_state_dir,
    load_key,
    load_trust,
    open_parts,
    status_payload,
)
from fedclip.coordinator.server.tasks import RoundState, Tasks, TaskSpec
from fedclip.coordinator.store import Store
from fedclip.coordinator.store.rows import agent_values
from fedclip.coordinator.strategies.base import Strategy
from fedclip.coordinator.trust import Trust
from fedclip.sdk.errors import WireError
from fedclip.sdk.guard import guard
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.messages import CoordinatorStatus
from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.signing import Ed25519PrivateKey
from fedclip.sdk.transport import Transport
from fedclip.sdk.wire import Topics

log = logging.getLogger("fedclip.coordinator")

_POLL_S = 0.2

Progress = Callable[[str, "Server"], None]  # (event, server): "waiting", "collecting", "closed", ...


class Server:
    """Runs `cfg.rounds` rounds over `transport`, recording everything in `store` and `registry`.

    The registry must already hold the initial adapter (`from_config` sees to it)."""

    def __init__(
        self,
        cfg: CoordConfig,
        manifest: Manifest,
        transport: Transport,
        store: Store,
        registry: Registry,
        *,
        strategy: Strategy | None = None,
        progress: Progress | None = None,
        key: Ed25519PrivateKey | None = None,
        trust: Trust | None = None,
    ):
        if cfg.loss != (resolved := cfg.with_loss_for(manifest)).loss:  # loss: auto (the default)
            log.info("loss: %s -> %s for this bundle", cfg.loss, resolved.loss)
        self.cfg = cfg = resolved
        self.manifest = manifest
        self.transport = transport
        self.store = store
        self.registry = registry
        self.strategy = strategy or strategies.create(cfg.strategy, cfg.strategy_options())
        check_state_dir(store, cfg, manifest.bundle_id, self.strategy.name)
        self.topics = Topics(cfg.fleet)
        self.fleet = Fleet(cfg.max_status_age, cfg.max_missed, cfg.group_by)
        # Fair selection remembers who had a task across a restart, a resumed round's agents
        # included: each agent's last round, from the store (within that round the agents queue by
        # name: the store keeps no turn).
        for round_id, group in itertools.groupby(store.last_tasked(), key=lambda row: row[0]):
            self.fleet.tasked(round_id, [agent for _, agent in group])
        self.selector = Selector(cfg, self.strategy, self.fleet)
        self.metrics = MetricsLog(Path(cfg.state) / METRICS_FILE)
        self.key = key if key is not None else load_key(cfg)
        self.trust = trust if trust is not None else Trust(None)
        ctx = RoundContext(cfg, manifest, store, registry, self.strategy, self.metrics, self.key, self.trust)
        self.tasks = Tasks(ctx)
        self.intake = UpdateIntake(ctx)
        self.batches = GroupCommit(
            transport,
            self.intake,
            self._dispatch,
            lambda: self.current,
            max_messages=cfg.intake_batch,
            max_wait=cfg.intake_wait,
        )
        self.closer = RoundCloser(ctx)
        self.current: RoundState | None = None
        self.progress = progress  # optional callback for a live view
        # Rollouts and bundle serving: started by `run` (the HTTP thread must not outlive it).
        self.services = Services(
            cfg,
            transport,
            self.topics,
            registry,
            self.key,
            self.trust,
            on_reject=lambda topic, agent, reason: store.add_rejection(topic, agent, -1, reason),
        )
        self._waiting_logged = False
        transport.on_connect.append(lambda t: self._publish_status("online"))

    @classmethod
    def from_config(
        cls,
        cfg: CoordConfig,
        manifest: Manifest,
        initial: Mapping[str, np.ndarray],
        progress: Progress | None = None,
    ) -> Server:
        """The store in `cfg.state` (with `initial` as version g-r0 on first start), its registry,
        and an MQTT session to `cfg.broker` whose last will says the coordinator went offline."""
        strategy = strategies.create(cfg.strategy, cfg.strategy_options())
        key = load_key(cfg)
        session, store, registry = open_parts(cfg, manifest, initial, strategy, key)
        try:
            trust = load_trust(cfg)
            return cls(
                cfg,
                manifest,
                session,
                store,
                registry,
                strategy=strategy,
                progress=progress,
                key=key,
                trust=trust,
            )
        except BaseException:
            store.close()
            raise

    # ---- top level ---------------------------------------------------------------------------
    def run(self) -> int:
        """Run until `cfg.rounds` rounds are aggregated; closes the transport and the store."""
        try:
            self.services.start()
            self.transport.subscribe(self.topics.all_agents("status"), 1)
            self.transport.subscribe(self.topics.all_agents("update"), 1)
            self.transport.connect()
            self._publish_status("online")
            while self.store.count_rounds("aggregated") < self.cfg.rounds:
                self.run_one_round()
            self._finish()
            return 0
        finally:
            self.transport.close()
            self.services.stop()
            self.intake.close()
            self.store.close()

    def run_one_round(self) -> None:
        """Start (or resume) a round and collect it until it closes."""
        last = self.store.last_round()
        if last is not None and last.state == "collecting":
            self._resume(last.round)
        else:
            self._start_round((last.round + 1) if last else 1)
        self._collect()

    # ---- starting and resuming ---------------------------------------------------------------
    def _wait_for_agents(self) -> list[str]:
        """Serve messages until enough agents are eligible (see `Fleet`); returns them."""
        while True:
            n = self.fleet.eligible_count(self.manifest.bundle_id)  # O(1): this runs per iteration
            if n >= self.cfg.min_updates:
                self._waiting_logged = False
                return self.fleet.eligible(self.manifest.bundle_id)
            if not self._waiting_logged:
                log.info(
                    "waiting for agents: %d of %d needed are online on bundle %s",
                    n,
                    self.cfg.min_updates,
                    self.manifest.bundle_id[:12],
                )
                self._waiting_logged = True
            self._event("waiting")
            self.pump(_POLL_S)

    def _start_round(self, round_id: int) -> None:
        candidates = self._wait_for_agents()
        selected = self.selector.select(round_id, candidates)
        self.fleet.tasked(round_id, selected)
        plans = self.strategy.configure_round(round_id, selected, self.registry)
        deadline = time.time() + self.cfg.round_timeout
        st = RoundState(round_id, deadline, False, {}, {})
        specs = []
        for agent, plan in sorted(plans.items()):
            digest = self.tasks.held_digest(agent, round_id, plan.stats)
            specs.append(
                (
                    TaskSpec(round_id, agent, plan.start.version, plan.stats, deadline, digest, plan.train),
                    plan.start.tensors,
                )
            )
            st.selected[agent] = plan.start.version
        st.task_blobs = dict(zip([spec.agent for spec, _ in specs], self.tasks.build(specs), strict=True))
        rows = [(a, st.selected[a], st.task_blobs[a]) for a in sorted(st.selected)]
        self.store.start_round(round_id, self.strategy.name, deadline, rows)  # before anything is sent
        self.current = st
        names = sorted(st.selected)
        fresh = sum(not p.train for p in plans.values())
        log.info(
            "round %d: started with %d agents (%s)%s, deadline in %.0fs",
            round_id,
            len(names),
            ", ".join(names[:8]) + (" ..." if len(names) > 8 else ""),
            f", {fresh} newcomer(s) asked for statistics only" if fresh else "",
            self.cfg.round_timeout,
        )
        self._send_tasks(st, names)
        self._publish_status("online")

    def _resume(self, round_id: int) -> None:
        row = self.store.get_round(round_id)
        assert row is not None  # the caller just read it as the last round
        sel = self.store.selections(round_id)
        st = RoundState(
            round_id,
            row.deadline,
            row.extended,
            {a: v for a, (v, _) in sel.items()},
            {a: b for a, (_, b) in sel.items()},
        )
        st.received = {u.agent for u in self.store.updates(round_id)}
        self.current = st  # its agents' turns were rebuilt from the store with the fleet (__init__)
        log.info(
            "round %d: resumed after a restart (%d of %d updates already stored)",
            round_id,
            len(st.received),
            len(st.selected),
        )
        # The tasks may not have gone out before the crash; the agents ignore a second copy.
        self._send_tasks(st, st.missing)
        self._publish_status("online")

    def _send_tasks(self, st: RoundState, agents: list[str]) -> None:
        self._publish_many([(self.topics.task(agent), self.tasks.payload(st, agent)) for agent in agents])

    # ---- collecting --------------------------------------------------------------------------
    def _collect(self) -> None:
        st = self.current
        assert st is not None
        while True:
            if st.complete:
                self._close(st, aggregate=True)
                return
            if time.time() >= st.deadline:
                n = len(st.received)
                if n >= self.cfg.min_updates:
                    log.info(
                        "round %d: deadline passed with %d of %d updates; stragglers dropped",
                        st.round,
                        n,
                        len(st.selected),
                    )
                    self._close(st, aggregate=True)
                    return
                if st.extended:
                    reason = f"quorum not reached: {n} of {self.cfg.min_updates} updates after extension"
                    self.closer.fail(st, reason)
                    self._close(st, aggregate=False)
                    return
                self._extend(st)
            self._event("collecting")
            self.pump(_POLL_S)

    def _extend(self, st: RoundState) -> None:
        deadline = time.time() + self.cfg.round_timeout
        missing = st.missing
        blobs = self.tasks.reissue(st, missing, deadline)
        self.store.extend_round(st.round, deadline, blobs)
        st.deadline, st.extended = deadline, True
        st.task_blobs.update(blobs)
        log.info(
            "round %d: %d of %d updates below quorum %d; deadline extended once by %.0fs",
            st.round,
            len(st.received),
            len(st.selected),
            self.cfg.min_updates,
            self.cfg.round_timeout,
        )
        self._send_tasks(st, missing)

    def _close(self, st: RoundState, aggregate: bool) -> None:
        if aggregate:
            self.closer.aggregate(st)
        self.fleet.round_closed(st.missing)
        # The round's tasks are stale now; an agent that connects later must not train on them.
        self._publish_many([(self.topics.task(agent), b"") for agent in sorted(st.selected)])
        self.current = None
        self._event("closed")

    # ---- messages ----------------------------------------------------------------------------
    def pump(self, timeout: float) -> None:
        """Handle queued messages (waiting up to `timeout` for the first); ack each once it is stored
        (in batches: `group_commit`)."""
        self.batches.pump(timeout)
        self.services.tick()

    def _dispatch(self, msg: Incoming) -> None:
        with guard(msg, self._reject_unhandled):
            if not self.services.offer(msg):
                self._handle(msg)

    def _reject_unhandled(self, msg: Incoming, reason: str) -> None:
        agent, round_id = "", -1
        with contextlib.suppress(WireError):
            agent = self.topics.parse_agent(msg.topic)[0]
        self.store.add_rejection(msg.topic, agent, round_id, reason)

    def _handle(self, msg: Incoming) -> None:
        try:
            agent, kind = self.topics.parse_agent(msg.topic)
        except WireError as e:
            log.warning("dropped: %s", e)
            return
        if kind == "status":
            self._on_status(agent, msg)
        elif kind == "update":
            self.fleet.heard(agent)  # alive (on a provisioned fleet only the device may publish here)
            self.intake.stage(agent, msg, self.current)

    def _on_status(self, agent: str, msg: Incoming) -> None:
        try:
            a = decode_status(self.topics, agent, msg.payload, self.trust) if msg.payload else None
        except WireError as e:
            self.intake.reject(msg.topic, agent, -1, str(e))
            return
        old = self.fleet.agents.get(agent)
        self.fleet.on_status(agent, a)
        if a is None:
            return
        # Durable with the batch (group commit), before the message is acknowledged.
        row = agent_values(a.id, a.online, a.bundle_id, a.adapter_version, a.last_round, a.info, time.time())
        self.intake.stage_agent(row)
        # agents resend an unchanged status until a task reaches them (device_agent.status.tick)
        same = old is not None and replace(old, seen_at=a.seen_at) == a
        log.log(
            logging.DEBUG if same else logging.INFO,
            "agent %s: %s (bundle %s, adapter %s, last round %d)",
            agent,
            "online" if a.online else "offline",
            a.bundle_id[:12] or "-",
            a.adapter_version or "-",
            a.last_round,
        )

    # ---- outgoing ----------------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.transport.publish(topic, payload, qos=1, retain=retain, timeout=self.cfg.publish_timeout)

    def _publish_many(self, messages: list[tuple[str, bytes]]) -> None:
        """Retained, QoS 1, pipelined: a round's N tasks (or N emptied ones) are not N round trips."""
        self.transport.publish_many(messages, qos=1, retain=True, timeout=self.cfg.publish_timeout)

    def status_payload(self, state: str, finished: bool = False) -> bytes:
        """This coordinator's status now (with the bundle URL while it is online and serving)."""
        last = self.store.last_round()
        url = self.services.bundle_url if state == "online" else None
        status = CoordinatorStatus(
            state, self.manifest.bundle_id, last.round if last else 0, self.strategy.name, url or "", finished
        )
        return status_payload(self.cfg.fleet, status, self.key)

    def _publish_status(self, state: str, finished: bool = False) -> None:
        self._publish(self.topics.coordinator_status, self.status_payload(state, finished), retain=True)

    def _finish(self) -> None:
        """Clear every retained task, so no agent trains a stale one; say we are done."""
        self._publish_many([(self.topics.task(agent), b"") for agent in self.store.tasked_agents()])
        self._publish_status("offline", finished=True)
        log.info(
            "done: %d rounds aggregated (%d failed); retained tasks cleared",
            self.store.count_rounds("aggregated"),
            self.store.count_rounds("failed"),
        )
        self._event("finished")

    def _event(self, name: str) -> None:
        if self.progress is not None:
            self.progress(name, self)
