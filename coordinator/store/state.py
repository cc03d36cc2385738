"""The coordinator's tables and every query on them: meta, agents, rounds, updates, versions, metrics.

Each method is one call on the store's `Database` thread; a method that changes several tables does
it in one transaction (see the package docstring for the durability contract).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from fedclip.coordinator.store.blobs import Blobs
from fedclip.coordinator.store.db import Database, StoreError, columns, transaction
from fedclip.coordinator.store.rows import (
    NewUpdate,
    RoundRow,
    StatsRow,
    UpdateRow,
    VersionRow,
    agent_dict,
    round_row,
    update_row,
    version_row,
    version_values,
)
from fedclip.sdk.errors import ConfigError

DB_NAME = "coordinator.sqlite"
UpdateOutcome = Literal["stored", "duplicate", "conflict"]
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents(
    agent TEXT PRIMARY KEY, online INTEGER NOT NULL, bundle_id TEXT, adapter_version TEXT,
    last_round INTEGER, info TEXT, seen_at REAL);
CREATE TABLE IF NOT EXISTS rounds(
    round INTEGER PRIMARY KEY, state TEXT NOT NULL, strategy TEXT, started_at REAL, deadline REAL,
    extended INTEGER NOT NULL DEFAULT 0, closed_at REAL, reason TEXT, global_version TEXT);
CREATE TABLE IF NOT EXISTS selections(
    round INTEGER NOT NULL, agent TEXT NOT NULL, base_version TEXT NOT NULL, task_blob TEXT NOT NULL,
    PRIMARY KEY(round, agent));
CREATE TABLE IF NOT EXISTS updates(
    round INTEGER NOT NULL, agent TEXT NOT NULL, sha256 TEXT NOT NULL, blob TEXT NOT NULL,
    num_samples INTEGER NOT NULL, metrics TEXT NOT NULL, norm REAL, clipped INTEGER NOT NULL,
    received_at REAL, wire_bytes INTEGER, PRIMARY KEY(round, agent));
CREATE TABLE IF NOT EXISTS agent_stats(
    agent TEXT PRIMARY KEY, round INTEGER NOT NULL, data_digest TEXT NOT NULL, blob TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions(
    version TEXT PRIMARY KEY, parent TEXT, round INTEGER, strategy TEXT, scope TEXT NOT NULL,
    agent TEXT, blob TEXT NOT NULL, metrics TEXT, created_at REAL);
CREATE TABLE IF NOT EXISTS heads(scope TEXT PRIMARY KEY, version TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics(
    round INTEGER NOT NULL, agent TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY(round, agent, name));
CREATE TABLE IF NOT EXISTS rejections(
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, topic TEXT, agent TEXT, round INTEGER, reason TEXT);
"""
# Columns added after a table's first release: (table, column, type). A state dir from before gets
# them in place when opened for writing (old rows read NULL); a read-only open reads NULL for them.
_ADDED_COLUMNS = (("updates", "wire_bytes", "INTEGER"),)


