"""The coordinator's durable state: SQLite (WAL) plus content-addressed blobs on disk.

One thread owns the connection (`db.Database`); every call runs there in order and returns when its
transaction has committed, so "stored" means "on disk" (synchronous=FULL). Blobs are written
(tmp + fsync + rename) before the row that names them, so a row never points at a missing blob; a
crash between the two leaves an orphan blob, which costs space, never correctness. A batch of updates
(group commit) goes the same way: all its blobs durable (`Blobs.put_many`), then all its rows in one
transaction (`Store.add_updates`).

Rooms: `db` (opening, transactions, the one-thread model the rollout store shares), `blobs`
(content-addressed files), `rows` (the records handed out), `state` (the tables and their queries).
"""

from fedclip.coordinator.store.blobs import Blobs, BlobTensors
from fedclip.coordinator.store.db import Database, StoreError
from fedclip.coordinator.store.rows import NewUpdate, RoundRow, StatsRow, UpdateRow, VersionRow
from fedclip.coordinator.store.state import DB_NAME, SCHEMA_VERSION, Store

__all__ = [
    "DB_NAME", "SCHEMA_VERSION", "BlobTensors", "Blobs", "Database", "NewUpdate", "RoundRow", "StatsRow",
    "Store", "StoreError", "UpdateRow", "VersionRow",
]  # fmt: skip
