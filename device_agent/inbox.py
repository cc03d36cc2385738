"""What the agent does with each message it receives: a task starts (or resumes, or re-publishes) a
round; an unsigned adapter push is installed (closed test setups only); signed rollouts go to the
rollout client. Bad input is refused with one line in the log, and in the status when the coordinator
must learn why; it never raises out of `handle`.

Delivery is at least once, so every handler is idempotent: a second copy of a task whose update was
built re-publishes the same bytes; one whose update was acknowledged does nothing.
"""

from __future__ import annotations

import logging
import time

from fedclip.device_agent.config import AgentConfig
from fedclip.device_agent.policy import check_task
from fedclip.device_agent.rollout_client import RolloutClient
from fedclip.device_agent.rounds import RoundRunner
from fedclip.device_agent.state_rounds import BUILT, DONE
from fedclip.device_agent.status import StatusReporter
from fedclip.device_agent.task import WrongBundle, parse_adapter, parse_task
from fedclip.device_agent.updates import UpdatePublisher
from fedclip.sdk.errors import FedclipError, MqttError, StateError, WireError
from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.signing import verify_message
from fedclip.sdk.transport import Transport
from fedclip.sdk.wire import Envelope, Message, MsgType, Topics, decode, encode

log = logging.getLogger("fedclip.agent")


class Inbox:
    """Dispatches incoming messages to the round runner, the update publisher and the rollout client."""

    def __init__(
        self,
        cfg: AgentConfig,
        transport: Transport,
        runner: RoundRunner,
        status: StatusReporter,
        updates: UpdatePublisher,
        rollout: RolloutClient | None,
    ) -> None:
        self.cfg = cfg
        self.transport = transport
        self.topics = Topics(cfg.fleet)
        self.runner = runner
        self.status = status
        self.updates = updates
        self.rollout = rollout

    def handle(self, incoming: Incoming) -> None:
        if self.rollout is not None:
            before = self.runner.state.current_adapter
            if self.rollout.handle(incoming):
                if self.runner.state.current_adapter != before:
                    self.status.publish()  # retained: the coordinator sees the switch at once
                return
        if not incoming.payload:
            log.debug("%s: retained message cleared; nothing to do", incoming.topic)
            return
        kind = incoming.topic.rsplit("/", 1)[-1]
        try:
            if kind == "task":
                self.status.tasked()
                self._on_task(incoming.payload, where=f"task on {incoming.topic}")
            elif kind == "adapter" and self.cfg.accept_unsigned_adapters:
                self._on_adapter(incoming.payload, where=f"adapter on {incoming.topic}")
            else:
                log.warning("%s: unexpected topic, dropped", incoming.topic)
        except WrongBundle as e:
            self.status.refuse(str(e))
        except StateError as e:
            log.error("state dir: %s; the round is not published (a re-sent task retries it)", e)
            self.status.notice = f"state dir error: {e}"
            self.status.publish()
        except FedclipError as e:
            log.warning("dropped: %s", e)

    def _decode(self, payload: bytes, expect: MsgType, where: str) -> Message:
        return decode(
            payload, fleet=self.cfg.fleet, expect=expect, max_bytes=self.cfg.max_payload_bytes, where=where
        )

    def _on_task(self, payload: bytes, where: str) -> None:
        state = self.runner.state
        msg = self._decode(payload, MsgType.TASK, where)
        coordinator = self.cfg.coordinator_public_key()
        if coordinator is not None:  # with the coordinator's key, only tasks it signed are run
            try:
                verify_message(coordinator, msg, where)
            except WireError as e:
                # A forged task, or a coordinator whose key was rotated (or revoked): either way it is
                # not run, and the status tells the operator, who installs the new public key if so.
                self.status.refuse(f"{e} (a rotated coordinator key needs its new public key here)")
                return
        rnd = msg.envelope.round
        status = state.round_status(rnd)
        if status == DONE:
            log.info("round %d: duplicate task ignored (update already published)", rnd)
            return
        if status == BUILT:
            self.updates.publish(rnd)
            return
        if rnd < state.last_round:
            log.info("round %d: stale task ignored (round %d is newer)", rnd, state.last_round)
            return
        task = parse_task(msg, self.runner.manifest, self.cfg.id, where)
        if task.deadline and time.time() > task.deadline:
            log.info("round %d: deadline passed before the round could start; ignored", rnd)
            return
        try:  # the device's own limits, whoever signed the task
            check_task(
                task,
                self.cfg.policy,
                last_round=state.last_round,
                batches_per_epoch=self.runner.batches_per_epoch(task.hyperparameters.batch_size),
                now=time.time(),
                where=where,
            )
        except WireError as e:
            self.status.refuse(str(e))
            return
        prog = state.in_progress()
        try:
            built = self.runner.run(task, payload, resume=prog if prog and prog.round == rnd else None)
        except Exception:
            self.runner.reload_trainer()
            raise
        if built:
            self.status.notice = ""
            self.updates.publish(rnd)

    def _on_adapter(self, payload: bytes, where: str) -> None:
        msg = self._decode(payload, MsgType.ADAPTER, where)
        env = msg.envelope
        version, tensors = parse_adapter(msg, self.runner.manifest, self.cfg.id, where)
        self.runner.install(
            version,
            tensors,
            source="adapter",
            rnd=env.round,
            parent=str(env.body.get("parent_version", "")),
            strategy=str(env.body.get("strategy", "")),
        )
        ack = Envelope(
            MsgType.ACK,
            self.cfg.fleet,
            self.cfg.id,
            round=env.round,
            base_version=version,
            body={"adapter_version": version, "installed": True},
        )
        try:
            self.transport.publish(
                self.topics.ack(self.cfg.id), encode(ack), qos=1, timeout=self.cfg.publish_timeout
            )
        except MqttError as e:
            log.warning("adapter %s: ack not acknowledged (%s)", version, e)
        self.status.publish()
