"""`personalize`: the agent's personal tuning of the adapter in use (`device_agent.personal` says
what and why), kept in the ledger beside it; the trainer is left as the rounds had it.

Tuning yields to the fleet. It is `personal.epochs` over the device's training split: seconds on
fedclip-tiny, minutes at ViT-B-32's width on a CPU, and it runs on the agent's one thread. Before
every step it asks whether a message is waiting (a round's task, a rollback, the next rollout) or a
stop came (a message only after one step of its own: it advances however busy the agent is); if so
it checkpoints where it stands (`personal-work.ckpt` and `.json` in the state dir:
the tuning's tensors, AdamW moments and step, the epoch and batch it stopped at) and returns, the
agent handles the message, and the next idle moment resumes it. A resumed tuning trains the same
batches in the same order from the same state: its copy is the one an uninterrupted tuning makes.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fedclip.device_agent.loops import evaluate, train_local
from fedclip.device_agent.personal import WORK_CKPT, WORK_INFO, PersonalTuning
from fedclip.device_agent.step_backend import StepTrainer
from fedclip.sdk.adapters import AdapterMeta, load_adapter
from fedclip.sdk.errors import ConfigError, DataError, FedclipError
from fedclip.sdk.fsutil import atomic_write
from fedclip.sdk.ledger import PERSONAL

if TYPE_CHECKING:
    from fedclip.device_agent.rounds import RoundRunner
    from fedclip.device_agent.state import AgentState

log = logging.getLogger("fedclip.agent")


@dataclass
class _Work:
    """Where a tuning stands: `epoch` and `batch` within it; `steps` is the trainer's step count at
    that point (a checkpoint and a record that disagree, after a crash between the two, are dropped)."""

    version: str
    settings: dict
    accuracy_fleet: float
    epoch: int = 0
    batch: int = 0
    steps: int = 0


def personalize(
    runner: RoundRunner,
    tuning: PersonalTuning,
    yield_to: Callable[[], bool] = lambda: False,
    at: Callable[[str, int], None] = lambda version, epoch: None,
) -> dict[str, float] | None:
    """Tune the adapter inference uses when it has no personal copy yet and keep the copy; returns
    the held-out metrics (`accuracy_fleet` of the adapter as served until now, `accuracy` of the
    copy), None when there was nothing to do, or when `yield_to()` or a stop paused it (the next
    call resumes). `at(version, epoch)` hears where the tuning stands: the epoch (from 1) it starts
    or resumes in, each next one it begins, and the one it paused in. The trainer is left as it was."""
    state = runner.state
    entry = state.ledger().in_use()
    if not tuning.enabled or entry is None or (entry.personal is not None and entry.personal.is_file()):
        return None
    trainer = runner.trainer
    if not isinstance(trainer, StepTrainer):  # AgentConfig makes it so; ORT's artifacts fix the loss
        raise ConfigError("personal tuning needs the step backend")
    tensors, meta = load_adapter(entry.file)
    kept = state.scratch_path("personal-trainer.ckpt")
    trainer.save_checkpoint(kept)  # tensors, moments, step, lr: a round's trainer survives the tuning
    biases = runner.train_source.label_bias, runner.eval_source.label_bias
    try:
        work = _resume(
            state, trainer, entry.version, tuning, runner.train_source.num_batches(tuning.batch_size)
        )
        if work is None:
            fleet = runner.evaluate_adapter(None)  # as served until now (with its prior, if any)
            work = _Work(entry.version, tuning.training(), float(fleet.get("accuracy", math.nan)))
            trainer.set_tensors(tensors)
            trainer.reset_optimizer()
            log.info("personal tuning of %s: %d epochs, mu %g", entry.version, tuning.epochs, tuning.mu)
        else:
            log.info("personal tuning of %s: resumed in epoch %d", entry.version, work.epoch + 1)
        runner.train_source.label_bias = runner.eval_source.label_bias = None  # plain CE
        trainer.set_prox(tensors, tuning.mu)
        at(entry.version, work.epoch + 1)
        if not _train(runner, trainer, tuning, work, yield_to, at):
            work.steps = trainer.step
            trainer.save_checkpoint(state.scratch_path(WORK_CKPT))
            atomic_write(state.scratch_path(WORK_INFO), json.dumps(asdict(work)).encode())
            at(entry.version, work.epoch + 1)
            log.info(
                "personal tuning of %s: paused in epoch %d (a message or a stop)",
                entry.version,
                work.epoch + 1,
            )
            return None
        mine = evaluate(trainer, runner.eval_source, batch_size=runner.cfg.eval_batch_size)
        metrics = {
            "accuracy_fleet": work.accuracy_fleet,
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
        _drop_work(state)
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


def _train(
    runner: RoundRunner,
    trainer: StepTrainer,
    tuning: PersonalTuning,
    work: _Work,
    yield_to: Callable[[], bool],
    at: Callable[[str, int], None],
) -> bool:
    """Train from `work`'s epoch and batch to the end, advancing `work` (and telling `at` each next
    epoch it begins); False when paused. Epoch by epoch, each with its own shuffle (the order an
    uninterrupted run has), as rounds train."""
    seed = zlib.crc32(f"{runner.cfg.id}/{work.version}/personal".encode())
    paused, moved = False, trainer.step

    def should_stop() -> bool:
        # At least one step per call before yielding: messages arriving back to back still let
        # the tuning advance (a message waits at most one step more for it).
        nonlocal paused
        paused = paused or runner.stop.is_set() or (trainer.step > moved and yield_to())
        return paused

    while work.epoch < tuning.epochs:
        before = trainer.step  # the tuning's AdamW step count: this epoch's steps are the difference
        try:
            train_local(
                trainer,
                runner.train_source,
                epochs=1,
                batch_size=tuning.batch_size,
                lr=tuning.lr,
                progress=runner.cfg.progress,
                should_stop=should_stop,
                seed=seed + work.epoch,
                skip=work.batch,
            )
        except DataError:
            if not paused:  # paused before the first step reads as "nothing trained"
                raise
        if paused:
            work.batch += trainer.step - before
            return False
        work.epoch, work.batch = work.epoch + 1, 0
        if work.epoch < tuning.epochs:
            at(work.version, work.epoch + 1)
    return True


def _resume(
    state: AgentState, trainer: StepTrainer, version: str, tuning: PersonalTuning, batches: int
) -> _Work | None:
    """The paused tuning of `version` with these settings, its checkpoint loaded into `trainer`;
    None (and the files dropped) when there is none or it is another's, stale or unreadable, or
    stands where a tuning of `batches` batches an epoch cannot (a resume there would train nothing
    and fail at every start)."""
    info, ckpt = state.scratch_path(WORK_INFO), state.scratch_path(WORK_CKPT)
    if not info.is_file():
        return None
    try:
        work = _Work(**json.loads(info.read_text()))
        if work.version != version or work.settings != tuning.training():
            raise ValueError(f"it was for {work.version} with {work.settings}")
        at = (work.epoch, work.batch, work.steps)
        if not (
            all(type(v) is int for v in at) and 0 <= work.epoch < tuning.epochs and 0 <= work.batch < batches
        ):
            raise ValueError(f"it stands at epoch, batch, step {at}: not a place in this tuning")
        trainer.load_checkpoint(ckpt)
        if trainer.step != work.steps:
            raise ValueError(f"its checkpoint is at step {trainer.step}, its record at {work.steps}")
        return work
    except (OSError, ValueError, TypeError, FedclipError) as e:
        log.info("personal tuning of %s starts over: the paused one is not resumed (%s)", version, e)
        _drop_work(state)
        return None


def _drop_work(state: AgentState) -> None:
    for name in (WORK_INFO, WORK_CKPT):
        state.scratch_path(name).unlink(missing_ok=True)
