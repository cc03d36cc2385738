"""A round's update: building the blob (metrics, data statistics, digest, exchanged tensors) and
publishing it until the broker acknowledges it.

The blob is built once and kept in the state dir (`AgentState.store_update`); only those bytes are ever
published, so a retry, a duplicate task or a restart never yields a second, different update.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Mapping
from typing import Any

from fedclip.device_agent.batches import Trainer
from fedclip.device_agent.round_progress import RoundProgress
from fedclip.device_agent.state import AgentState
from fedclip.device_agent.statistics import data_digest, data_statistics, wire_statistics
from fedclip.device_agent.status import StatusReporter
from fedclip.sdk import messages
from fedclip.sdk.data import Dataset
from fedclip.sdk.errors import MqttError
from fedclip.sdk.messages import Task, Update
from fedclip.sdk.signing import Ed25519PrivateKey
from fedclip.sdk.transport import Transport
from fedclip.sdk.wire import MsgType, Topics, decode

log = logging.getLogger("fedclip.agent")

RETRY_PENDING_S = 15.0  # a pending update is offered again this often while it stays unacknowledged


def build_update(
    trainer: Trainer,
    train_set: Dataset,
    task: Task,
    progress: RoundProgress,
    after: dict[str, float],
    *,
    fleet: str,
    agent_id: str,
    bundle_id: str,
    key: Ed25519PrivateKey | None = None,
    extra: Mapping[str, float] | None = None,
    scoring: str = "",
) -> tuple[bytes, dict[str, Any]]:
    """(encoded update, summary kept in the state dir) for a trained round; `extra`: more metrics
    (`RoundRunner`'s fleet gain); `scoring`: what its held-out scores depend on besides the adapter
    (`RoundRunner.scoring`), kept in the summary for the next round's fleet gain."""
    before = progress.metrics_before or {}
    metrics = {f"{k}_before": v for k, v in before.items() if k != "num_samples"}
    metrics.update({f"{k}_after": v for k, v in after.items() if k != "num_samples"})
    metrics.update(extra or {})
    metrics.update({f"train_{k}": v for k, v in progress.train_metrics.items() if k.startswith("loss_")})
    metrics["steps"] = float(progress.steps_done)
    # The noise seed depends on agent and round only, so a redone round draws the same noise.
    seed = zlib.crc32(f"{agent_id}/{task.round_id}".encode())
    # The per-label means and variances are most of an update's bytes and change only with the
    # data: when the coordinator already holds them for exactly this data (the task's
    # `stats_digest`), only the label histogram (tiny) goes out, with the digest that vouches for
    # the rest. Anything else (new files, other kinds, other noise) gives a new digest: resent.
    digest = data_digest(train_set, task.stats, task.noise_std)
    kinds = task.stats
    if "gaussian" in kinds and task.stats_digest and task.stats_digest == digest:
        kinds = tuple(k for k in kinds if k != "gaussian")
        log.info("round %d: coordinator holds this data's statistics; not sending them again", task.round_id)
    stats = data_statistics(trainer, train_set, kinds=kinds, noise_std=task.noise_std, seed=seed)
    if "gaussian" in kinds:  # decoding may have found more unreadable files: name what was used
        digest = data_digest(train_set, task.stats, task.noise_std)
    skipped = train_set.skipped
    readable = sum(1 for smp in train_set.samples if smp.key not in skipped)
    update = Update(
        round_id=task.round_id,
        bundle_id=bundle_id,
        num_samples=readable,
        base_version=task.base_version,
        metrics=metrics,
        train_seconds=round(float(progress.train_seconds), 3),
        skipped_images=len(skipped),
        data_digest=digest if task.stats else "",
        adapter=dict(trainer.get_tensors("exchanged")),
        stats=wire_statistics(stats),
    )
    summary = {
        "metrics": metrics,
        "num_samples": readable,
        "train_seconds": update.train_seconds,
        "scoring": scoring,
    }
    return messages.encode(update, fleet, agent_id, key=key), summary


class UpdatePublisher:
    """Publishes the updates kept in the state dir, marks them done once acknowledged, and offers the
    unacknowledged ones again every `RETRY_PENDING_S`."""

    def __init__(
        self,
        transport: Transport,
        state: AgentState,
        status: StatusReporter,
        *,
        fleet: str,
        agent_id: str,
        publish_timeout: float,
    ) -> None:
        self.transport = transport
        self.state = state
        self.status = status
        self.fleet = fleet
        self.topic = Topics(fleet).update(agent_id)
        self.publish_timeout = publish_timeout
        self._last_retry = 0.0

    def publish(self, rnd: int) -> bool:
        """Publish round `rnd`'s kept update; False when the broker did not acknowledge it (yet)."""
        self._last_retry = time.monotonic()
        blob = self.state.update_blob(rnd)
        try:
            self.transport.publish(self.topic, blob, qos=1, timeout=self.publish_timeout)
        except MqttError as e:
            log.warning("round %d: update not acknowledged yet (%s); it will be sent again", rnd, e)
            return False
        self.state.mark_published(rnd)
        log.info("round %d: update published", rnd)
        self.status.publish()
        return True

    def publish_pending(self) -> None:
        for rnd in self.state.pending_updates():
            self.publish(rnd)

    def retry_pending(self) -> None:
        """Called from the agent loop: at most every RETRY_PENDING_S, and only while connected."""
        if time.monotonic() - self._last_retry < RETRY_PENDING_S or not self.transport.connected.is_set():
            return
        self.publish_pending()

    def adopt_kept(self, rnd: int) -> bool:
        """Killed between writing round `rnd`'s blob and recording it: those bytes are the round's
        update. Records and publishes them; False when no blob was kept."""
        if not self.state.has_update_blob(rnd):
            return False
        blob = self.state.update_blob(rnd)
        body = decode(blob, fleet=self.fleet, expect=MsgType.UPDATE, where="kept update").envelope.body
        summary = {k: body.get(k) for k in ("metrics", "num_samples", "train_seconds")}
        self.state.adopt_built_update(rnd, summary)
        self.publish(rnd)
        return True
