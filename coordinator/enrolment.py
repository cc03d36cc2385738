"""The enrolment registry: which devices belong to the fleet, their public keys, groups and broker logins.

`<state>/enrolment.sqlite` (WAL), written by `fedclip-coord provision` and read by the coordinator
while it runs. Every read is a query, so a device revoked from another process is refused from the
next message on; nothing is cached. Only public material and password hashes are stored: the
device's private key and broker password exist only in its startup kit.

Read API for the coordinator (cheap, thread-safe):
    reg = Enrolment.load(state_dir)
    reg.public_key("cam-01")   # 32 raw Ed25519 bytes; None when unknown or revoked
    reg.is_revoked("cam-01"); reg.groups("cam-01"); reg.enrolled()  # unrevoked ids
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedclip.sdk.broker_acl import COORDINATOR_USER, FleetAcl, Login
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.ids import check_id

DB_NAME = "enrolment.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    agent TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    groups TEXT NOT NULL,
    mosquitto_hash TEXT NOT NULL,
    cert_serial TEXT,
    enrolled_at REAL NOT NULL,
    revoked_at REAL,
    revoked_reason TEXT
);
"""


@dataclass(frozen=True)
class Device:
    agent: str
    public_key: bytes  # raw Ed25519, 32 bytes
    groups: tuple[str, ...]
    mosquitto_hash: str
    cert_serial: str | None
    enrolled_at: float
    revoked_at: float | None = None
    revoked_reason: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def login(self) -> Login:
        return Login(self.agent, self.mosquitto_hash, agent=self.agent)


class Enrolment:
    """The registry of one coordinator state dir. `load` opens an existing one; `create` makes it."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise ConfigError(f"enrolment registry {path}: {e}") from None

    @staticmethod
    def exists(state_dir: str | Path) -> bool:
        return (Path(state_dir) / DB_NAME).is_file()

    @classmethod
    def load(cls, state_dir: str | Path) -> Enrolment:
        if not cls.exists(state_dir):
            raise ConfigError(
                f"{state_dir}: the fleet is not provisioned (no {DB_NAME}); "
                "run `fedclip-coord provision init`"
            )
        return cls(Path(state_dir) / DB_NAME)

    @classmethod
    def create(cls, state_dir: str | Path, fleet: str) -> Enrolment:
        check_id(fleet, "fleet")
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        reg = cls(Path(state_dir) / DB_NAME)
        if reg.fleet not in (None, fleet):
            raise ConfigError(f"{state_dir}: already provisioned for fleet {reg.fleet!r}, not {fleet!r}")
        reg._set_meta("fleet", fleet)
        return reg

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Enrolment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reads ---------------------------------------------------------------------------------
    def _one(self, sql: str, args: tuple = ()):
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key=?", (key,))
        return row[0] if row else None

    @property
    def fleet(self) -> str | None:
        return self._meta("fleet")

    def device(self, agent_id: str) -> Device | None:
        row = self._one("SELECT * FROM devices WHERE agent=?", (agent_id,))
        return _device(row) if row else None

    def public_key(self, agent_id: str) -> bytes | None:
        """The device's raw Ed25519 public key; None for an unknown or revoked device."""
        row = self._one("SELECT public_key FROM devices WHERE agent=? AND revoked_at IS NULL", (agent_id,))
        return bytes(row[0]) if row else None

    def verify_key(self, agent_id: str) -> Ed25519PublicKey | None:
        raw = self.public_key(agent_id)
        return Ed25519PublicKey.from_public_bytes(raw) if raw is not None else None

    def is_revoked(self, agent_id: str) -> bool:
        row = self._one("SELECT revoked_at FROM devices WHERE agent=?", (agent_id,))
        return row is not None and row[0] is not None

    def groups(self, agent_id: str) -> tuple[str, ...]:
        row = self._one("SELECT groups FROM devices WHERE agent=?", (agent_id,))
        return tuple(json.loads(row[0])) if row else ()

    def devices(self) -> list[Device]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM devices ORDER BY agent").fetchall()
        return [_device(r) for r in rows]

    def enrolled(self) -> list[str]:
        """Ids of every unrevoked device."""
        with self._lock:
            rows = self._db.execute("SELECT agent FROM devices WHERE revoked_at IS NULL ORDER BY agent")
            return [r[0] for r in rows.fetchall()]

    def coordinator_login(self) -> Login | None:
        raw = self._meta("coordinator_login")
        if raw is None:
            return None
        d = json.loads(raw)
        return Login(COORDINATOR_USER, d["mosquitto"])

    def broker_acl(self) -> FleetAcl:
        """The broker's users and rules: the coordinator and every unrevoked device."""
        fleet = self.fleet
        if fleet is None:
            raise ConfigError(f"{self.path}: no fleet recorded; run `fedclip-coord provision init`")
        coord = self.coordinator_login()
        logins = ([coord] if coord else []) + [d.login for d in self.devices() if not d.revoked]
        return FleetAcl(fleet, tuple(logins))

    # ---- writes (the provision command) ---------------------------------------------------------
    def _set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def set_coordinator_login(self, login: Login) -> None:
        self._set_meta("coordinator_login", json.dumps({"mosquitto": login.mosquitto}))

    def enrol(self, device: Device) -> None:
        """Add a device, or replace its enrolment (a re-issued kit: new key, new login, unrevoked)."""
        check_id(device.agent, "agent id")
        if len(device.public_key) != 32:
            raise ConfigError(
                f"{device.agent}: an Ed25519 public key has 32 bytes, got {len(device.public_key)}"
            )
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO devices VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                (
                    device.agent,
                    device.public_key,
                    json.dumps(list(device.groups)),
                    device.mosquitto_hash,
                    device.cert_serial,
                    device.enrolled_at or time.time(),
                ),
            )

    def revoke(self, agent_id: str, reason: str = "") -> Device:
        """Mark a device revoked (kept, so its id is never silently re-used); returns its record."""
        dev = self.device(agent_id)
        if dev is None:
            raise ConfigError(f"{agent_id}: no such enrolled device")
        if not dev.revoked:
            with self._lock:
                self._db.execute(
                    "UPDATE devices SET revoked_at=?, revoked_reason=? WHERE agent=?",
                    (time.time(), reason or "revoked", agent_id),
                )
        return self.device(agent_id)  # type: ignore[return-value]  # found above; revoking deletes nothing


def _device(row: tuple) -> Device:
    return Device(row[0], bytes(row[1]), tuple(json.loads(row[2])), *row[3:])


__all__ = ["DB_NAME", "Device", "Enrolment"]
