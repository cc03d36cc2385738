"""The `fedclip-agent start` loop: one agent's life in the fleet.

Everything happens on the main thread: transport callbacks only enqueue (`Transport.get`), and the
on-connect hook only re-publishes the retained status from a snapshot the main thread keeps. The rooms:

- `device_agent.rounds`: bundle, data, trainer, state dir; runs one round to a kept update;
- `device_agent.inbox`: what each incoming message does (tasks, unsigned adapters, rollouts);
- `device_agent.updates`: building and publishing updates; `device_agent.status`: the retained status.

A restart picks up from the state dir (see `device_agent.state`): a built update is republished byte
for byte, an interrupted round resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from fedclip.device_agent.config import AgentConfig
from fedclip.device_agent.inbox import Inbox
from fedclip.device_agent.personalize import personalize
from fedclip.device_agent.rollout_client import RolloutClient
from fedclip.device_agent.rounds import RoundRunner
from fedclip.device_agent.status import StatusReporter, status_blob
from fedclip.device_agent.updates import UpdatePublisher
from fedclip.sdk.adapters import check_adapter
from fedclip.sdk.errors import FedclipError, MqttError, StateError
from fedclip.sdk.guard import guard
from fedclip.sdk.messages import TuningProgress
from fedclip.sdk.mqtt import Incoming, MqttSession, Will
from fedclip.sdk.transport import Transport
from fedclip.sdk.wire import Topics

log = logging.getLogger("fedclip.agent")


class Agent:
    """An agent on `transport` (MqttSession in service, MemoryTransport in unit tests). `from_config`
    builds the whole thing from an `agent.yaml` as `fedclip-agent start` does."""

    def __init__(
        self,
        cfg: AgentConfig,
        transport: Transport,
        runner: RoundRunner,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        self.cfg = cfg
        self.transport = transport
        self.runner = runner
        self.stop = stop if stop is not None else threading.Event()
        runner.stop = self.stop  # a stop request ends training after the current step
        self._untuned: str | None = None  # the adapter whose personal tuning failed (not retried)
        self.topics = Topics(cfg.fleet)
        self.status = StatusReporter(
            transport, cfg, runner.manifest.bundle_id, runner.state, len(runner.train_set)
        )
        transport.on_connect.append(self.status.on_connect)
        self.updates = UpdatePublisher(
            transport,
            runner.state,
            self.status,
            fleet=cfg.fleet,
            agent_id=cfg.id,
            publish_timeout=cfg.publish_timeout,
        )
        key = cfg.coordinator_key
        self.rollout = self._rollout_client(key) if key is not None else None
        self.inbox = Inbox(cfg, transport, runner, self.status, self.updates, self.rollout)
        log.info(
            "agent %s of fleet %s: bundle %s, %d training / %d held-out images, state %s",
            cfg.id,
            cfg.fleet,
            runner.manifest.bundle_id[:12],
            len(runner.train_set),
            len(runner.held_out),
            cfg.state,
        )

    @classmethod
    def from_config(cls, cfg: AgentConfig) -> Agent:
        """Load bundle, data and state dir, and make the MQTT session with the offline status as its
        last will. Signals are handled from the start, so a SIGTERM while loading still ends in a clean
        exit 0."""
        stop = threading.Event()
        _install_signals(stop)
        runner = RoundRunner.open(cfg, stop)
        try:
            topics = Topics(cfg.fleet)
            offline = status_blob(
                cfg, runner.manifest.bundle_id, runner.state, len(runner.train_set), "offline"
            )
            session = MqttSession(
                cfg.broker,
                cfg.id,
                username=cfg.username,
                password=cfg.secret(),
                ca_file=_opt(cfg.ca_file),
                cert_file=_opt(cfg.cert_file),
                key_file=_opt(cfg.key_file),
                clean_session=False,
                keepalive=cfg.keepalive,
                will=Will(topics.status(cfg.id), offline, qos=1, retain=True),
            )
            return cls(cfg, session, runner, stop=stop)
        except BaseException:
            runner.close()
            raise

    def _rollout_client(self, coordinator_key: Path) -> RolloutClient:
        """Signed rollouts (`device_agent.rollout_client`) own the adapter topic when a key is configured;
        they record what they install and roll back in the state dir's adapter ledger."""
        manifest = self.runner.manifest
        return RolloutClient(
            self.transport,
            self.topics,
            self.cfg.id,
            self.runner.state,
            coordinator_key,
            self.runner.evaluate_adapter,
            bundle_id=manifest.bundle_id,
            check_fn=lambda tensors, where: check_adapter(tensors, manifest, where),
            complete_fn=self.runner.full_adapter,
            refuse=self.status.refuse,  # in the log and the retained status, as a refused task
            max_payload=self.cfg.max_payload_bytes,
            publish_timeout=self.cfg.publish_timeout,
            device_key=self.cfg.signing_key(),
        )

    # ---- lifecycle -------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; then publish `offline` and return 0."""
        try:
            if not self.start():
                return 0
            while not self.stop.is_set():
                self.poll(timeout=0.5)
            return 0
        finally:
            self.shutdown()

    def start(self) -> bool:
        """Connect (retrying with backoff until stopped), subscribe, and pick up what a restart left:
        republish built updates, finish the round that was in progress. False when stopped first."""
        if not self._connect():
            return False
        self.transport.subscribe(self.topics.task(self.cfg.id), qos=1)
        if self.rollout is not None:
            self.rollout.subscribe()  # signed adapters, rollback and pin commands
        elif self.cfg.accept_unsigned_adapters:
            topic = self.topics.adapter(self.cfg.id)
            log.warning("accepting unsigned adapters on %s (closed test setups only)", topic)
            self.transport.subscribe(topic, qos=1)
        else:
            # Unsigned pushes would let anyone who can publish on the broker replace the model.
            log.info("no coordinator_key: adapter rollouts are ignored until one is configured")
        self._resume()
        self._personalize()  # an adapter installed before a stop (or before tuning was on)
        return True

    def _personalize(self) -> None:
        """With personal tuning on, give the adapter in use its personal copy (`device_agent.personal`),
        or go on with a tuning a message paused. A failure keeps the fleet's adapter serving, is one
        line in the log and is not retried for that adapter until the agent restarts."""
        if not self.cfg.personal.enabled or self.stop.is_set():
            return
        if self.runner.state.current_adapter in (None, self._untuned):
            return
        try:
            # Yields to any message: a round's task or a rollback never waits for a whole tuning.
            done = personalize(
                self.runner, self.cfg.personal, yield_to=self.transport.waiting, at=self._tuning
            )
        except FedclipError as e:
            self._untuned = self.runner.state.current_adapter
            log.warning("personal tuning failed (%s); inference keeps the fleet's adapter", e)
            # the fleet's view said it was tuning: now it says it is not, and why
            self.status.tuning, self.status.notice = None, f"personal tuning of {self._untuned} failed: {e}"
            self.status.publish()
            return
        if done is not None:
            self.status.tuning = None
            self.status.publish()  # retained: the coordinator sees what the device serves now

    def _tuning(self, version: str, epoch: int) -> None:
        """Where a personal tuning stands: a fresh one (or the first resume since a start) is
        announced in the retained status, so the fleet's view shows the device tuning; a next epoch
        goes out when no status has for `personal.report_every` seconds; resumes and pauses do not
        (the status that answers the message a pause is for carries the position)."""
        was = self.status.tuning
        announce = was is None or was.adapter != version
        onward = was is not None and not announce and epoch > was.epoch
        self.status.tuning = TuningProgress(version, epoch, self.cfg.personal.epochs)
        if announce or (onward and self.status.quiet_for() >= self.cfg.personal.report_every):
            self.status.publish()

    def poll(self, timeout: float) -> bool:
        """Handle at most one incoming message (waiting up to `timeout`) and offer unacknowledged
        updates again when due; then, with no message waiting, tune (or go on tuning) the adapter in
        use when personal tuning is on. True when a message was handled."""
        incoming = self.transport.get(timeout=timeout)
        if incoming is not None:
            # A message that breaks its handler is logged and dropped; the agent keeps serving.
            with guard(incoming, lambda msg, reason: None):
                self.inbox.handle(incoming)
        self.updates.retry_pending()
        self.status.tick()
        if not self.transport.waiting():
            self._personalize()
        return incoming is not None

    def shutdown(self) -> None:
        """Publish `offline` (best effort), close the transport, release the state dir."""
        try:
            self.status.publish_offline()
        finally:
            self.transport.close()
            self.runner.close()

    def _connect(self) -> bool:
        delay = 1.0
        while not self.stop.is_set():
            try:
                self.transport.connect(timeout=self.cfg.connect_timeout)
                return True
            except MqttError as e:
                log.error("cannot reach broker: %s; retrying in %.0fs", e, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 60.0)
        return False

    def _resume(self) -> None:
        """After a restart: republish built updates, finish the round that was in progress."""
        state = self.runner.state
        try:
            self.updates.publish_pending()
            prog = state.in_progress()
            if prog is None or self.updates.adopt_kept(prog.round):
                return
            log.info("round %d: was in progress at the last stop; resuming", prog.round)
            task = Incoming(self.topics.task(self.cfg.id), state.task_blob(prog.round), False)
            self.inbox.handle(task)
        except StateError as e:
            log.error("state dir: %s", e)
        except FedclipError as e:
            log.warning("kept update or task could not be used: %s", e)


def _install_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            return
        log.info("%s received: finishing the current step, then going offline", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def _opt(path: object) -> str | None:
    return str(path) if path is not None else None
