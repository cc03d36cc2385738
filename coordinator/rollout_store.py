"""The rollout record: rollouts, stages, acknowledgements, pins and events in `rollout.sqlite`.

Its own SQLite file next to the coordinator's store, on the same `Database` model (one thread per
process, WAL, a busy wait across processes), so `fedclip-coord rollout ...` commands and a running
`serve` can share it: both record acks, and whoever sees a stage due first decides it.
Stage decisions are compare-and-set (`finish_stage` only closes a running stage), so two processes
never both promote or both roll back the same stage.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fedclip.coordinator.store.db import Database, columns, transaction
from fedclip.sdk.errors import FedclipError

T = TypeVar("T")
DB_NAME = "rollout.sqlite"
CANARY, REST, PIN = "canary", "rest", "pin"

# rollout states
RUNNING_CANARY, PROMOTED, COMPLETE, ROLLED_BACK = "canary", "promoted", "complete", "rolled_back"
FINAL_STATES = (COMPLETE, ROLLED_BACK)
# ack statuses an agent can send
INSTALLED, REJECTED, ROLLED_BACK_ACK, PINNED = "installed", "rejected", "rolled_back", "pinned"
ACK_STATUSES = (INSTALLED, REJECTED, ROLLED_BACK_ACK, PINNED)


class RolloutError(FedclipError):
    """A rollout cannot start or be changed as asked."""


@dataclass(frozen=True)
class Ack:
    agent: str
    status: str
    version: str = ""
    new_accuracy: float | None = None
    current_accuracy: float | None = None
    new_loss: float | None = None
    current_loss: float | None = None
    num_samples: int = 0
    reason: str = ""

    @property
    def regression(self) -> float | None:
        """Accuracy lost, in percentage points (negative: the new adapter is better)."""
        if self.new_accuracy is None or self.current_accuracy is None:
            return None
        return (self.current_accuracy - self.new_accuracy) * 100.0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts(
    id INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT NOT NULL, target TEXT NOT NULL,
    canary TEXT NOT NULL, max_regression REAL NOT NULL, min_acks REAL NOT NULL,
    stage_timeout REAL NOT NULL, state TEXT NOT NULL, reason TEXT, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, skipped TEXT NOT NULL DEFAULT '[]', targets TEXT NOT NULL DEFAULT '[]',
    fallback INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rollout_stages(
    rollout INTEGER NOT NULL, name TEXT NOT NULL, agents TEXT NOT NULL, state TEXT NOT NULL,
    started_at REAL, deadline REAL, decided_at REAL, mean_regression REAL, reason TEXT,
    PRIMARY KEY(rollout, name));
CREATE TABLE IF NOT EXISTS rollout_acks(
    rollout INTEGER NOT NULL, agent TEXT NOT NULL, stage TEXT NOT NULL, status TEXT NOT NULL,
    version TEXT, new_accuracy REAL, current_accuracy REAL, new_loss REAL, current_loss REAL,
    num_samples INTEGER, reason TEXT, at REAL NOT NULL, PRIMARY KEY(rollout, agent));
CREATE TABLE IF NOT EXISTS rollout_pins(agent TEXT PRIMARY KEY, version TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, rollout INTEGER, at REAL NOT NULL, event TEXT NOT NULL);
"""


@dataclass(frozen=True)
class RolloutRow:
    id: int
    version: str
    target: str
    canary: str
    max_regression: float
    min_acks: float
    stage_timeout: float
    state: str
    reason: str
    created_at: float
    updated_at: float
    skipped: tuple[str, ...]
    targets: tuple[str, ...]
    fallback: bool = False  # personalized agents also get the round's global adapter (`--fallback`)


@dataclass(frozen=True)
class StageRow:
    rollout: int
    name: str
    agents: tuple[str, ...]
    state: str  # "running", "passed", "failed", "done"
    started_at: float | None
    deadline: float | None
    decided_at: float | None
    mean_regression: float | None
    reason: str


