"""A read-only view of a coordinator state dir as plain JSON-ready records with stable field names.

One source for everything an operator reads: `status --json`, `adapters list --json`, `rollout ...
--json`, the dashboard's `/api/fleet` and the Prometheus collector all build on the records here, so
a field means the same thing everywhere (docs/operations.md lists them). Nothing here writes: the
coordinator database is read through `Store(readonly=True)` and, for the aggregates the store has no
method for (per-round update counts and bytes, the tasks' sizes), a `mode=ro` SQLite connection of
our own; the rollout database only through `RolloutStore` once it exists.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedclip.coordinator.metrics import METRICS_FILE, MetricsLog
from fedclip.coordinator.rollout_store import DB_NAME as ROLLOUT_DB
from fedclip.coordinator.rollout_store import RolloutRow, RolloutStore
from fedclip.coordinator.store import DB_NAME, Store, VersionRow
from fedclip.coordinator.store.db import connect

SCHEMA = 1  # bumped only when a field changes meaning or goes away; new fields may appear any time

# Rejection reasons are free text naming agents and values; metrics and charts need a bounded set.
# First match wins, so the more specific needles come first.
_REJECTION_KINDS = (
    ("late:", "late"),
    ("not the current round", "wrong_round"),
    ("not selected", "not_selected"),
    ("claims to be from", "wrong_sender"),
    ("exceeds the limit", "too_large"),
    ("norm", "norm_bound"),
    ("already accepted", "conflict"),
    ("signature", "signature"),
    ("statistic", "statistics"),
    ("metric", "metrics"),
    ("not a safetensors", "malformed"),
    ("not valid json", "malformed"),
    ("malformed", "malformed"),
    ("non-finite", "tensors"),
    ("shape", "tensors"),
    ("dtype", "tensors"),
    ("tensor", "tensors"),
    ("missing", "tensors"),
    ("built on", "wrong_base"),
    ("bundle", "wrong_bundle"),
)
REJECTION_KINDS = tuple(dict.fromkeys(k for _, k in _REJECTION_KINDS)) + ("other",)


def rejection_kind(reason: str) -> str:
    """The bounded category of a rejection reason (one of REJECTION_KINDS)."""
    low = reason.lower()
    return next((kind for needle, kind in _REJECTION_KINDS if needle in low), "other")


def finite(x: Any) -> Any:
    """NaN and infinities become None: JSON has no such numbers and browsers refuse them."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def version_record(v: VersionRow) -> dict[str, Any]:
    return {
        "version": v.version,
        "parent": v.parent or None,
        "round": v.round,
        "scope": v.scope,
        "agent": v.agent or None,
        "strategy": v.strategy,
        "metrics": finite(v.metrics),
        "created_at": v.created_at,
    }


def rollout_record(store: RolloutStore, r: RolloutRow, detail: bool = True) -> dict[str, Any]:
    """One rollout; with `detail` its stages and every target's acknowledgement (or "pending")."""
    out: dict[str, Any] = {
        "id": r.id,
        "version": r.version,
        "target": r.target,
        "canary": r.canary,
        "max_regression": r.max_regression,
        "min_acks": r.min_acks,
        "stage_timeout": r.stage_timeout,
        "state": r.state,
        "reason": r.reason or None,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "skipped": list(r.skipped),
        "targets": list(r.targets),
        "fallback": r.fallback,
    }
    if not detail:
        return out
    stages = store.stages(r.id)
    acks = {a.agent: a for a in store.acks(r.id)}
    out["stages"] = [
        {
            "name": s.name,
            "agents": list(s.agents),
            "state": s.state,
            "started_at": s.started_at,
            "deadline": s.deadline,
            "decided_at": s.decided_at,
            "mean_regression": s.mean_regression,
            "reason": s.reason or None,
        }
        for s in stages
    ]
    out["acks"] = []
    for s in stages:
        for agent in s.agents:
            a = acks.get(agent)
            out["acks"].append(
                {
                    "agent": agent,
                    "stage": s.name,
                    "status": a.status if a else "pending",
                    "version": (a.version or None) if a else None,
                    "current_accuracy": a.current_accuracy if a else None,
                    "new_accuracy": a.new_accuracy if a else None,
                    "regression": a.regression if a else None,
                    "num_samples": a.num_samples if a else None,
                    "reason": (a.reason or None) if a else None,
                }
            )
    return finite(out)


