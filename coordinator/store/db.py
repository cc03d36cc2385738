"""How every coordinator database is opened and written: one SQLite concurrency model.

A `Database` owns one writing connection on one thread of its own; every write runs there, in
order, in one `BEGIN IMMEDIATE` transaction, and returns after it has committed, so "stored" means
"on disk" at the file's `synchronous` level. Reads run on the calling thread, each thread with a
read-only connection of its own: a committed write is visible to every later read (WAL), and a
read no longer waits for the writer's thread to be scheduled. Handing each read to that thread
cost ~0.1 ms on an idle process and up to the interpreter's 5 ms switch interval while another
thread was busy (paho's network thread during an update burst), once per stored update. WAL mode
also lets readers in other processes (`status`, the CLIs) read while one process writes; a 5 s
busy wait covers two processes writing the same file (`serve` and `fedclip-coord rollout ...` on
rollout.sqlite).
The coordinator's store and the rollout store both sit on it.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from fedclip.sdk.errors import FedclipError

T = TypeVar("T")


class StoreError(FedclipError):
    """The state dir cannot be opened or is from an incompatible version."""


def connect(
    path: Path, schema: str, *, synchronous: str = "FULL", readonly: bool = False
) -> sqlite3.Connection:
    """Autocommit (transactions are explicit, see `transaction`), WAL, a 5 s busy wait for other
    processes, and `schema` created when missing. Usable from any thread: `Database` serializes.
    Raises sqlite3.Error."""
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
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


class Database:
    """One SQLite file, written by one thread. `write(fn)` commits `fn(conn)` as one transaction on
    that thread and waits for it; `read(fn)` runs it on the caller's own read-only connection.
    `on_open(conn)` runs first, on the writer's thread (schema checks, migrations); what it raises,
    and sqlite3 errors opening the file, come out of the constructor (as `error_type`, naming
    `what`)."""

    def __init__(
        self,
        path: Path,
        schema: str,
        *,
        what: str,
        synchronous: str = "FULL",
        readonly: bool = False,
        on_open: Callable[[sqlite3.Connection], None] | None = None,
        error_type: type[FedclipError] = StoreError,
    ):
        self.path = Path(path)
        self.readonly = readonly
        self._local = threading.local()  # this thread's `_Reader`, closed when the thread ends
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()  # the live ones, for `close`
        self._readers_lock = threading.Lock()
        self._jobs: queue.Queue[tuple[Callable[[sqlite3.Connection], Any], bool, Future] | None] = (
            queue.Queue()
        )
        ready: Future = Future()
        opener = (schema, synchronous, on_open, what, error_type)
        self._thread = threading.Thread(
            target=self._run, args=(ready, opener), name=f"sqlite-{self.path.name}", daemon=True
        )
        self._thread.start()
        ready.result()

    def _run(self, ready: Future, opener: tuple) -> None:
        schema, synchronous, on_open, what, error_type = opener
        try:
            conn = connect(self.path, schema, synchronous=synchronous, readonly=self.readonly)
            if on_open is not None:
                on_open(conn)
        except sqlite3.Error as e:
            ready.set_exception(error_type(f"{what}: cannot open the database ({e})"))
            return
        except BaseException as e:
            ready.set_exception(e)
            return
        ready.set_result(None)
        while True:
            job = self._jobs.get()
            if job is None:
                conn.close()
                return
            fn, write, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(transaction(conn, fn) if write and not self.readonly else fn(conn))
            except BaseException as e:
                fut.set_exception(e)

    def _check_open(self) -> None:
        if not self._thread.is_alive():
            raise StoreError(f"{self.path}: the database is closed")

    def _submit(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
        self._check_open()
        fut: Future = Future()
        self._jobs.put((fn, write, fut))
        return fut.result()

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(conn)` in one committed transaction (run as is on a read-only database)."""
        return self._submit(fn, True)

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(conn)` on this thread's read-only connection (it sees every committed write)."""
        self._check_open()
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = _Reader(self.path)
            with self._readers_lock:
                self._readers.add(reader)
        return fn(reader.conn)

    def rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        """The rows of one query."""
        return self.read(lambda c: c.execute(sql, args).fetchall())

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=10)
        with self._readers_lock:
            readers = list(self._readers)
        for reader in readers:
            reader.conn.close()


class _Reader:
    """One thread's read-only connection (`connect(readonly=True)`: no write, whatever a read's `fn`
    tries). The file exists (the writer opened it); in autocommit every statement reads the latest
    commit. Closed when its thread ends (thread-local storage is dropped then), so a server's
    short-lived request threads leave no open files behind."""

    def __init__(self, path: Path):
        self.conn = connect(path, "", readonly=True)

    def __del__(self) -> None:
        if (conn := getattr(self, "conn", None)) is not None:  # None: opening it failed
            conn.close()


def columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})").fetchall()}
