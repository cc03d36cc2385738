"""The device side of a round: the bundle, the local data, the trainer and the state dir, and running
one accepted task from its starting adapter to a kept update.

    begin (task kept in the state dir) -> install starting adapter -> eval before
         -> epochs (checkpoint after each) -> eval after -> statistics -> update blob kept

Nothing here talks to the broker: the agent (`device_agent.agent`) publishes what a round produced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedclip.device_agent.batches import BatchSource, Trainer, batch_source
from fedclip.device_agent.config import AgentConfig
from fedclip.device_agent.loops import evaluate, train_local
from fedclip.device_agent.round_progress import RoundProgress
from fedclip.device_agent.state import AgentState
from fedclip.device_agent.statistics import data_digest
from fedclip.device_agent.updates import build_update
from fedclip.sdk import label_prior
from fedclip.sdk.adapters import AdapterMeta
from fedclip.sdk.data import Dataset
from fedclip.sdk.errors import DataError, FedclipError, StateError
from fedclip.sdk.ids import ID_PATTERN
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.messages import FLEET_GAIN, Task

log = logging.getLogger("fedclip.agent")


class RoundRunner:
    """One agent's bundle, data split, trainer and state dir (held under its lock until `close`)."""

    def __init__(
        self,
        cfg: AgentConfig,
        bundle_dir: Path,
        manifest: Manifest,
        train_set: Dataset,
        held_out: Dataset,
        state: AgentState,
        stop: threading.Event,
    ) -> None:
        self.cfg = cfg
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.train_set = train_set
        self.held_out = held_out
        self.state = state
        self.stop = stop  # set: finish the current step, keep the epoch checkpoint, return
        self.trainer = self._load_trainer()
        # Built once: for text-tower bundles this embeds the images (cached in the state dir).
        cache = cfg.state / "embeddings"
        self.train_source: BatchSource = batch_source(self.trainer, train_set, cache_dir=cache)
        self.eval_source: BatchSource = batch_source(self.trainer, held_out, cache_dir=cache)

    @classmethod
    def open(cls, cfg: AgentConfig, stop: threading.Event) -> RoundRunner:
        """Bundle (downloaded first when `cfg.bundle` is a URL; hashes checked), data split, state dir."""
        bundle_dir = _bundle_dir(cfg)
        manifest = Manifest.load(bundle_dir)  # refuses a bundle whose hashes do not match its manifest
        data = Dataset.open(cfg.data, labels=manifest.task.labels, kind=manifest.task.kind)
        train_set, held_out = data.split(cfg.holdout)
        if not len(train_set) or not len(held_out):
            raise DataError(f"{cfg.data}: too few images to keep a held-out split of {cfg.holdout:g}")
        state = AgentState(cfg.state, agent_id=cfg.id, fleet=cfg.fleet, bundle_id=manifest.bundle_id)
        try:
            return cls(cfg, bundle_dir, manifest, train_set, held_out, state, stop)
        except BaseException:
            state.close()
            raise

    def close(self) -> None:
        self.state.close()

    def _load_trainer(self) -> Trainer:
        """A trainer as it stood at the end of the last completed round (local tensors, optimizer)."""
        from fedclip.device_agent.step_backend import make_trainer

        trainer = make_trainer(
            self.bundle_dir,
            backend=self.cfg.training_backend,
            device=self.cfg.device,
            threads=self.cfg.threads or None,
            verify=False,  # verified by Manifest.load
        )
        ckpt = self.state.trainer_checkpoint()
        if ckpt is not None:
            try:
                trainer.load_checkpoint(ckpt)
            except FedclipError as e:
                log.warning("last round's trainer checkpoint unusable (%s); starting from the bundle's", e)
        return trainer

    def reload_trainer(self) -> None:
        """After a failed round: half a round leaves the trainer mid-way; the next must start from
        the last good state."""
        self.trainer = self._load_trainer()

    # ---- adapters --------------------------------------------------------------------------------
    def evaluate_adapter(self, exchanged: Mapping[str, np.ndarray] | None) -> dict[str, float]:
        """Held-out metrics of an adapter (None: the current one); the trainer is left as it was."""
        saved = self.trainer.get_tensors("trainable")
        try:
            current = self.state.current_adapter_path()
            if exchanged is None and current is not None:
                self.trainer.load_adapter(current)
            elif exchanged is not None:
                self.trainer.set_tensors(dict(exchanged))
            return _floats(self._evaluate())
        finally:
            self.trainer.set_tensors(saved)

    def _evaluate(self) -> dict[str, float]:
        """Held-out metrics of the trainer's adapter as this device's inference would score it: with
        its label prior added when the fleet trains balanced softmax (`sdk.label_prior`)."""
        bias = label_prior.inference_bias(
            self.state.label_prior(), len(self.manifest.task.labels), 1.0, str(self.cfg.state)
        )
        return evaluate(self.trainer, self.eval_source, batch_size=self.cfg.eval_batch_size, logit_bias=bias)

    def scoring(self, task: Task) -> str:
        """sha256 of what this round's held-out scores depend on besides the adapter: the held-out
        files (`data_digest`: key, size, label), the task's loss and the label prior balanced softmax
        scores with. Two rounds' scores compare (the fleet gain) only where it is the same."""
        h = hashlib.sha256(data_digest(self.held_out, (), 0.0).encode())
        h.update(json.dumps({"loss": task.hyperparameters.loss, "prior": self.state.label_prior()}).encode())
        return h.hexdigest()

    def _use_loss(self, task: Task) -> None:
        """Train with the task's loss: under balanced softmax every batch carries the log prior of
        this device's training split, and the state dir records the histogram so that the adapters
        kept from now on carry it to inference. The labels stay on the device."""
        counts: tuple[float, ...] = ()
        bias = None
        if task.hyperparameters.loss == "balanced-softmax":
            counts, bias = label_prior.training_prior(self.train_set)
        self.train_source.label_bias = self.eval_source.label_bias = bias
        self.state.set_label_prior(counts)

    def full_adapter(self, exchanged: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The adapter a device keeps for exchanged tensors: they replace their part of its own."""
        tensors = dict(self.trainer.get_tensors("trainable"))
        tensors.update(exchanged)
        return tensors

    def install(
        self,
        version: str,
        exchanged: Mapping[str, np.ndarray],
        *,
        source: str,
        rnd: int,
        parent: str = "",
        strategy: str = "",
        use: bool = True,
        rollout: int = 0,
    ) -> None:
        """Keep an adapter (the exchanged tensors on top of this device's own ones) in the ledger and,
        with `use`, for inference."""
        tensors = self.full_adapter(exchanged)
        meta = AdapterMeta(
            bundle_id=self.manifest.bundle_id,
            version=version,
            parent_version=parent,
            round=rnd,
            strategy=strategy,
            kind=self.manifest.adapter.kind,
            agent=self.cfg.id,
        )
        path = self.state.install_adapter(
            version, tensors, meta, source=source, rnd=rnd, use=use, rollout=rollout
        )
        log.info("adapter %s kept%s (%s)", version, " and used for inference" if use else "", path)

    # ---- rounds ----------------------------------------------------------------------------------
    def batches_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps one epoch over the local training set takes (the task policy counts them)."""
        return -(-len(self.train_set) // max(1, batch_size))

    def run(self, task: Task, payload: bytes, resume: RoundProgress | None) -> bool:
        """Train round `task.round` (from `resume`'s epoch checkpoint when it has one) and keep its
        update in the state dir; False when stopped midway (the next start resumes)."""
        rnd = task.round_id
        self._use_loss(task)
        ckpt = self.state.checkpoint_path(resume) if resume is not None else None
        if ckpt is not None:
            try:
                self.trainer.load_checkpoint(ckpt)
            except FedclipError as e:
                log.warning("round %d: checkpoint unusable (%s); redoing the round", rnd, e)
                ckpt = None
        if resume is not None and ckpt is not None:
            prog = resume
            log.info(
                "round %d: resuming after epoch %d of %d", rnd, prog.epochs_done, task.hyperparameters.epochs
            )
        else:
            prog = self._begin(task, payload)
        if prog.metrics_before is None:
            before = self._evaluate()
            self.state.save_progress(rnd, metrics_before=_floats(before))
        if not self._train(task, self._progress(rnd)):
            return False  # stopping: the epoch checkpoint in the state dir lets the next start resume
        prog = self._progress(rnd)
        # A statistics-only task (epochs 0, a newcomer's first) trained nothing: the adapter is the
        # one just scored, so its score is not computed twice.
        after = self._evaluate() if task.hyperparameters.epochs else dict(prog.metrics_before or {})
        scoring = self.scoring(task)
        blob, summary = build_update(
            self.trainer,
            self.train_set,
            task,
            prog,
            _floats(after),
            fleet=self.cfg.fleet,
            agent_id=self.cfg.id,
            bundle_id=self.manifest.bundle_id,
            key=self.cfg.signing_key(),
            extra=fleet_gain(task, prog.metrics_before or {}, self.state.last_trained_summary(rnd), scoring),
            scoring=scoring,
        )
        self.state.store_update(rnd, blob, summary, save_trainer_checkpoint=self.trainer.save_checkpoint)
        log.info(
            "round %d: update built (%d bytes, accuracy %.3f -> %.3f)",
            rnd,
            len(blob),
            summary["metrics"].get("accuracy_before", float("nan")),
            summary["metrics"].get("accuracy_after", float("nan")),
        )
        return True

    def _begin(self, task: Task, payload: bytes) -> RoundProgress:
        prog = self.state.begin_round(task.round_id, payload)
        if task.adapter:
            self.trainer.set_tensors(task.adapter)
        if task.reset_optimizer:
            self.trainer.reset_optimizer()
        # The task's starting adapter goes into the ledger for the record, never to inference: what
        # a device answers changes by signed rollouts alone, whoever can publish a task.
        if task.adapter and ID_PATTERN.match(task.base_version or ""):
            self.install(task.base_version, task.adapter, source="task", rnd=task.round_id, use=False)
        if not task.hyperparameters.epochs:
            log.info("round %d: statistics only (a newcomer's first task): no training", task.round_id)
        log.info(
            "round %d: started (%d epochs, lr %g, batch %d)",
            task.round_id,
            task.hyperparameters.epochs,
            task.hyperparameters.lr,
            task.hyperparameters.batch_size,
        )
        return prog

    def _progress(self, rnd: int) -> RoundProgress:
        prog = self.state.in_progress()
        if prog is None or prog.round != rnd:
            raise StateError(f"round {rnd} is not in progress")
        return prog

    def _train(self, task: Task, prog: RoundProgress) -> bool:
        """Train the remaining epochs, checkpointing after each; False when stopped midway."""
        rnd = task.round_id
        seed = zlib.crc32(f"{self.cfg.id}/{rnd}/shuffle".encode())
        steps_done, seconds, last = prog.steps_done, prog.train_seconds, prog.train_metrics
        for epoch in range(prog.epochs_done, task.hyperparameters.epochs):
            left = (
                None
                if task.hyperparameters.max_steps is None
                else task.hyperparameters.max_steps - steps_done
            )
            if left is not None and left <= 0:
                break
            start = time.monotonic()
            try:
                last = train_local(
                    self.trainer,
                    self.train_source,
                    epochs=1,
                    batch_size=task.hyperparameters.batch_size,
                    lr=task.hyperparameters.lr,
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
            log.info(
                "round %d: epoch %d/%d done (%d steps)",
                rnd,
                epoch + 1,
                task.hyperparameters.epochs,
                steps_done,
            )
        return True


def fleet_gain(
    task: Task, before: Mapping[str, float], last: Mapping[str, Any] | None, scoring: str
) -> dict[str, float]:
    """`FLEET_GAIN` (sdk.messages): the held-out accuracy `before` training of the adapter the fleet
    sent with `task`, minus that after training of the adapter this device trained in its last
    trained round (`last`, its kept summary). Only where the two compare: the task carries an adapter
    and both rounds scored under the same `scoring` (`RoundRunner.scoring`: the same held-out files,
    loss and label prior); else nothing. Never raises: a round's update must not fail on it."""
    if not task.adapter or not scoring or last is None or last.get("scoring") != scoring:
        return {}
    kept = last.get("metrics")
    previous = kept.get("accuracy_after") if isinstance(kept, Mapping) else None
    now = before.get("accuracy")
    if not (isinstance(now, (int, float)) and isinstance(previous, (int, float))):
        return {}
    gain = float(now) - float(previous)
    return {FLEET_GAIN: gain} if math.isfinite(gain) else {}


def _bundle_dir(cfg: AgentConfig) -> Path:
    """The bundle folder; a URL is downloaded into the state dir first (resumed, every sha256 checked,
    a mismatch refused) and reused on the next start."""
    url = cfg.bundle_url
    if url is None:
        return Path(cfg.bundle)
    from fedclip.device_agent.step_backend import fetch_formats
    from fedclip.sdk.fetch import fetch_bundle

    log.info("fetching bundle %s", url)
    formats = fetch_formats(cfg.training_backend)  # only the training format this device runs
    return fetch_bundle(url, cfg.state / "bundles", formats=formats, progress=cfg.progress)


def _floats(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float, np.number))}
