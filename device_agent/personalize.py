"""`personalize`: the agent's personal tuning of the adapter in use (`device_agent.personal` says
what and why), kept in the ledger beside it; the trainer is left as the rounds had it."""

from __future__ import annotations

import logging
import math
import zlib
from typing import TYPE_CHECKING

from fedclip.device_agent.loops import evaluate, train_local
from fedclip.device_agent.personal import PersonalTuning
from fedclip.sdk.adapters import AdapterMeta, load_adapter
from fedclip.sdk.ledger import PERSONAL

if TYPE_CHECKING:
    from fedclip.device_agent.rounds import RoundRunner

log = logging.getLogger("fedclip.agent")


def personalize(runner: RoundRunner, tuning: PersonalTuning) -> dict[str, float] | None:
    """Tune the adapter inference uses when it has no personal copy yet and keep the copy; returns
    the held-out metrics (`accuracy_fleet` of the adapter as served until now, `accuracy` of the
    copy), None when there was nothing to do or a stop came first. The trainer is left as it was."""
    state = runner.state
    entry = state.ledger().in_use()
    if not tuning.enabled or entry is None or (entry.personal is not None and entry.personal.is_file()):
        return None
    tensors, meta = load_adapter(entry.file)
    trainer = runner.trainer
    kept = state.scratch_path("personal-trainer.ckpt")
    trainer.save_checkpoint(kept)  # tensors, moments, step, lr: a round's trainer survives the tuning
    biases = runner.train_source.label_bias, runner.eval_source.label_bias
    try:
        fleet = runner.evaluate_adapter(None)  # as served until now (with its prior, if any)
        runner.train_source.label_bias = runner.eval_source.label_bias = None  # plain CE
        trainer.set_tensors(tensors)
        trainer.reset_optimizer()
        trainer.set_prox(tensors, tuning.mu)
        log.info("personal tuning of %s: %d epochs, mu %g", entry.version, tuning.epochs, tuning.mu)
        train_local(
            trainer,
            runner.train_source,
            epochs=tuning.epochs,
            batch_size=tuning.batch_size,
            lr=tuning.lr,
            progress=runner.cfg.progress,
            should_stop=runner.stop.is_set,
            seed=zlib.crc32(f"{runner.cfg.id}/{entry.version}/personal".encode()),
        )
        if runner.stop.is_set():
            return None  # the next start tunes again from the fleet's adapter
        mine = evaluate(trainer, runner.eval_source, batch_size=runner.cfg.eval_batch_size)
        metrics = {
            "accuracy_fleet": float(fleet.get("accuracy", math.nan)),
            "accuracy": float(mine.get("accuracy", math.nan)),
            "mu": tuning.mu,
        }
        copy = AdapterMeta(
            bundle_id=meta.bundle_id,
            version=entry.version + PERSONAL,
            parent_version=entry.version,
            round=meta.round,
            strategy="personal",
            kind=meta.kind,
            agent=runner.cfg.id,
        )
        state.keep_personal(entry.version, trainer.get_tensors("trainable"), copy, metrics)
        log.info(
            "personal copy of %s kept: held-out accuracy %.3f (the fleet's adapter: %.3f)",
            entry.version,
            metrics["accuracy"],
            metrics["accuracy_fleet"],
        )
        return metrics
    finally:
        trainer.set_prox(None, 0.0)
        trainer.load_checkpoint(kept)
        runner.train_source.label_bias, runner.eval_source.label_bias = biases
        kept.unlink(missing_ok=True)
