"""The round loop: select, send tasks, collect and validate updates, aggregate, persist, repeat.

One thread does the work; MQTT callbacks only enqueue (`MqttSession`). The session uses manual
acknowledgements: a QoS 1 update is acknowledged only after its row (and blob) are committed, so a
coordinator killed at any point gets every unacknowledged update again from the broker after a
restart, and the (round, agent) primary key turns that redelivery into a no-op. The round itself
(selection, tasks, deadline, whether it was extended) lives in the store, so a restarted
coordinator continues the same round.

Next to the rounds, on the same thread and session: the bundle directory is served over HTTP
(`bundle_server`), and open rollouts (`rollout`) get their acks and stage decisions; update
validation itself is the pure functions of `validation`.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedclip.coordinator import strategies
from fedclip.coordinator.bundle_server import BundleServer
from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.fleet import Fleet, decode_status
from fedclip.coordinator.metrics import METRICS_FILE, MetricsLog, weighted_means
from fedclip.coordinator.registry import (
    Registry,
    load_initial_adapter,  # noqa: F401  (re-exported)
)
from fedclip.coordinator.rollout import KEY_DIR, RegistrySource, RolloutManager
from fedclip.coordinator.rollout_store import DB_NAME as ROLLOUT_DB
from fedclip.coordinator.rollout_store import RolloutStore
from fedclip.coordinator.store import Store
from fedclip.coordinator.strategies.base import Update
from fedclip.coordinator.validation import KNOWN_STATS, Accepted, HeldStats, NormBound, validate_update
from fedclip.sdk.adapters import check_tensors, encode_tensors
from fedclip.sdk.errors import AdapterError, ConfigError, FedclipError, WireError
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.mqtt import Incoming, MqttSession, Will
from fedclip.sdk.signing import ensure_keypair
from fedclip.sdk.wire import Envelope, Message, MsgType, Topics, decode, encode

log = logging.getLogger("fedclip.coordinator")

_POLL_S = 0.2
_TICK_S = 1.0  # how often open rollouts are advanced
# Fault injection for the kill -9 tests: "<point>:<agent>" makes the process SIGKILL itself there.
_CRASH_ENV = "FEDCLIP_COORD_CRASH_AT"


def _crash_point(point: str, agent: str) -> None:
    if os.environ.get(_CRASH_ENV) == f"{point}:{agent}":
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class RoundState:
    round: int
    deadline: float
    extended: bool
    selected: dict[str, str]  # agent -> base version of its task
    task_blobs: dict[str, str]  # agent -> blob sha of its task message
    received: set[str] = field(default_factory=set)


class Server:
    def __init__(
        self, cfg: CoordConfig, manifest: Manifest, initial: Mapping[str, np.ndarray], progress=None
    ):
        self.cfg = cfg
        self.manifest = manifest
        # Rollouts and bundle serving: set up by `run` (the HTTP thread must not outlive it).
        self.bundles: BundleServer | None = None
        self.rollouts: RolloutManager | None = None
        self._next_tick = 0.0
        self.topics = Topics(cfg.fleet)
        self.strategy = strategies.create(cfg.strategy, cfg.strategy_options())
        self.store = Store(cfg.state)
        self._check_state_dir()
        self.registry = Registry(self.store, manifest.bundle_id, manifest.adapter.kind)
        initial = check_tensors(initial, manifest.exchanged, "initial adapter")
        self.registry.ensure_initial(initial, self.strategy.name)
        self.metrics = MetricsLog(Path(cfg.state) / METRICS_FILE)
        self.fleet = Fleet()
        self.current: RoundState | None = None
        self.progress = progress  # optional callback(event: str, server) for a live view
        self.exchanged = tuple(sorted(t.name for t in manifest.exchanged))
        self.session = MqttSession(
            cfg.broker,
            cfg.mqtt_client_id,
            username=cfg.username,
            password=cfg.password,
            ca_file=cfg.ca_file,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            insecure=cfg.insecure,
            clean_session=False,
            will=Will(self.topics.coordinator_status, self._status_payload("offline")),
            manual_ack=True,
        )
        self.session.on_connect.append(lambda s: self._publish_status("online"))
        self._waiting_logged = False

    def _check_state_dir(self) -> None:
        for key, value in (
            ("fleet", self.cfg.fleet),
            ("bundle_id", self.manifest.bundle_id),
            ("strategy", self.strategy.name),
        ):
            have = self.store.get_meta(key)
            if have is None:
                self.store.set_meta(key, value)
            elif have != value:
                raise ConfigError(f"state dir {self.cfg.state}: belongs to {key} {have!r}, not {value!r}")

    # ---- top level ---------------------------------------------------------------------------
    def run(self) -> int:
        rollout_store = None
        try:
            rollout_store = self._start_rollouts()
            self.session.subscribe(self.topics.all_agents("status"), 1)
            self.session.subscribe(self.topics.all_agents("update"), 1)
            self.session.connect()
            self._publish_status("online")
            while self.store.count_rounds("aggregated") < self.cfg.rounds:
                self._run_one_round()
            self._finish()
            return 0
        finally:
            self.session.close()
            if self.bundles is not None:
                self.bundles.stop()
            if rollout_store is not None:
                rollout_store.close()
            self.store.close()

    def _start_rollouts(self) -> RolloutStore:
        """The signing key, the bundle server and the rollout state machine next to the rounds."""
        key, public = ensure_keypair(Path(self.cfg.state) / KEY_DIR)
        log.info("coordinator public key: %s (give it to agents as coordinator_key)", public)
        if self.cfg.http:
            self.bundles = BundleServer(self.cfg.bundle, self.cfg.http_host, self.cfg.http_port).start()
            log.info("bundle server: agents download this bundle from %s", self.bundles.url)
        store = RolloutStore(Path(self.cfg.state) / ROLLOUT_DB)
        self.rollouts = RolloutManager(
            self.session,
            self.topics,
            store,
            key,
            RegistrySource(self.registry),
            publish_timeout=self.cfg.publish_timeout,
            # adapters too large for MQTT go by URL, next to the bundle (only with the HTTP server)
            url_root=self.cfg.bundle if self.bundles else None,
            url_base=self.bundles.url if self.bundles else None,
        )
        self.rollouts.subscribe()  # before connect: the subscription is part of the session
        return store

    def _run_one_round(self) -> None:
        last = self.store.last_round()
        if last is not None and last.state == "collecting":
            self._resume(last.round)
        else:
            self._start_round((last.round + 1) if last else 1)
        self._collect()

    # ---- starting and resuming ---------------------------------------------------------------
    def _start_round(self, round_id: int) -> None:
        while True:  # wait (serving messages) until enough compatible agents are online
            candidates = self.fleet.compatible_online(self.manifest.bundle_id)
            if len(candidates) >= self.cfg.min_updates:
                break
            if not self._waiting_logged:
                log.info(
                    "waiting for agents: %d of %d needed are online on bundle %s",
                    len(candidates),
                    self.cfg.min_updates,
                    self.manifest.bundle_id[:12],
                )
                self._waiting_logged = True
            self._event("waiting")
            self._pump(_POLL_S)
        self._waiting_logged = False
        selected = self.strategy.select(round_id, candidates)
        plans = self.strategy.configure_round(round_id, selected, self.registry)
        deadline = time.time() + self.cfg.round_timeout
        rows = []
        for agent, plan in sorted(plans.items()):
            blob = self._task_blob(
                round_id,
                agent,
                plan.start.version,
                plan.start.tensors,
                plan.stats,
                deadline,
                self._held_digest(agent, round_id, plan.stats),
            )
            rows.append((agent, plan.start.version, blob))
        self.store.start_round(round_id, self.strategy.name, deadline, rows)  # before anything is sent
        self.current = RoundState(
            round_id, deadline, False, {a: v for a, v, _ in rows}, {a: b for a, _, b in rows}
        )
        log.info(
            "round %d: started with %d agents (%s), deadline in %.0fs",
            round_id,
            len(rows),
            ", ".join(a for a, _, _ in rows[:8]) + (" ..." if len(rows) > 8 else ""),
            self.cfg.round_timeout,
        )
        self._send_tasks(self.current, list(self.current.selected))
        self._publish_status("online")

    def _resume(self, round_id: int) -> None:
        row = self.store.get_round(round_id)
        sel = self.store.selections(round_id)
        st = RoundState(
            round_id,
            row.deadline,
            row.extended,
            {a: v for a, (v, _) in sel.items()},
            {a: b for a, (_, b) in sel.items()},
        )
        st.received = {u.agent for u in self.store.updates(round_id)}
        self.current = st
        log.info(
            "round %d: resumed after a restart (%d of %d updates already stored)",
            round_id,
            len(st.received),
            len(st.selected),
        )
        # The tasks may not have gone out before the crash; the agents ignore a second copy.
        self._send_tasks(st, [a for a in st.selected if a not in st.received])
        self._publish_status("online")

    def _held_digest(self, agent: str, round_id: int, stats: tuple[str, ...]) -> str:
        """The data digest of the statistics held for `agent`, so it need not send them again; ""
        (send them) when the strategy needs none, none are held, or they are due for a refresh."""
        if "gaussian" not in stats:
            return ""
        held = self.store.agent_stats(agent)
        if held is None or not self.store.blobs.has(held.blob):
            return ""
        refresh = self.cfg.stats_refresh_rounds
        if refresh and round_id - held.round >= refresh:
            return ""
        return held.data_digest

    def _held_stats(self, agent: str) -> HeldStats | None:
        held = self.store.agent_stats(agent)
        if held is None or not held.data_digest:
            return None
        try:
            stats = self.store.blobs.read_tensors(held.blob, KNOWN_STATS)
        except Exception as e:  # a lost or damaged blob: none held, so the update is rejected
            log.warning("held statistics of %s unreadable (%s)", agent, e)
            return None
        return HeldStats(held.data_digest, stats)

    def _task_blob(
        self,
        round_id: int,
        agent: str,
        base_version: str,
        tensors: Mapping[str, np.ndarray],
        stats: tuple[str, ...],
        deadline: float,
        stats_digest: str = "",
    ) -> str:
        body = {
            "bundle_id": self.manifest.bundle_id,
            "deadline": deadline,
            "hyperparameters": self.cfg.hyperparameters(),
            "stats": list(stats),
            "noise_std": self.cfg.noise_std,
            "reset_optimizer": False,
        }
        if stats_digest:  # the agent leaves out the statistics it computed for this digest
            body["stats_digest"] = stats_digest
        env = Envelope(
            MsgType.TASK, self.cfg.fleet, agent, round=round_id, base_version=base_version, body=body
        )
        return self.store.blobs.put(encode(env, tensors))

    def _send_tasks(self, st: RoundState, agents: list[str]) -> None:
        for agent in agents:
            self._publish(self.topics.task(agent), self.store.blobs.get(st.task_blobs[agent]), retain=True)

    # ---- collecting --------------------------------------------------------------------------
    def _collect(self) -> None:
        st = self.current
        assert st is not None
        while True:
            if st.received >= set(st.selected):
                self._aggregate(st)
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
                    self._aggregate(st)
                    return
                if not st.extended:
                    self._extend(st)
                else:
                    self._fail(
                        st, f"quorum not reached: {n} of {self.cfg.min_updates} updates after extension"
                    )
                    return
            self._event("collecting")
            self._pump(_POLL_S)

    def _extend(self, st: RoundState) -> None:
        deadline = time.time() + self.cfg.round_timeout
        missing = sorted(set(st.selected) - st.received)
        blobs = {}
        for agent in missing:  # same task, later deadline, so an agent that has not started still may
            base = st.selected[agent]
            old = decode(
                self.store.blobs.get(st.task_blobs[agent]),
                fleet=self.cfg.fleet,
                max_bytes=self.cfg.max_payload_bytes,
            )
            body = old.envelope.body
            blobs[agent] = self._task_blob(
                st.round,
                agent,
                base,
                old.tensors,
                tuple(body["stats"]),
                deadline,
                body.get("stats_digest", ""),
            )
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

    def _fail(self, st: RoundState, reason: str) -> None:
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
        self._close(st)

    def _close(self, st: RoundState) -> None:
        # The round's tasks are stale now; an agent that connects later must not train on them.
        for agent in sorted(st.selected):
            self._publish(self.topics.task(agent), b"", retain=True)
        self.current = None
        self._event("closed")

    # ---- aggregation -------------------------------------------------------------------------
    def _aggregate(self, st: RoundState) -> None:
        rows = self.store.updates(st.round)
        updates = []
        for r in rows:
            stats = self.store.blobs.read_tensors(r.blob, KNOWN_STATS)
            base = self.registry.tensors(st.selected[r.agent])
            updates.append(
                Update(
                    r.agent,
                    r.num_samples,
                    self.store.blobs.tensors(r.blob, self.exchanged),
                    base,
                    stats,
                    r.metrics,
                )
            )
        t0 = time.perf_counter()
        try:
            result = self.strategy.aggregate(st.round, updates)
            for scope, tensors in [("global", result.global_tensors), *result.per_agent.items()]:
                check_tensors(tensors, self.manifest.exchanged, f"round {st.round}: aggregate for {scope}")
        except (AdapterError, ValueError, FloatingPointError) as e:  # never store a broken adapter
            self._fail(st, f"aggregation failed: {e}")
            return
        seconds = time.perf_counter() - t0
        per_agent = {r.agent: r.metrics for r in rows}
        samples = {r.agent: r.num_samples for r in rows}
        round_metrics = weighted_means(per_agent, samples)
        round_metrics.update(result.metrics)
        gv = self.registry.commit_round(
            st.round, self.strategy.name, result, st.selected, per_agent, round_metrics
        )
        log.info(
            "round %d: aggregated %d updates with %s in %.2fs -> %s%s",
            st.round,
            len(rows),
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
                "updates": len(rows),
                "metrics": round_metrics,
                "agents": per_agent,
                "samples": samples,
                "aggregate_seconds": seconds,
                "closed_at": time.time(),
            }
        )
        self._close(st)

    # ---- messages ----------------------------------------------------------------------------
    def _pump(self, timeout: float) -> None:
        """Handle queued messages (waiting up to `timeout` for the first); ack each once it is stored."""
        msg = self.session.get(timeout)
        while msg is not None:
            # Bad input is handled (rejected) inside; anything raised here is our own failure (the
            # store, the disk): no ack, the process ends, and the broker redelivers after a restart.
            if not self._rollout_step(msg):
                self._handle(msg)
            self.session.ack(msg)
            msg = self.session.get(0)
        if time.monotonic() >= self._next_tick:
            self._next_tick = time.monotonic() + _TICK_S
            self._rollout_step(None)

    def _rollout_step(self, msg: Incoming | None) -> bool:
        """Offer `msg` to the rollout manager (True if it was a rollout ack), or tick it (None).

        A rollout problem is logged, never allowed to stop the rounds: acks are idempotent and agents
        send them again, and the next tick (here, or `rollout watch`) retries a stage decision.
        """
        if self.rollouts is None:
            return False
        try:
            if msg is None:
                self.rollouts.tick()
                return True
            return self.rollouts.handle(msg)
        except (FedclipError, sqlite3.Error) as e:
            log.warning("rollout: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            return msg is not None

    def _handle(self, msg: Incoming) -> None:
        try:
            agent, kind = self.topics.parse_agent(msg.topic)
        except WireError as e:
            log.warning("dropped: %s", e)
            return
        if kind == "status":
            self._on_status(agent, msg)
        elif kind == "update":
            self._on_update(agent, msg)

    def _on_status(self, agent: str, msg: Incoming) -> None:
        try:
            a = decode_status(self.topics, agent, msg.payload) if msg.payload else None
        except WireError as e:
            log.warning("status dropped: %s", e)
            return
        self.fleet.on_status(agent, a)
        if a is None:
            return
        self.store.upsert_agent(a.id, a.online, a.bundle_id, a.adapter_version, a.last_round, a.info)
        log.info(
            "agent %s: %s (bundle %s, adapter %s, last round %d)",
            agent,
            "online" if a.online else "offline",
            a.bundle_id[:12] or "-",
            a.adapter_version or "-",
            a.last_round,
        )

    def _on_update(self, agent: str, msg: Incoming) -> None:
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
            accepted = self._validate(agent, decoded, where)
        except (WireError, AdapterError) as e:
            self._reject(msg.topic, agent, round_id, str(e))
            return
        except (ValueError, TypeError, KeyError, OverflowError) as e:  # a shape no check foresaw
            self._reject(msg.topic, agent, round_id, f"{where}: malformed update ({type(e).__name__}: {e})")
            return
        if accepted is None:
            return
        st = self.current
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
        elif outcome == "duplicate":
            log.info("round %d: duplicate update from %s ignored (redelivery)", st.round, agent)
        else:
            self._reject(
                msg.topic,
                agent,
                st.round,
                f"{where}: a different update for round {st.round} was already accepted from this agent",
            )

    def _validate(self, agent: str, msg: Message, where: str) -> Accepted | None:
        """The checks of `validation`, after matching the round; None for a late update (logged)."""
        env = msg.envelope
        if env.agent != agent:
            raise WireError(f"{where}: claims to be from agent {env.agent!r}")
        st = self.current
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
            held_stats=self._held_stats,
            where=where,
        )

    def _reject(self, topic: str, agent: str, round_id: int, reason: str) -> None:
        log.warning("rejected: %s", reason)
        self.store.add_rejection(topic, agent, round_id, reason)

    # ---- outgoing ----------------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.session.publish(topic, payload, qos=1, retain=retain, timeout=self.cfg.publish_timeout)

    def _status_payload(self, state: str, **extra: object) -> bytes:
        last = self.store.last_round()
        body = {
            "state": state,
            "bundle_id": self.manifest.bundle_id,
            "round": last.round if last else 0,
            "strategy": self.strategy.name,
            **extra,
        }
        if self.bundles is not None and state == "online":
            body["bundle_url"] = self.bundles.url
        return encode(Envelope(MsgType.STATUS, self.cfg.fleet, "coordinator", round=body["round"], body=body))

    def _publish_status(self, state: str, **extra: object) -> None:
        self._publish(self.topics.coordinator_status, self._status_payload(state, **extra), retain=True)

    def _finish(self) -> None:
        """Clear every retained task, so no agent trains a stale one; say we are done."""
        for agent in self.store.tasked_agents():
            self._publish(self.topics.task(agent), b"", retain=True)
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