class FleetView:
    """Read-only records of one state dir; use as a context manager or `close()`. One caller at a
    time (the ops server serializes its requests): the caches below are plain dicts.

    Raises ConfigError (one line) when the dir holds no coordinator state.
    """

    def __init__(self, state: str | Path):
        self.dir = Path(state)
        self.store = Store(self.dir, readonly=True)
        self._lock = threading.Lock()
        self._conn = connect(self.dir / DB_NAME, "", readonly=True)
        self._task_sizes: dict[str, int] = {}  # blobs are content-addressed: a size never changes
        self._closed_tasks: dict[int, tuple[int, int]] = {}  # per closed round, see _per_round_tasks
        self._log = MetricsLog(self.dir / METRICS_FILE)
        self._log_key: tuple[int, int] | None = None
        self._log_records: list[dict[str, Any]] = []
        self._rollouts: RolloutStore | None = None  # opened once rollout.sqlite exists

    def close(self) -> None:
        self.store.close()
        with self._lock:
            self._conn.close()
            if self._rollouts is not None:
                self._rollouts.close()

    def __enter__(self) -> FleetView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- queries the store has no method for (read-only, our own connection) ---------------------
    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _per_round_updates(self) -> dict[int, tuple[int, int]]:
        """round -> (accepted updates, bytes received)."""
        has_bytes = any(r[1] == "wire_bytes" for r in self._q("PRAGMA table_info(updates)"))
        total = "COALESCE(SUM(wire_bytes), 0)" if has_bytes else "0"
        rows = self._q(f"SELECT round, COUNT(*), {total} FROM updates GROUP BY round")
        return {r: (n, b) for r, n, b in rows}

    def _per_round_tasks(self, closed_upto: int) -> dict[int, tuple[int, int]]:
        """round -> (selected agents, bytes of the task messages sent to them, last issue each).

        A closed round's tasks never change, so rounds up to `closed_upto` (every earlier round is
        closed too) are summed once and kept; each call reads only the selections after them."""
        done = self._closed_tasks
        upto = max(done, default=0)
        out: dict[int, list[int]] = {}
        for rnd, blob in self._q("SELECT round, task_blob FROM selections WHERE round > ?", (upto,)):
            size = self._task_sizes.get(blob)
            if size is None:
                # a blob that was never written (tests) or was removed: count nothing
                size = self.store.blobs.size(blob) or 0
                if rnd > closed_upto:
                    self._task_sizes[blob] = size  # an open round's tasks are looked up again
            acc = out.setdefault(rnd, [0, 0])
            acc[0] += 1
            acc[1] += size
        fresh = {r: (n, b) for r, (n, b) in out.items()}
        done.update({r: v for r, v in fresh.items() if r <= closed_upto})
        if len(self._task_sizes) > 100_000:  # bound the memory of a long-running view
            self._task_sizes.clear()
        return {**done, **fresh}

    def _log_by_round(self) -> dict[int, dict[str, Any]]:
        """The last metrics.jsonl record of each round, re-read only when the file changed."""
        try:
            st = self._log.path.stat()
            key = (st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        if key != self._log_key:
            self._log_records = self._log.read() if key else []
            self._log_key = key
        return {int(r["round"]): r for r in self._log_records if isinstance(r.get("round"), int)}

    # ---- records ------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        rounds = self.store.rounds()
        counts = {s: 0 for s in ("collecting", "aggregated", "failed")}
        for r in rounds:
            counts[r.state] = counts.get(r.state, 0) + 1
        last = rounds[-1] if rounds else None
        return {
            "schema": SCHEMA,
            "fleet": self.store.get_meta("fleet"),
            "bundle_id": self.store.get_meta("bundle_id"),
            "strategy": self.store.get_meta("strategy"),
            "global_version": self.store.head("global"),
            "round_counts": {
                **counts,
                "last": last.round if last else None,
                "last_state": last.state if last else None,
            },
        }

    def fleet_metrics(self) -> dict[str, Any]:
        """The fleet's weighted metrics of the last aggregated round, and which round that was."""
        done = [r for r in self.store.rounds() if r.state == "aggregated"]
        if not done:
            return {"round": None, "metrics": {}}
        rnd = done[-1].round
        return {
            "round": rnd,
            "metrics": finite({n: v for _, a, n, v in self.store.metrics(rnd) if a == ""}),
        }

    def _fleet_metrics_by_round(self) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for rnd, name, value in self._q("SELECT round, name, value FROM metrics WHERE agent=''"):
            out.setdefault(rnd, {})[name] = value
        return out

    def _last_agent_metrics(self) -> dict[str, tuple[int, dict[str, float]]]:
        """agent -> (round, metrics) of the latest round it has metrics for; one pass in SQLite, not
        every row of every round in Python (a large fleet has millions)."""
        rows = self._q(
            "SELECT m.agent, m.round, m.name, m.value FROM metrics m JOIN "
            "(SELECT agent, MAX(round) AS r FROM metrics WHERE agent != '' GROUP BY agent) l "
            "ON m.agent = l.agent AND m.round = l.r"
        )
        out: dict[str, tuple[int, dict[str, float]]] = {}
        for agent, rnd, name, value in rows:
            out.setdefault(agent, (rnd, {}))[1][name] = value
        return out

    def agents(self, metrics: bool = True) -> list[dict[str, Any]]:
        """Every known agent; `metrics=False` skips their latest metrics (the costly part, which
        `/metrics` does not export): `metrics_round` is then None and `metrics` {}."""
        heads = {v.agent: v.version for v in self.store.versions("agent")}
        last = self._last_agent_metrics() if metrics else {}
        out = []
        for a in self.store.agents():
            info = a["info"]
            groups = info.get("groups", [])
            m_round, agent_metrics = last.get(a["agent"], (None, {}))
            out.append(
                {
                    "agent": a["agent"],
                    "online": a["online"],
                    "bundle_id": a["bundle_id"] or None,
                    "adapter_version": a["adapter_version"] or None,
                    "personal_version": heads.get(a["agent"]),
                    # the device serves its adapter tuned on its own images (agent `personal:`)
                    "device_tuning": finite(info.get("personal") or {}) or None,
                    # ... or is tuning it: {adapter, epoch (from 1), epochs}, as its last status said
                    "tuning_progress": info.get("tuning") or None,
                    # the fleet's adapter it keeps beside that one for its open-set gate (--fallback)
                    "open_set_fallback": info.get("fallback") or None,
                    "last_round": a["last_round"],
                    "groups": [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else [],
                    "device": info.get("device"),
                    "seen_at": a["seen_at"],
                    "metrics_round": m_round,
                    "metrics": finite(agent_metrics),
                }
            )
        return out

    def rounds(self, limit: int | None = None) -> list[dict[str, Any]]:
        rows = self.store.rounds()
        # rounds run one at a time: every round before the first still collecting is closed
        closed_upto = next(
            (r.round - 1 for r in rows if r.state == "collecting"), rows[-1].round if rows else 0
        )
        updates, logged = self._per_round_updates(), self._log_by_round()
        tasks, fleet = self._per_round_tasks(closed_upto), self._fleet_metrics_by_round()
        if limit is not None:
            rows = rows[-limit:]
        out = []
        for r in rows:
            n_up, b_in = updates.get(r.round, (0, 0))
            n_sel, b_out = tasks.get(r.round, (0, 0))
            rec = logged.get(r.round, {})
            out.append(
                {
                    "round": r.round,
                    "state": r.state,
                    "strategy": r.strategy,
                    "loss": rec.get("loss"),  # metrics.jsonl, at close (none before session 17)
                    "started_at": r.started_at,
                    "deadline": r.deadline,
                    "extended": r.extended,
                    "closed_at": r.closed_at,
                    "duration_s": (r.closed_at - r.started_at) if r.closed_at and r.started_at else None,
                    "aggregate_s": rec.get("aggregate_seconds"),
                    "reason": r.reason,
                    "global_version": r.global_version,
                    "selected": n_sel,
                    "updates": n_up,
                    "bytes_in": b_in,
                    "bytes_out": b_out,
                    "metrics": finite(fleet.get(r.round, {})),
                }
            )
        return out

    def versions(self) -> list[dict[str, Any]]:
        return [version_record(v) for v in self.store.versions()]

    def rejections(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._q(
            "SELECT id, at, topic, agent, round, reason FROM rejections ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [
            {"id": i, "at": at, "topic": t, "agent": a, "round": rnd, "kind": rejection_kind(reason or ""),
             "reason": reason}
            for i, at, t, a, rnd, reason in rows
        ]  # fmt: skip

    def rejection_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(REJECTION_KINDS, 0)
        for reason, n in self._q("SELECT reason, COUNT(*) FROM rejections GROUP BY reason"):
            counts[rejection_kind(reason or "")] += n
        return counts

    def rollouts(self, limit: int = 20) -> list[dict[str, Any]]:
        if self._rollouts is None:
            path = self.dir / ROLLOUT_DB
            if not path.is_file():  # no rollout yet: never create the database from a read-only view
                return []
            with self._lock:
                self._rollouts = self._rollouts or RolloutStore(path)
        return [rollout_record(self._rollouts, r) for r in self._rollouts.rollouts(limit)]

    def document(self, round_limit: int = 500, version_limit: int = 500) -> dict[str, Any]:
        """Everything the dashboard shows, in one JSON document (`GET /api/fleet`)."""
        return {
            **self.summary(),
            "generated_at": time.time(),
            "fleet_metrics": self.fleet_metrics(),
            "agents": self.agents(),
            "rounds": self.rounds(round_limit),
            "versions": self.versions()[-version_limit:],
            "rollouts": self.rollouts(),
            "rejections": self.rejections(),
            "rejection_counts": self.rejection_counts(),
        }


def groups_of(agents: Iterable[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """(group, bundle_id[:12]) -> online agents; an agent in no group counts under group ""."""
    out: dict[tuple[str, str], int] = {}
    for a in agents:
        if not a["online"]:
            continue
        for g in a["groups"] or [""]:
            key = (g, (a["bundle_id"] or "")[:12])
            out[key] = out.get(key, 0) + 1
    return out
