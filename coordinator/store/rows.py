"""The records the coordinator's store hands out: one frozen dataclass per table, and their decoders.

Fields mirror the table columns (so a round's number is `round`, as in the database and on the wire).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


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
class NewUpdate(UpdateRow):
    """An accepted update to store (`Store.add_updates`). `stats` = (data digest, blob) of statistics
    that travelled with it: they become the agent's held statistics in the same transaction."""

    stats: tuple[str, str] | None = None


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


AGENT_KEYS = ("agent", "online", "bundle_id", "adapter_version", "last_round", "info", "seen_at")


def agent_dict(r: tuple) -> dict[str, Any]:
    """An `agents` row as the dict `Store.agents` returns (the `status` command reads it by key)."""
    d = dict(zip(AGENT_KEYS, r, strict=True))
    d["online"] = bool(d["online"])
    d["info"] = json.loads(d["info"] or "{}")
    return d


def agent_values(
    agent: str,
    online: bool,
    bundle_id: str,
    adapter_version: str,
    last_round: int,
    info: dict[str, Any],
    seen_at: float,
) -> tuple:
    """The `agents` row of one status, in column order (`AGENT_KEYS`)."""
    return (
        agent,
        int(online),
        bundle_id,
        adapter_version,
        last_round,
        json.dumps(info, sort_keys=True),
        seen_at,
    )


def round_row(r: tuple) -> RoundRow:
    return RoundRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8])


def update_row(r: tuple) -> UpdateRow:
    return UpdateRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], bool(r[7]), r[8])


def version_row(r: tuple) -> VersionRow:
    return VersionRow(
        r[0], r[1] or "", r[2], r[3] or "", r[4], r[5] or "", r[6], json.loads(r[7] or "{}"), r[8]
    )


def version_values(v: VersionRow) -> tuple:
    """The `versions` row of `v`, in column order."""
    metrics = json.dumps(v.metrics, sort_keys=True)
    return (v.version, v.parent, v.round, v.strategy, v.scope, v.agent, v.blob, metrics, v.created_at)