class RolloutStore:
    """The rollout tables in their own SQLite file. Thread-safe: calls run on its database thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # NORMAL in WAL mode survives a process crash; an OS crash may lose the last acks, which
        # agents send again on their next status anyway (acks are idempotent upserts).
        self.db = Database(
            self.path,
            _SCHEMA,
            what=str(self.path),
            synchronous="NORMAL",
            error_type=RolloutError,
            on_open=_add_fallback_column,
        )

    def close(self) -> None:
        self.db.close()

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self.db.write(fn)

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self.db.rows(sql, args)

    # rollouts
    def create(
        self,
        version: str,
        target: str,
        canary: str,
        max_regression: float,
        min_acks: float,
        stage_timeout: float,
        skipped: Sequence[str],
        targets: Sequence[str],
        fallback: bool = False,
    ) -> int:
        now = time.time()

        def fn(c: sqlite3.Connection) -> int:
            cur = c.execute(
                "INSERT INTO rollouts(version, target, canary, max_regression, min_acks, stage_timeout,"
                " state, reason, created_at, updated_at, skipped, targets, fallback)"
                " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    version,
                    target,
                    canary,
                    max_regression,
                    min_acks,
                    stage_timeout,
                    RUNNING_CANARY,
                    "",
                    now,
                    now,
                    json.dumps(sorted(skipped)),
                    json.dumps(sorted(targets)),
                    int(fallback),
                ),
            )
            rid = cur.lastrowid
            assert rid is not None  # set by the INSERT just made
            c.execute(
                "INSERT INTO rollout_events(rollout, at, event) VALUES(?,?,?)",
                (rid, now, f"started {version} to {target}"),
            )
            return rid

        return self._tx(fn)

    def set_state(self, rid: int, state: str, reason: str) -> None:
        now = time.time()

        def fn(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE rollouts SET state=?, reason=?, updated_at=? WHERE id=?", (state, reason, now, rid)
            )
            c.execute(
                "INSERT INTO rollout_events(rollout, at, event) VALUES(?,?,?)",
                (rid, now, f"{state}: {reason}"),
            )

        self._tx(fn)

    def get(self, rid: int) -> RolloutRow | None:
        rows = self._q("SELECT * FROM rollouts WHERE id=?", (rid,))
        return _rollout(rows[0]) if rows else None

    def rollouts(self, limit: int = 50) -> list[RolloutRow]:
        return [_rollout(r) for r in self._q("SELECT * FROM rollouts ORDER BY id DESC LIMIT ?", (limit,))]

    def active(self) -> list[RolloutRow]:
        marks = ",".join("?" * len(FINAL_STATES))
        return [
            _rollout(r)
            for r in self._q(f"SELECT * FROM rollouts WHERE state NOT IN ({marks}) ORDER BY id", FINAL_STATES)
        ]

    # stages
    def add_stage(self, rid: int, name: str, agents: Sequence[str], deadline: float) -> None:
        now = time.time()
        self._tx(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO rollout_stages VALUES(?,?,?,?,?,?,?,?,?)",
                (rid, name, json.dumps(sorted(agents)), "running", now, deadline, None, None, ""),
            )
        )

    def finish_stage(
        self, rid: int, name: str, state: str, reason: str, mean_regression: float | None
    ) -> bool:
        """Close a running stage; False if it was not running (another process decided it first)."""
        changed = self._tx(
            lambda c: (
                c.execute(
                    "UPDATE rollout_stages SET state=?, reason=?, mean_regression=?, decided_at=?"
                    " WHERE rollout=? AND name=? AND state='running'",
                    (state, reason, mean_regression, time.time(), rid, name),
                ).rowcount
            )
        )
        return changed > 0

    def stages(self, rid: int) -> list[StageRow]:
        rows = self._q("SELECT * FROM rollout_stages WHERE rollout=? ORDER BY started_at", (rid,))
        return [
            StageRow(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4], r[5], r[6], r[7], r[8] or "")
            for r in rows
        ]

    def stage_names(self, rid: int) -> tuple[str, ...]:
        return tuple(
            r[0] for r in self._q("SELECT name FROM rollout_stages WHERE rollout=? ORDER BY name", (rid,))
        )

    # acks
    def record_ack(self, rid: int, stage: str, ack: Ack) -> None:
        """Upsert: a later ack replaces the status; metrics already known are kept when it has none."""
        self._tx(
            lambda c: c.execute(
                "INSERT INTO rollout_acks VALUES(?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(rollout, agent) DO UPDATE SET status=excluded.status, version=excluded.version,"
                " reason=excluded.reason, at=excluded.at,"
                " new_accuracy=coalesce(excluded.new_accuracy, new_accuracy),"
                " current_accuracy=coalesce(excluded.current_accuracy, current_accuracy),"
                " new_loss=coalesce(excluded.new_loss, new_loss),"
                " current_loss=coalesce(excluded.current_loss, current_loss),"
                " num_samples=max(excluded.num_samples, num_samples)",
                (
                    rid,
                    ack.agent,
                    stage,
                    ack.status,
                    ack.version,
                    ack.new_accuracy,
                    ack.current_accuracy,
                    ack.new_loss,
                    ack.current_loss,
                    ack.num_samples,
                    ack.reason,
                    time.time(),
                ),
            )
        )

    def acks(self, rid: int, stage: str | None = None) -> list[Ack]:
        args: tuple
        sql, args = "SELECT * FROM rollout_acks WHERE rollout=?", (rid,)
        if stage:
            sql, args = sql + " AND stage=?", (rid, stage)
        return [
            Ack(r[1], r[3], r[4] or "", r[5], r[6], r[7], r[8], r[9] or 0, r[10] or "")
            for r in self._q(sql + " ORDER BY agent", args)
        ]

    # pins
    def pin(self, agent: str, version: str) -> None:
        self._tx(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO rollout_pins VALUES(?,?,?)", (agent, version, time.time())
            )
        )

    def unpin(self, agent: str) -> bool:
        return self._tx(lambda c: c.execute("DELETE FROM rollout_pins WHERE agent=?", (agent,)).rowcount) > 0

    def pins(self) -> dict[str, str]:
        return dict(self._q("SELECT agent, version FROM rollout_pins ORDER BY agent"))

    def event(self, rid: int | None, text: str) -> None:
        self._tx(
            lambda c: c.execute(
                "INSERT INTO rollout_events(rollout, at, event) VALUES(?,?,?)", (rid, time.time(), text)
            )
        )

    def events(self, rid: int) -> list[tuple[float, str]]:
        return self._q("SELECT at, event FROM rollout_events WHERE rollout=? ORDER BY id", (rid,))


def _add_fallback_column(conn: sqlite3.Connection) -> None:
    """A rollout database made before `--fallback` gets its column (every old rollout: none)."""

    def fn(c: sqlite3.Connection) -> None:  # checked again under the write lock: two openers add it once
        if "fallback" not in columns(c, "rollouts"):
            c.execute("ALTER TABLE rollouts ADD COLUMN fallback INTEGER NOT NULL DEFAULT 0")

    if "fallback" not in columns(conn, "rollouts"):
        transaction(conn, fn)


def _rollout(r: tuple) -> RolloutRow:
    return RolloutRow(
        r[0],
        r[1],
        r[2],
        r[3],
        r[4],
        r[5],
        r[6],
        r[7],
        r[8] or "",
        r[9],
        r[10],
        tuple(json.loads(r[11] or "[]")),
        tuple(json.loads(r[12] or "[]")),
        bool(r[13]),
    )
