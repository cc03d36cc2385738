"""The `fedclip-agent start` loop: one agent's life in the fleet.

Everything happens on the main thread: MQTT callbacks only enqueue (`MqttSession.get`), and the
on-connect hook only re-publishes the retained status from a snapshot the main thread keeps. A round:

    task -> validate -> begin (task kept in the state dir) -> install starting adapter -> eval before
         -> epochs (checkpoint after each) -> eval after -> statistics -> update blob kept -> publish
         -> round marked done

A restart picks up from the state dir (see `device_agent.state`): a built update is republished byte
for byte, an interrupted round resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import logging
import platform
import signal
import threading
import time
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fedclip.device_agent.config import AgentConfig
from fedclip.device_agent.state import AgentState, RoundProgress
from fedclip.device_agent.task import RoundTask, WrongBundle, parse_adapter, parse_task
from fedclip.sdk.adapters import AdapterMeta, check_adapter, load_adapter
from fedclip.sdk.errors import DataError, FedclipError, MqttError, StateError
from fedclip.sdk.ids import ID_PATTERN
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.mqtt import Incoming, MqttSession, Will
from fedclip.sdk.wire import Envelope, Message, MsgType, Topics, decode, encode

log = logging.getLogger("fedclip.agent")

_RETRY_PENDING_S = 15.0  # a pending update is offered again this often while it stays unacknowledged


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "fedclip",
        "onnxruntime-training",
        "onnxruntime-training-cpu",
        "onnxruntime",
        "onnxruntime-gpu",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


class Agent:
    def __init__(self, cfg: AgentConfig):
        from fedclip.device_agent.batches import batch_source
        from fedclip.sdk.data import Dataset

        self.cfg = cfg
        self.stop = threading.Event()
        self._install_signals()  # early, so a SIGTERM while loading still ends in a clean exit 0
        self.topics = Topics(cfg.fleet)
        self.bundle_dir = self._bundle_dir()
        # Refuses a bundle whose hashes do not match its manifest.
        self.manifest: Manifest = Manifest.load(self.bundle_dir)
        data = Dataset.open(cfg.data, labels=self.manifest.task.labels, kind=self.manifest.task.kind)
        self.train_set, self.held_out = data.split(cfg.holdout)
        if not len(self.train_set) or not len(self.held_out):
            raise DataError(f"{cfg.data}: too few images to keep a held-out split of {cfg.holdout:g}")
        self.state = AgentState(
            cfg.state, agent_id=cfg.id, fleet=cfg.fleet, bundle_id=self.manifest.bundle_id
        )
        self.trainer = self._load_trainer()
        # Built once: for text-tower bundles this embeds the images (cached in the state dir).
        cache = cfg.state / "embeddings"
        self.train_source = batch_source(self.trainer, self.train_set, cache_dir=cache)
        self.eval_source = batch_source(self.trainer, self.held_out, cache_dir=cache)
        self.notice = ""  # why the last task was refused; goes out with the status
        self._status: bytes = b""
        self._last_retry = 0.0
        self.session = MqttSession(
            cfg.broker,
            cfg.id,
            username=cfg.username,
            password=cfg.secret(),
            ca_file=_opt(cfg.ca_file),
            cert_file=_opt(cfg.cert_file),
            key_file=_opt(cfg.key_file),
            clean_session=False,
            keepalive=cfg.keepalive,
            will=Will(self.topics.status(cfg.id), self._status_blob("offline"), qos=1, retain=True),
        )
        self.session.on_connect.append(self._on_connect)
        self.rollout = self._rollout_client() if cfg.coordinator_key is not None else None
        self._refresh_status()
        log.info(
            "agent %s of fleet %s: bundle %s, %d training / %d held-out images, state %s",
            cfg.id,
            cfg.fleet,
            self.manifest.bundle_id[:12],
            len(self.train_set),
            len(self.held_out),
            cfg.state,
        )

    def _bundle_dir(self) -> Path:
        """The bundle folder; a URL is downloaded into the state dir first (resumed, every sha256
        checked, a mismatch refused) and reused on the next start."""
        url = self.cfg.bundle_url
        if url is None:
            return Path(self.cfg.bundle)
        from fedclip.sdk.fetch import fetch_bundle

        log.info("fetching bundle %s", url)
        return fetch_bundle(url, self.cfg.state / "bundles", progress=self.cfg.progress)

    def _load_trainer(self):
        """A trainer as it stood at the end of the last completed round (local tensors, optimizer)."""
        from fedclip.device_agent.step_backend import make_trainer

        trainer = make_trainer(
            self.bundle_dir,
            backend=self.cfg.backend,
            device=self.cfg.device,
            threads=self.cfg.threads or None,
            verify=False,  # verified by Manifest.load above
        )
        ckpt = self.state.trainer_checkpoint()
        if ckpt is not None:
            try:
                trainer.load_checkpoint(ckpt)
            except FedclipError as e:
                log.warning("last round's trainer checkpoint unusable (%s); starting from the bundle's", e)
        return trainer

    def _rollout_client(self):
        """Signed rollouts (`device_agent.rollout_client`) own the adapter topic when a key is configured."""
        from fedclip.device_agent.rollout_client import RolloutClient

        return RolloutClient(
            self.session,
            self.topics,
            self.cfg.id,
            self.cfg.state,
            self.cfg.coordinator_key,
            self._evaluate_adapter,
            bundle_id=self.manifest.bundle_id,
            check_fn=lambda tensors, where: check_adapter(tensors, self.manifest, where),
            on_change=self._on_rollout_change,
            baseline_fn=self._baseline_adapter,
            max_payload=self.cfg.max_payload_bytes,
            publish_timeout=self.cfg.publish_timeout,
        )

    def _evaluate_adapter(self, exchanged: dict[str, np.ndarray] | None) -> dict[str, float]:
        """Held-out metrics of an adapter (None: the current one); the trainer is left as it was."""
        from fedclip.device_agent.loops import evaluate

        saved = self.trainer.get_tensors("trainable")
        try:
            if exchanged is None and self.state.current_adapter_path() is not None:
                self.trainer.load_adapter(self.state.current_adapter_path())
            elif exchanged is not None:
                self.trainer.set_tensors(exchanged)
            return _floats(evaluate(self.trainer, self.eval_source, batch_size=self.cfg.eval_batch_size))
        finally:
            self.trainer.set_tensors(saved)

    def _baseline_adapter(self) -> tuple[str, dict[str, np.ndarray]] | None:
        """The adapter inference used before the first rollout, so rolling that rollout back returns
        to it; None when inference ran on the bundle's own adapter."""
        path = self.state.current_adapter_path()
        if path is None or not path.is_file():
            return None
        tensors, _ = load_adapter(path)
        names = {spec.name for spec in self.manifest.exchanged}
        return self.state.current_adapter, {k: v for k, v in tensors.items() if k in names}

    def _on_rollout_change(self, version: str | None, exchanged: dict[str, np.ndarray] | None) -> None:
        try:
            if version is not None and exchanged is not None:
                self._install(version, dict(exchanged), source="rollout", rnd=-1)
            elif self.state.current_source() == "rollout":
                # The first rollout was rolled back and there was no adapter before it: inference goes
                # back to the bundle's own; an adapter installed since by a round stays.
                self.state.set_current_adapter(None)
                log.info("rollout rolled back; inference is on the bundle's own adapter again")
        except FedclipError as e:
            log.error("rollout adapter %s not recorded in the state dir: %s", version, e)
        self._publish_status()  # retained, so the coordinator sees the switch without a reconnect

    # ---- lifecycle -------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; then publish `offline` and return 0."""
        try:
            if not self._connect():
                return 0
            self.session.subscribe(self.topics.task(self.cfg.id), qos=1)
            if self.rollout is not None:
                self.rollout.subscribe()  # signed adapters, rollback and pin commands
            elif self.cfg.accept_unsigned_adapters:
                log.warning(
                    "accepting unsigned adapters on %s (closed test setups only)",
                    self.topics.adapter(self.cfg.id),
                )
                self.session.subscribe(self.topics.adapter(self.cfg.id), qos=1)
            else:
                # Unsigned pushes would let anyone who can publish on the broker replace the model.
                log.info("no coordinator_key: adapter rollouts are ignored until one is configured")
            self._resume()
            while not self.stop.is_set():
                incoming = self.session.get(timeout=0.5)
                if incoming is not None:
                    self._handle(incoming)
                self._retry_pending()
            return 0
        finally:
            self._shutdown()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            return
        log.info("%s received: finishing the current step, then going offline", signal.Signals(signum).name)
        self.stop.set()

    def _connect(self) -> bool:
        delay = 1.0
        while not self.stop.is_set():
            try:
                self.session.connect(timeout=self.cfg.connect_timeout)
                return True
            except MqttError as e:
                log.error("cannot reach broker: %s; retrying in %.0fs", e, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 60.0)
        return False

    def _shutdown(self) -> None:
        try:
            if self.session.connected.is_set():
                self.session.publish(
                    self.topics.status(self.cfg.id),
                    self._status_blob("offline"),
                    qos=1,
                    retain=True,
                    timeout=5,
                )
                log.info("offline status published")
        except MqttError as e:
            log.warning("offline status not acknowledged (%s); the broker's last will covers it", e)
        finally:
            self.session.close()
            self.state.close()

    # ---- status ----------------------------------------------------------------------------------
    def _status_blob(self, state: str) -> bytes:
        body = {
            "state": state,
            "bundle_id": self.manifest.bundle_id,
            "adapter_version": self.state.current_adapter or "",
            "last_round": self.state.last_round,
            "versions": _versions(),
            "device": {
                "kind": self.cfg.device,
                "machine": platform.machine(),
                "system": platform.system(),
                "release": platform.release(),
                "threads": self.cfg.threads,
            },
            "groups": list(self.cfg.groups),
            "num_samples": len(self.train_set),
        }
        if self.notice:
            body["notice"] = self.notice
        env = Envelope(
            MsgType.STATUS,
            self.cfg.fleet,
            self.cfg.id,
            round=self.state.last_round,
            base_version=self.state.current_adapter or "",
            body=body,
        )
        return encode(env)

    def _refresh_status(self) -> None:
        # The hook thread reads this one bytes object; it never touches the state record itself.
        self._status = self._status_blob("online")

    def _publish_status(self) -> None:
        self._refresh_status()
        try:
            self.session.publish(
                self.topics.status(self.cfg.id), self._status, qos=1, retain=True, timeout=10
            )
        except MqttError as e:
            log.warning("status not acknowledged (%s); it goes out again on reconnect", e)

    def _on_connect(self, session: MqttSession) -> None:
        """Runs on the session's hook thread after every (re)connect."""
        try:
            session.publish(self.topics.status(self.cfg.id), self._status, qos=1, retain=True, timeout=10)
        except MqttError as e:
            log.warning("online status not acknowledged (%s)", e)

    # ---- messages --------------------------------------------------------------------------------
    def _handle(self, incoming: Incoming) -> None:
        if self.rollout is not None and self.rollout.handle(incoming):
            return
        if not incoming.payload:
            log.debug("%s: retained message cleared; nothing to do", incoming.topic)
            return
        kind = incoming.topic.rsplit("/", 1)[-1]
        try:
            if kind == "task":
                self._on_task(incoming.payload, where=f"task on {incoming.topic}")
            elif kind == "adapter" and self.cfg.accept_unsigned_adapters:
                self._on_adapter(incoming.payload, where=f"adapter on {incoming.topic}")
            else:
                log.warning("%s: unexpected topic, dropped", incoming.topic)
        except WrongBundle as e:
            self._refuse(str(e))
        except StateError as e:
            log.error("state dir: %s; the round is not published (a re-sent task retries it)", e)
            self.notice = f"state dir error: {e}"
            self._publish_status()
        except FedclipError as e:
            log.warning("dropped: %s", e)

    def _refuse(self, why: str) -> None:
        log.warning("refused: %s", why)
        self.notice = f"refused: {why}"
        self._publish_status()

    def _decode(self, payload: bytes, expect: MsgType, where: str) -> Message:
        return decode(
            payload, fleet=self.cfg.fleet, expect=expect, max_bytes=self.cfg.max_payload_bytes, where=where
        )

    def _on_task(self, payload: bytes, where: str) -> None:
        msg = self._decode(payload, MsgType.TASK, where)
        rnd = msg.envelope.round
        status = self.state.round_status(rnd)
        if status == "done":
            log.info("round %d: duplicate task ignored (update already published)", rnd)
            return
        if status == "built":
            self._publish_update(rnd)
            return
        if rnd < self.state.last_round:
            log.info("round %d: stale task ignored (round %d is newer)", rnd, self.state.last_round)
            return
        task = parse_task(msg, self.manifest, self.cfg.id, where)
        if task.deadline and time.time() > task.deadline:
            log.info("round %d: deadline passed before the round could start; ignored", rnd)
            return
        prog = self.state.in_progress()
        try:
            self._run_round(task, payload, resume=prog if prog and prog.round == rnd else None)
        except Exception:
            # Half a round leaves the trainer mid-way; the next round must start from the last good state.
            self.trainer = self._load_trainer()
            raise

    def _on_adapter(self, payload: bytes, where: str) -> None:
        msg = self._decode(payload, MsgType.ADAPTER, where)
        env = msg.envelope
        version, tensors = parse_adapter(msg, self.manifest, self.cfg.id, where)
        self._install(
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
            self.session.publish(
                self.topics.ack(self.cfg.id), encode(ack), qos=1, timeout=self.cfg.publish_timeout
            )
        except MqttError as e:
            log.warning("adapter %s: ack not acknowledged (%s)", version, e)
        self._publish_status()

    def _install(
        self,
        version: str,
        exchanged: dict[str, np.ndarray],
        *,
        source: str,
        rnd: int,
        parent: str = "",
        strategy: str = "",
    ) -> None:
        """Keep an adapter for inference: the exchanged tensors on top of this device's own ones."""
        tensors = dict(self.trainer.get_tensors("trainable"))
        tensors.update(exchanged)
        meta = AdapterMeta(
            bundle_id=self.manifest.bundle_id,
            version=version,
            parent_version=parent,
            round=rnd,
            strategy=strategy,
            kind=self.manifest.adapter.kind,
            agent=self.cfg.id,
        )
        path = self.state.install_adapter(version, tensors, meta, source=source, rnd=rnd)
        log.info("adapter %s installed for inference (%s)", version, path)

    # ---- rounds ----------------------------------------------------------------------------------
    def _run_round(self, task: RoundTask, payload: bytes, resume: RoundProgress | None) -> None:
        from fedclip.device_agent.loops import evaluate

        rnd = task.round
        ckpt = self.state.checkpoint_path(resume) if resume else None
        if ckpt is not None:
            try:
                self.trainer.load_checkpoint(ckpt)
            except FedclipError as e:
                log.warning("round %d: checkpoint unusable (%s); redoing the round", rnd, e)
                ckpt = None
        if resume is not None and ckpt is not None:
            prog = resume
            log.info("round %d: resuming after epoch %d of %d", rnd, prog.epochs_done, task.epochs)
        else:
            prog = self.state.begin_round(rnd, payload)
            if task.adapter:
                self.trainer.set_tensors(task.adapter)
            if task.reset_optimizer:
                self.trainer.reset_optimizer()
            if task.adapter and ID_PATTERN.match(task.base_version or ""):
                self._install(task.base_version, task.adapter, source="task", rnd=rnd)
            log.info(
                "round %d: started (%d epochs, lr %g, batch %d)", rnd, task.epochs, task.lr, task.batch_size
            )
        if prog.metrics_before is None:
            before = evaluate(self.trainer, self.eval_source, batch_size=self.cfg.eval_batch_size)
            self.state.save_progress(rnd, metrics_before=_floats(before))
        if not self._train(task, self._progress(rnd)):
            return  # stopping: the epoch checkpoint in the state dir lets the next start resume
        prog = self._progress(rnd)
        after = evaluate(self.trainer, self.eval_source, batch_size=self.cfg.eval_batch_size)
        blob, summary = self._build_update(task, prog, _floats(after))
        self.state.store_update(rnd, blob, summary, save_trainer_checkpoint=self.trainer.save_checkpoint)
        self.notice = ""
        log.info(
            "round %d: update built (%d bytes, accuracy %.3f -> %.3f)",
            rnd,
            len(blob),
            summary["metrics"].get("accuracy_before", float("nan")),
            summary["metrics"].get("accuracy_after", float("nan")),
        )
        self._publish_update(rnd)

    def _progress(self, rnd: int) -> RoundProgress:
        prog = self.state.in_progress()
        if prog is None or prog.round != rnd:
            raise StateError(f"round {rnd} is not in progress")
        return prog

    def _train(self, task: RoundTask, prog: RoundProgress) -> bool:
        """Train the remaining epochs, checkpointing after each; False when stopped midway."""
        from fedclip.device_agent.loops import train_local

        rnd = task.round
        seed = zlib.crc32(f"{self.cfg.id}/{rnd}/shuffle".encode())
        steps_done, seconds, last = prog.steps_done, prog.train_seconds, prog.train_metrics
        for epoch in range(prog.epochs_done, task.epochs):
            left = None if task.max_steps is None else task.max_steps - steps_done
            if left is not None and left <= 0:
                break
            start = time.monotonic()
            try:
                last = train_local(
                    self.trainer,
                    self.train_source,
                    epochs=1,
                    batch_size=task.batch_size,
                    lr=task.lr,
                    max_steps=left,
                    progress=self.cfg.progress,
                    should_stop=self.stop.is_set,
                    seed=seed + epoch,
                )
            except DataError:
                if not self.stop.is_set():  # stopped before the first step reads as "nothing trained"
                    raise
            if self.stop.is_set():
                log.info(
                    "round %d: stopped in epoch %d; the next start resumes after epoch %d",
                    rnd,
                    epoch + 1,
                    epoch,
                )
                return False
            steps_done += int(last["steps"])
            seconds += time.monotonic() - start
            self.state.save_progress(
                rnd,
                save_checkpoint=self.trainer.save_checkpoint,
                epochs_done=epoch + 1,
                steps_done=steps_done,
                train_seconds=seconds,
                train_metrics=_floats(last),
            )
            log.info("round %d: epoch %d/%d done (%d steps)", rnd, epoch + 1, task.epochs, steps_done)
        return True

    def _build_update(
        self, task: RoundTask, prog: RoundProgress, after: dict[str, float]
    ) -> tuple[bytes, dict]:
        from fedclip.device_agent.statistics import data_digest, data_statistics, wire_statistics

        before = prog.metrics_before or {}
        metrics = {f"{k}_before": v for k, v in before.items() if k != "num_samples"}
        metrics.update({f"{k}_after": v for k, v in after.items() if k != "num_samples"})
        metrics.update({f"train_{k}": v for k, v in prog.train_metrics.items() if k.startswith("loss_")})
        metrics["steps"] = float(prog.steps_done)
        # The noise seed depends on agent and round only, so a redone round draws the same noise.
        seed = zlib.crc32(f"{self.cfg.id}/{task.round}".encode())
        # The per-label means and variances are most of an update's bytes and change only with the
        # data: when the coordinator already holds them for exactly this data (the task's
        # `stats_digest`), only the label histogram (tiny) goes out, with the digest that vouches for
        # the rest. Anything else (new files, other kinds, other noise) gives a new digest: resent.
        digest = data_digest(self.train_set, task.stats, task.noise_std)
        kinds = task.stats
        if "gaussian" in kinds and task.stats_digest and task.stats_digest == digest:
            kinds = tuple(k for k in kinds if k != "gaussian")
            log.info("round %d: coordinator holds this data's statistics; not sending them again", task.round)
        stats = data_statistics(
            self.trainer, self.train_set, kinds=kinds, noise_std=task.noise_std, seed=seed
        )
        if "gaussian" in kinds:  # decoding may have found more unreadable files: name what was used
            digest = data_digest(self.train_set, task.stats, task.noise_std)
        tensors = dict(self.trainer.get_tensors("exchanged"))
        tensors.update(wire_statistics(stats))
        skipped = self.train_set.skipped
        readable = sum(1 for smp in self.train_set.samples if smp.key not in skipped)
        body = {
            "bundle_id": self.manifest.bundle_id,
            "num_samples": readable,
            "metrics": metrics,
            "train_seconds": round(float(prog.train_seconds), 3),
            "skipped_images": len(skipped),
        }
        if task.stats:
            body["data_digest"] = digest
        env = Envelope(
            MsgType.UPDATE,
            self.cfg.fleet,
            self.cfg.id,
            round=task.round,
            base_version=task.base_version,
            body=body,
        )
        summary = {
            "metrics": metrics,
            "num_samples": readable,
            "train_seconds": body["train_seconds"],
        }
        return encode(env, tensors), summary

    def _publish_update(self, rnd: int) -> bool:
        self._last_retry = time.monotonic()
        blob = self.state.update_blob(rnd)
        try:
            self.session.publish(
                self.topics.update(self.cfg.id), blob, qos=1, timeout=self.cfg.publish_timeout
            )
        except MqttError as e:
            log.warning("round %d: update not acknowledged yet (%s); it will be sent again", rnd, e)
            return False
        self.state.mark_published(rnd)
        log.info("round %d: update published", rnd)
        self._publish_status()
        return True

    def _retry_pending(self) -> None:
        if time.monotonic() - self._last_retry < _RETRY_PENDING_S or not self.session.connected.is_set():
            return
        for rnd in self.state.pending_updates():
            self._publish_update(rnd)

    def _resume(self) -> None:
        """After a restart: republish built updates, finish the round that was in progress."""
        try:
            for rnd in self.state.pending_updates():
                self._publish_update(rnd)
            prog = self.state.in_progress()
            if prog is None:
                return
            rnd = prog.round
            if self.state.has_update_blob(rnd):
                # Killed between writing the blob and recording it: those bytes are the round's update.
                blob = self.state.update_blob(rnd)
                body = decode(
                    blob, fleet=self.cfg.fleet, expect=MsgType.UPDATE, where="kept update"
                ).envelope.body
                self.state.adopt_built_update(
                    rnd, {k: body.get(k) for k in ("metrics", "num_samples", "train_seconds")}
                )
                self._publish_update(rnd)
                return
            log.info("round %d: was in progress at the last stop; resuming", rnd)
            self._handle(Incoming(self.topics.task(self.cfg.id), self.state.task_blob(rnd), False))
        except StateError as e:
            log.error("state dir: %s", e)
        except FedclipError as e:
            log.warning("kept update or task could not be used: %s", e)


def _opt(path: Any) -> str | None:
    return str(path) if path is not None else None


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float, np.number))}
