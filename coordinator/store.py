"""The coordinator's durable state: SQLite (WAL) plus content-addressed blobs on disk.

One writer thread owns the connection; every call runs there in order and returns when its
transaction has committed, so "stored" means "on disk" (synchronous=FULL). Blobs are written
(tmp + fsync + rename) before the row that names them, so a row never points at a missing blob; a
crash between the two leaves an orphan blob, which costs space, never correctness.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from safetensors import safe_open

from fedclip.sdk.errors import ConfigError, FedclipError
from fedclip.sdk.fsutil import atomic_write
from fedclip.sdk.hashing import sha256_bytes

T = TypeVar("T")
DB_NAME = "coordinator.sqlite"
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


class StoreError(FedclipError):
    """The state dir cannot be opened or is from an incompatible version."""


def connect(
    path: Path, schema: str, *, synchronous: str = "FULL", readonly: bool = False, threads: bool = False
) -> sqlite3.Connection:
    """The way every coordinator database is opened: autocommit (transactions are explicit, see
    `transaction`), WAL so readers (`status`, the CLIs) never block the writer, a 5 s busy wait for
    other processes, and `schema` created when missing. `threads`: usable from any thread (the
    caller serializes). Raises sqlite3.Error."""
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=not threads
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=not threads)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=5000")
    if not readonly:
        conn.executescript(schema)
    return conn


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run `fn(conn)` in one write transaction (taken at once: no lock upgrade deadlock); rolled
    back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


@dataclass(frozen=True)
class RoundRow:
    round: int
    state: str  # "collecting", "aggregated", "failed"
    strategy: str
    started_at: float
    deadline: float
    extended: bool
    closed_at: float | None
    reason: str | None
    global_version: str | None


@dataclass(frozen=True)
class UpdateRow:
    round: int
    agent: str
    sha256: str
    blob: str
    num_samples: int
    metrics: dict[str, float]
    norm: float | None
    clipped: bool
    wire_bytes: int | None = None  # the update's payload as received; None for rows from before


@dataclass(frozen=True)
class StatsRow:
    """The data statistics the coordinator holds for one agent: accepted in `round`, computed from
    the data the agent named `data_digest` ("" from an agent that names none: never reused)."""

    agent: str
    round: int
    data_digest: str
    blob: str  # the stored update they came with: its `stats/*` tensors, float32


@dataclass(frozen=True)
class VersionRow:
    version: str
    parent: str
    round: int
    strategy: str
    scope: str  # "global" or "agent"
    agent: str
    blob: str
    metrics: dict[str, float]
    created_at: float


class Blobs:
    """Content-addressed files: `<dir>/<sha[:2]>/<sha>`; writing the same bytes twice is free."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def put(self, data: bytes) -> str:
        sha = sha256_bytes(data)
        path = self.path(sha)
        if path.is_file() and path.stat().st_size == len(data):
            return sha
        atomic_write(path, data)
        return sha

    def get(self, sha: str) -> bytes:
        try:
            return self.path(sha).read_bytes()
        except OSError as e:
            raise StoreError(f"blob {sha[:12]} is missing from {self.root} ({e.strerror or e})") from None


