"""The round lifecycle in the agent's state dir (`device_agent.state`): the round in progress with
its task and checkpoints, each round's update blob and its status, the trainer's checkpoint.

`AgentState` is a `RoundsState`: the record, its atomic writes and the lock are `AgentState`'s
(`state.json`, layout in its module docstring); this half only reads and changes the `rounds`,
`in_progress` and `trainer_checkpoint` parts of the record and their files under `rounds/` and
`trainer/`. The update blob is the source of truth for "this round was built": once `update.bin`
exists the round is never trained again and only those bytes are ever published.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedclip.device_agent.round_progress import RoundProgress
from fedclip.sdk.errors import StateError
from fedclip.sdk.fsutil import atomic_produce, remove
from fedclip.sdk.hashing import sha256_bytes

BUILT = "built"  # update blob on disk, not yet acknowledged by the broker
DONE = "done"  # update published (PUBACK received)


class RoundsState:
    """The rounds half of `AgentState`, which provides the record and its writes."""

    root: Path
    record: dict[str, Any]

    def _save(self) -> None:  # AgentState's: the record to state.json, atomically
        raise NotImplementedError

    def _write(self, rel: str, data: bytes) -> None:  # AgentState's: one file, atomically
        raise NotImplementedError

    def _produce(self, rel: str, write: Callable[[Path], object]) -> str:  # AgentState's
        raise NotImplementedError

    @property
    def last_round(self) -> int:
        rounds = [int(r) for r in self.record["rounds"]]
        return max(rounds) if rounds else -1

    def last_trained_summary(self, before: int) -> Mapping[str, Any] | None:
        """The kept summary of the latest round before `before` that trained (steps > 0), if any."""
        done = [(int(r), e) for r, e in self.record["rounds"].items() if int(r) < before and _trained(e)]
        return max(done, key=lambda x: x[0])[1] if done else None

    def round_status(self, rnd: int) -> str | None:
        entry = self.record["rounds"].get(str(rnd))
        return entry["status"] if entry else None

    def trainer_checkpoint(self) -> Path | None:
        rel = self.record.get("trainer_checkpoint")
        return self.root / rel if rel else None

    def update_path(self, rnd: int) -> Path:
        """Where round `rnd`'s update blob is kept (it may not exist yet)."""
        return self.root / "rounds" / str(rnd) / "update.bin"

    def has_update_blob(self, rnd: int) -> bool:
        return self.update_path(rnd).is_file()

    def update_blob(self, rnd: int) -> bytes:
        path = self.update_path(rnd)
        try:
            return path.read_bytes()
        except OSError as e:
            raise StateError(f"{path}: cannot read the update of round {rnd} ({e.strerror or e})") from None

    def pending_updates(self) -> list[int]:
        """Rounds whose update was built but not acknowledged yet, oldest first."""
        return sorted(int(r) for r, e in self.record["rounds"].items() if e["status"] == BUILT)

    def in_progress(self) -> RoundProgress | None:
        entry = self.record["in_progress"]
        return RoundProgress.from_record(entry) if entry else None

    def checkpoint_path(self, progress: RoundProgress) -> Path | None:
        return self.root / progress.checkpoint if progress.checkpoint else None

    def begin_round(self, rnd: int, task_blob: bytes) -> RoundProgress:
        """Start (or restart from scratch) round `rnd`: keep its task so a restart can resume it."""
        old = self.record["in_progress"]
        self._write(f"rounds/{rnd}/task.bin", task_blob)
        self.record["in_progress"] = {
            "round": rnd,
            "task_sha256": sha256_bytes(task_blob),
            "epochs_done": 0,
            "steps_done": 0,
            "checkpoint": None,
            "metrics_before": None,
            "train_seconds": 0.0,
            "started_at": time.time(),
        }
        self._save()
        if old and old["round"] != rnd:
            self._drop_round_scratch(old["round"])
        elif old and old.get("checkpoint"):
            remove(self.root / old["checkpoint"])
        return RoundProgress.from_record(self.record["in_progress"])

    def task_blob(self, rnd: int) -> bytes:
        path = self.root / "rounds" / str(rnd) / "task.bin"
        try:
            return path.read_bytes()
        except OSError as e:
            raise StateError(f"{path}: cannot read the task of round {rnd} ({e.strerror or e})") from None

    def save_progress(
        self, rnd: int, *, save_checkpoint: Callable[[Path], object] | None = None, **fields: Any
    ) -> None:
        """Record progress of the round in progress; the checkpoint (if any) is written before the record
        points at it, and the one it replaces is removed after, so the record never names a missing file."""
        prog = self.record["in_progress"]
        if not prog or prog["round"] != rnd:
            raise StateError(f"round {rnd} is not in progress")
        old = prog.get("checkpoint")
        if save_checkpoint is not None:
            rel = f"rounds/{rnd}/ckpt-{fields.get('epochs_done', prog['epochs_done'])}"
            fields["checkpoint"] = self._produce(rel, lambda path: atomic_produce(path, save_checkpoint))
        prog.update(fields)
        self._save()
        if save_checkpoint is not None and old and old != prog["checkpoint"]:
            remove(self.root / old)

    def store_update(
        self,
        rnd: int,
        blob: bytes,
        summary: Mapping[str, Any],
        save_trainer_checkpoint: Callable[[Path], object] | None = None,
    ) -> None:
        """The round's update is built: keep its exact bytes, then mark the round BUILT."""
        self._write(self.update_path(rnd).relative_to(self.root).as_posix(), blob)
        old_ckpt = self.record.get("trainer_checkpoint")
        if save_trainer_checkpoint is not None:
            self.record["trainer_checkpoint"] = self._produce(
                f"trainer/ckpt-{rnd}", lambda path: atomic_produce(path, save_trainer_checkpoint)
            )
        self._mark_built(rnd, blob, summary)
        if old_ckpt and old_ckpt != self.record["trainer_checkpoint"]:
            remove(self.root / old_ckpt)

    def adopt_built_update(self, rnd: int, summary: Mapping[str, Any]) -> bool:
        """After a crash between writing update.bin and recording it: adopt the blob as the round's update."""
        path = self.update_path(rnd)
        if not path.is_file() or self.round_status(rnd):
            return False
        self._mark_built(rnd, path.read_bytes(), summary)
        return True

    def _mark_built(self, rnd: int, blob: bytes, summary: Mapping[str, Any]) -> None:
        self.record["rounds"][str(rnd)] = dict(
            summary, status=BUILT, update_sha256=sha256_bytes(blob), built_at=time.time()
        )
        if self.record["in_progress"] and self.record["in_progress"]["round"] == rnd:
            self.record["in_progress"] = None
        self._save()
        self._drop_round_scratch(rnd)

    def mark_published(self, rnd: int) -> None:
        entry = self.record["rounds"].get(str(rnd))
        if not entry or entry["status"] == DONE:
            return
        entry.update(status=DONE, published_at=time.time())
        self._save()

    def _drop_round_scratch(self, rnd: int) -> None:
        """Task and checkpoints of a round are only needed while it runs; the update blob stays."""
        folder = self.root / "rounds" / str(rnd)
        if not folder.is_dir():
            return
        for p in folder.iterdir():
            if p.name != "update.bin":
                remove(p)
        if not any(folder.iterdir()):
            remove(folder)


def _trained(entry: Mapping[str, Any]) -> bool:
    """A kept round that took optimizer steps (not a statistics-only one), read defensively."""
    metrics = entry.get("metrics")
    steps = metrics.get("steps") if isinstance(metrics, Mapping) else None
    return isinstance(steps, (int, float)) and steps > 0