class Store:
    """SQLite state of one coordinator, plus its blobs. Thread-safe: every call runs on the
    database's own thread."""

    def __init__(self, state_dir: str | Path, readonly: bool = False):
        self.dir = Path(state_dir)
        if readonly and not (self.dir / DB_NAME).is_file():
            raise ConfigError(f"state dir {self.dir}: no coordinator state there ({DB_NAME} missing)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.blobs = Blobs(self.dir / "blobs")
        self._readonly = readonly
        self._wire_bytes = self._has_agent_stats = False
        self.db = Database(
            self.dir / DB_NAME,
            _SCHEMA,
            what=f"state dir {self.dir}",
            readonly=readonly,
            on_open=self._on_open,
        )

    def _on_open(self, conn: sqlite3.Connection) -> None:
        if not self._readonly:
            conn.execute("INSERT OR IGNORE INTO meta VALUES('schema', ?)", (str(SCHEMA_VERSION),))
            _add_missing_columns(conn)
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        self._wire_bytes = "wire_bytes" in columns(conn, "updates")
        self._has_agent_stats = bool(columns(conn, "agent_stats"))
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise StoreError(f"state dir {self.dir}: schema {row and row[0]!r} is not {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        rows = self.db.rows(sql, args)
        return rows[0] if rows else None

    # ---- meta ----------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key=?", (key,))
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.write(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, value)))

    # ---- agents --------------------------------------------------------------------------------
    def upsert_agents(self, rows: Sequence[tuple]) -> None:
        """`agents` rows (`rows.agent_values`), in one transaction."""
        self.db.write(lambda c: _upsert_agents(c, rows))

    def agents(self) -> list[dict[str, Any]]:
        return [agent_dict(r) for r in self.db.rows("SELECT * FROM agents ORDER BY agent")]

    # ---- rounds --------------------------------------------------------------------------------
    def start_round(
        self, round_id: int, strategy: str, deadline: float, selections: Iterable[tuple[str, str, str]]
    ) -> None:
        """The round and who was asked to do what (agent, base version, task blob), atomically."""
        sel = list(selections)

        def fn(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO rounds(round, state, strategy, started_at, deadline) "
                "VALUES(?, 'collecting', ?, ?, ?)",
                (round_id, strategy, time.time(), deadline),
            )
            c.executemany("INSERT INTO selections VALUES(?, ?, ?, ?)", [(round_id, *s) for s in sel])

        self.db.write(fn)

    def extend_round(self, round_id: int, deadline: float, task_blobs: dict[str, str] | None = None) -> None:
        """The new deadline and the re-issued tasks (agent -> blob) that carry it, atomically."""

        def fn(c: sqlite3.Connection) -> None:
            c.execute("UPDATE rounds SET deadline=?, extended=1 WHERE round=?", (deadline, round_id))
            c.executemany(
                "UPDATE selections SET task_blob=? WHERE round=? AND agent=?",
                [(b, round_id, a) for a, b in (task_blobs or {}).items()],
            )

        self.db.write(fn)

    def fail_round(self, round_id: int, reason: str) -> None:
        self.db.write(
            lambda c: c.execute(
                "UPDATE rounds SET state='failed', closed_at=?, reason=? "
                "WHERE round=? AND state='collecting'",
                (time.time(), reason, round_id),
            )
        )

    def get_round(self, round_id: int) -> RoundRow | None:
        row = self._one("SELECT * FROM rounds WHERE round=?", (round_id,))
        return round_row(row) if row else None

    def last_round(self) -> RoundRow | None:
        row = self._one("SELECT * FROM rounds ORDER BY round DESC LIMIT 1")
        return round_row(row) if row else None

    def rounds(self) -> list[RoundRow]:
        return [round_row(r) for r in self.db.rows("SELECT * FROM rounds ORDER BY round")]

    def count_rounds(self, state: str) -> int:
        row = self._one("SELECT COUNT(*) FROM rounds WHERE state=?", (state,))
        return int(row[0]) if row else 0

    def selections(self, round_id: int) -> dict[str, tuple[str, str]]:
        """agent -> (base version, task blob sha)."""
        rows = self.db.rows(
            "SELECT agent, base_version, task_blob FROM selections WHERE round=?", (round_id,)
        )
        return {a: (v, b) for a, v, b in rows}

    def last_tasked(self) -> list[tuple[int, str]]:
        """(round, agent): the last round each agent was given a task in, by round, then agent."""
        rows = self.db.rows("SELECT MAX(round), agent FROM selections GROUP BY agent ORDER BY 1, 2")
        return [(int(r), a) for r, a in rows]

    def tasked_agents(self) -> list[str]:
        return [r[0] for r in self.db.rows("SELECT DISTINCT agent FROM selections ORDER BY agent")]

    # ---- updates -------------------------------------------------------------------------------
    def add_update(
        self,
        round_id: int,
        agent: str,
        sha: str,
        blob: str,
        num_samples: int,
        metrics: dict[str, float],
        norm: float | None,
        clipped: bool,
        wire_bytes: int | None = None,
        stats: tuple[str, str] | None = None,
    ) -> UpdateOutcome:
        """Store one update: `add_updates` of one."""
        row = NewUpdate(round_id, agent, sha, blob, num_samples, metrics, norm, clipped, wire_bytes, stats)
        return self.add_updates([row])[0]

    def add_updates(
        self,
        updates: Sequence[NewUpdate],
        rejections: Sequence[tuple[str, str, int, str]] = (),
        agents: Sequence[tuple] = (),
    ) -> list[UpdateOutcome]:
        """Store a batch of updates, (topic, agent, round, reason) rejections and `agents` rows
        (`rows.agent_values`: the statuses of the batch) in one transaction (one commit, one fsync:
        group commit). Each update's outcome, in order: "stored", "duplicate" (same tensors again: a
        QoS 1 redelivery, also within the batch) or "conflict".

        An update's `stats` become the agent's held statistics in the same transaction, so no crash
        leaves the update without them (or the other way round)."""
        now = time.time()

        def fn(c: sqlite3.Connection) -> list[UpdateOutcome]:
            out: list[UpdateOutcome] = []
            for u in updates:  # one by one: a later copy in the batch sees the earlier one's row
                row = c.execute(
                    "SELECT sha256 FROM updates WHERE round=? AND agent=?", (u.round, u.agent)
                ).fetchone()
                if row is not None:
                    out.append("duplicate" if row[0] == u.sha256 else "conflict")
                    continue
                c.execute(
                    "INSERT INTO updates(round, agent, sha256, blob, num_samples, metrics, norm, clipped, "
                    "received_at, wire_bytes) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        u.round, u.agent, u.sha256, u.blob, u.num_samples,
                        json.dumps(u.metrics, sort_keys=True), u.norm, int(u.clipped), now, u.wire_bytes,
                    ),
                )  # fmt: skip
                if u.stats is not None:
                    c.execute(
                        "INSERT OR REPLACE INTO agent_stats VALUES(?, ?, ?, ?)", (u.agent, u.round, *u.stats)
                    )
                out.append("stored")
            _insert_rejections(c, rejections, now)
            _upsert_agents(c, agents)
            return out

        return self.db.write(fn)

    def updates(self, round_id: int) -> list[UpdateRow]:
        wire = "wire_bytes" if self._wire_bytes else "NULL"
        rows = self.db.rows(
            f"SELECT round, agent, sha256, blob, num_samples, metrics, norm, clipped, {wire} "
            "FROM updates WHERE round=? ORDER BY agent",
            (round_id,),
        )
        return [update_row(r) for r in rows]

    def agent_stats(self, agent: str) -> StatsRow | None:
        """The statistics held for `agent` (the last ones that travelled), or None."""
        if not self._has_agent_stats:
            return None
        row = self._one("SELECT agent, round, data_digest, blob FROM agent_stats WHERE agent=?", (agent,))
        return StatsRow(*row) if row else None

    def forget_stats(self, agent: str) -> None:
        """Drop the statistics held for `agent` (its key changed: the next round asks for them again)."""
        if self._has_agent_stats:
            self.db.write(lambda c: c.execute("DELETE FROM agent_stats WHERE agent=?", (agent,)))

    def add_rejection(self, topic: str, agent: str, round_id: int, reason: str) -> None:
        self.add_rejections([(topic, agent, round_id, reason)])

    def add_rejections(self, rows: Sequence[tuple[str, str, int, str]]) -> None:
        """(topic, agent, round, reason) rows, in one transaction."""
        self.db.write(lambda c: _insert_rejections(c, rows, time.time()))

    def rejections(self) -> list[tuple[str, str, int, str]]:
        return self.db.rows("SELECT topic, agent, round, reason FROM rejections ORDER BY id")

    # ---- versions ------------------------------------------------------------------------------
    def add_version(self, v: VersionRow, head: str | None = None) -> None:
        self.close_round_with(None, [v], {head: v.version} if head else {}, [])

    def close_round_with(
        self,
        round_id: int | None,
        versions: list[VersionRow],
        heads: dict[str, str],
        metrics: list[tuple[int, str, str, float]],
        global_version: str | None = None,
    ) -> None:
        """Versions, heads, metrics and the round's `aggregated` state in one transaction."""

        def fn(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT OR IGNORE INTO versions VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [version_values(v) for v in versions],
            )
            c.executemany("INSERT OR REPLACE INTO heads VALUES(?, ?)", list(heads.items()))
            c.executemany("INSERT OR REPLACE INTO metrics VALUES(?, ?, ?, ?)", metrics)
            if round_id is not None:
                c.execute(
                    "UPDATE rounds SET state='aggregated', closed_at=?, global_version=? WHERE round=?",
                    (time.time(), global_version, round_id),
                )

        self.db.write(fn)

    def head(self, scope: str) -> str | None:
        row = self._one("SELECT version FROM heads WHERE scope=?", (scope,))
        return row[0] if row else None

    def version(self, version: str) -> VersionRow | None:
        row = self._one("SELECT * FROM versions WHERE version=?", (version,))
        return version_row(row) if row else None

    def versions(self, scope: str | None = None) -> list[VersionRow]:
        args: tuple
        sql, args = "SELECT * FROM versions", ()
        if scope:
            sql, args = sql + " WHERE scope=?", (scope,)
        return [version_row(r) for r in self.db.rows(sql + " ORDER BY round, scope DESC, agent", args)]

    def metrics(self, round_id: int | None = None) -> list[tuple[int, str, str, float]]:
        args: tuple
        sql, args = "SELECT round, agent, name, value FROM metrics", ()
        if round_id is not None:
            sql, args = sql + " WHERE round=?", (round_id,)
        return self.db.rows(sql + " ORDER BY round, agent, name", args)


def _upsert_agents(c: sqlite3.Connection, rows: Sequence[tuple]) -> None:
    c.executemany("INSERT OR REPLACE INTO agents VALUES(?, ?, ?, ?, ?, ?, ?)", rows)


def _insert_rejections(c: sqlite3.Connection, rows: Sequence[tuple[str, str, int, str]], at: float) -> None:
    c.executemany(
        "INSERT INTO rejections(at, topic, agent, round, reason) VALUES(?, ?, ?, ?, ?)",
        [(at, *r) for r in rows],
    )


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    def fn(c: sqlite3.Connection) -> None:  # checked under the write lock: two openers add it once
        for table, column, kind in _ADDED_COLUMNS:
            if column not in columns(c, table):
                c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    if any(col not in columns(conn, t) for t, col, _ in _ADDED_COLUMNS):
        transaction(conn, fn)