class Store:
    """SQLite state of one coordinator. Thread-safe: every call runs on the writer thread."""

    def __init__(self, state_dir: str | Path, readonly: bool = False):
        self.dir = Path(state_dir)
        if readonly and not (self.dir / DB_NAME).is_file():
            raise ConfigError(f"state dir {self.dir}: no coordinator state there ({DB_NAME} missing)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.blobs = Blobs(self.dir / "blobs")
        self._readonly = readonly
        self._jobs: queue.Queue[tuple[Callable[[sqlite3.Connection], Any], Future] | None] = queue.Queue()
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="store-writer", daemon=True)
        self._thread.start()
        ready.result()

    # ---- the writer thread -------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        path = self.dir / DB_NAME
        try:
            conn = connect(path, _SCHEMA, readonly=self._readonly)
            if not self._readonly:
                conn.execute("INSERT OR IGNORE INTO meta VALUES('schema', ?)", (str(SCHEMA_VERSION),))
                _add_missing_columns(conn)
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            self._wire_bytes = "wire_bytes" in _columns(conn, "updates")
            self._has_agent_stats = bool(_columns(conn, "agent_stats"))
        except sqlite3.Error as e:
            raise StoreError(f"state dir {self.dir}: cannot open the database ({e})") from None
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise StoreError(f"state dir {self.dir}: schema {row and row[0]!r} is not {SCHEMA_VERSION}")
        return conn

    def _run(self, ready: Future) -> None:
        try:
            conn = self._open()
        except BaseException as e:
            ready.set_exception(e)
            return
        ready.set_result(None)
        while True:
            job = self._jobs.get()
            if job is None:
                conn.close()
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(conn) if self._readonly else transaction(conn, fn))
            except BaseException as e:
                fut.set_exception(e)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut.result()

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=10)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- meta ----------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._call(lambda c: c.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone())
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._call(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, value)))

    # ---- agents --------------------------------------------------------------------------------
    def upsert_agent(
        self,
        agent: str,
        online: bool,
        bundle_id: str,
        adapter_version: str,
        last_round: int,
        info: dict[str, Any],
    ) -> None:
        self._call(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO agents VALUES(?, ?, ?, ?, ?, ?, ?)",
                (
                    agent,
                    int(online),
                    bundle_id,
                    adapter_version,
                    last_round,
                    json.dumps(info, sort_keys=True),
                    time.time(),
                ),
            )
        )

    def agents(self) -> list[dict[str, Any]]:
        rows = self._call(lambda c: c.execute("SELECT * FROM agents ORDER BY agent").fetchall())
        keys = ("agent", "online", "bundle_id", "adapter_version", "last_round", "info", "seen_at")
        out = []
        for r in rows:
            d = dict(zip(keys, r, strict=True))
            d["online"] = bool(d["online"])
            d["info"] = json.loads(d["info"] or "{}")
            out.append(d)
        return out

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

        self._call(fn)

    def extend_round(self, round_id: int, deadline: float, task_blobs: dict[str, str] | None = None) -> None:
        """The new deadline and the re-issued tasks (agent -> blob) that carry it, atomically."""

        def fn(c: sqlite3.Connection) -> None:
            c.execute("UPDATE rounds SET deadline=?, extended=1 WHERE round=?", (deadline, round_id))
            c.executemany(
                "UPDATE selections SET task_blob=? WHERE round=? AND agent=?",
                [(b, round_id, a) for a, b in (task_blobs or {}).items()],
            )

        self._call(fn)

    def fail_round(self, round_id: int, reason: str) -> None:
        self._call(
            lambda c: c.execute(
                "UPDATE rounds SET state='failed', closed_at=?, reason=? "
                "WHERE round=? AND state='collecting'",
                (time.time(), reason, round_id),
            )
        )

    def get_round(self, round_id: int) -> RoundRow | None:
        row = self._call(lambda c: c.execute("SELECT * FROM rounds WHERE round=?", (round_id,)).fetchone())
        return _round(row) if row else None

    def last_round(self) -> RoundRow | None:
        row = self._call(lambda c: c.execute("SELECT * FROM rounds ORDER BY round DESC LIMIT 1").fetchone())
        return _round(row) if row else None

    def rounds(self) -> list[RoundRow]:
        return [
            _round(r)
            for r in self._call(lambda c: c.execute("SELECT * FROM rounds ORDER BY round").fetchall())
        ]

    def count_rounds(self, state: str) -> int:
        return self._call(
            lambda c: c.execute("SELECT COUNT(*) FROM rounds WHERE state=?", (state,)).fetchone()[0]
        )

    def selections(self, round_id: int) -> dict[str, tuple[str, str]]:
        """agent -> (base version, task blob sha)."""
        rows = self._call(
            lambda c: c.execute(
                "SELECT agent, base_version, task_blob FROM selections WHERE round=?", (round_id,)
            ).fetchall()
        )
        return {a: (v, b) for a, v, b in rows}

    def tasked_agents(self) -> list[str]:
        rows = self._call(
            lambda c: c.execute("SELECT DISTINCT agent FROM selections ORDER BY agent").fetchall()
        )
        return [r[0] for r in rows]

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
    ) -> str:
        """Store one update; "stored", "duplicate" (same tensors again: QoS 1 redelivery) or "conflict".

        `stats` = (data digest, blob) of statistics that travelled with it: they become the agent's
        held statistics in the same transaction, so no crash leaves the update without them (or the
        other way round)."""

        def fn(c: sqlite3.Connection) -> str:
            row = c.execute(
                "SELECT sha256 FROM updates WHERE round=? AND agent=?", (round_id, agent)
            ).fetchone()
            if row is not None:
                return "duplicate" if row[0] == sha else "conflict"
            c.execute(
                "INSERT INTO updates(round, agent, sha256, blob, num_samples, metrics, norm, clipped, "
                "received_at, wire_bytes) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    round_id,
                    agent,
                    sha,
                    blob,
                    num_samples,
                    json.dumps(metrics, sort_keys=True),
                    norm,
                    int(clipped),
                    time.time(),
                    wire_bytes,
                ),
            )
            if stats is not None:
                c.execute("INSERT OR REPLACE INTO agent_stats VALUES(?, ?, ?, ?)", (agent, round_id, *stats))
            return "stored"

        return self._call(fn)

    def updates(self, round_id: int) -> list[UpdateRow]:
        wire = "wire_bytes" if self._wire_bytes else "NULL"
        rows = self._call(
            lambda c: c.execute(
                f"SELECT round, agent, sha256, blob, num_samples, metrics, norm, clipped, {wire} "
                "FROM updates WHERE round=? ORDER BY agent",
                (round_id,),
            ).fetchall()
        )
        return [
            UpdateRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], bool(r[7]), r[8]) for r in rows
        ]

    def agent_stats(self, agent: str) -> StatsRow | None:
        """The statistics held for `agent` (the last ones that travelled), or None."""
        if not self._has_agent_stats:
            return None
        row = self._call(
            lambda c: c.execute(
                "SELECT agent, round, data_digest, blob FROM agent_stats WHERE agent=?", (agent,)
            ).fetchone()
        )
        return StatsRow(*row) if row else None

    def add_rejection(self, topic: str, agent: str, round_id: int, reason: str) -> None:
        self._call(
            lambda c: c.execute(
                "INSERT INTO rejections(at, topic, agent, round, reason) VALUES(?, ?, ?, ?, ?)",
                (time.time(), topic, agent, round_id, reason),
            )
        )

    def rejections(self) -> list[tuple[str, str, int, str]]:
        return self._call(
            lambda c: c.execute("SELECT topic, agent, round, reason FROM rejections ORDER BY id").fetchall()
        )

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
                [
                    (
                        v.version,
                        v.parent,
                        v.round,
                        v.strategy,
                        v.scope,
                        v.agent,
                        v.blob,
                        json.dumps(v.metrics, sort_keys=True),
                        v.created_at,
                    )
                    for v in versions
                ],
            )
            c.executemany("INSERT OR REPLACE INTO heads VALUES(?, ?)", list(heads.items()))
            c.executemany("INSERT OR REPLACE INTO metrics VALUES(?, ?, ?, ?)", metrics)
            if round_id is not None:
                c.execute(
                    "UPDATE rounds SET state='aggregated', closed_at=?, global_version=? WHERE round=?",
                    (time.time(), global_version, round_id),
                )

        self._call(fn)

    def head(self, scope: str) -> str | None:
        row = self._call(lambda c: c.execute("SELECT version FROM heads WHERE scope=?", (scope,)).fetchone())
        return row[0] if row else None

    def version(self, version: str) -> VersionRow | None:
        row = self._call(lambda c: c.execute("SELECT * FROM versions WHERE version=?", (version,)).fetchone())
        return _version(row) if row else None

    def versions(self, scope: str | None = None) -> list[VersionRow]:
        sql, args = "SELECT * FROM versions", ()
        if scope:
            sql, args = sql + " WHERE scope=?", (scope,)
        rows = self._call(lambda c: c.execute(sql + " ORDER BY round, scope DESC, agent", args).fetchall())
        return [_version(r) for r in rows]

    def metrics(self, round_id: int | None = None) -> list[tuple[int, str, str, float]]:
        sql, args = "SELECT round, agent, name, value FROM metrics", ()
        if round_id is not None:
            sql, args = sql + " WHERE round=?", (round_id,)
        return self._call(lambda c: c.execute(sql + " ORDER BY round, agent, name", args).fetchall())


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})").fetchall()}


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    def fn(c: sqlite3.Connection) -> None:  # checked under the write lock: two openers add it once
        for table, column, kind in _ADDED_COLUMNS:
            if column not in _columns(c, table):
                c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    if any(col not in _columns(conn, t) for t, col, _ in _ADDED_COLUMNS):
        transaction(conn, fn)


def _round(r: tuple) -> RoundRow:
    return RoundRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8])


def _version(r: tuple) -> VersionRow:
    return VersionRow(
        r[0], r[1] or "", r[2], r[3] or "", r[4], r[5] or "", r[6], json.loads(r[7] or "{}"), r[8]
    )


class BlobTensors(Mapping):
    """The exchanged tensors of a stored update, read from disk on access (never all in RAM)."""

    def __init__(self, path: Path, names: tuple[str, ...]):
        self.path, self.names = path, names

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        with safe_open(str(self.path), framework="np") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def items(self):  # type: ignore[override]  # one open per update, not one per tensor
        with safe_open(str(self.path), framework="np") as f:
            return [(n, f.get_tensor(n)) for n in self.names]


def read_tensors(path: Path, wanted: Iterable[str]) -> dict[str, np.ndarray]:
    """The tensors of a stored blob whose names are in `wanted` (the ones it has)."""
    wanted = set(wanted)
    with safe_open(str(path), framework="np") as f:
        return {n: f.get_tensor(n) for n in f.keys() if n in wanted}  # noqa: SIM118 (no __iter__)
