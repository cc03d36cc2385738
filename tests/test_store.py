"""The coordinator's SQLite store and registry: idempotent, durable, atomic."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedclip.coordinator.registry import Registry
from fedclip.coordinator.store import Store, StoreError
from fedclip.coordinator.strategies.base import AggregateResult
from fedclip.sdk.adapters import load_adapter
from fedclip.sdk.errors import AdapterError, ConfigError


def test_update_is_stored_once_and_redelivery_is_idempotent(tmp_path):
    with Store(tmp_path) as s:
        s.start_round(1, "fedavg", 123.0, [("a", "g-r0", "sha-task")])
        blob = s.blobs.put(b"tensors")
        assert s.add_update(1, "a", "h1", blob, 10, {"loss": 1.0}, 0.5, False) == "stored"
        assert s.add_update(1, "a", "h1", blob, 10, {"loss": 1.0}, 0.5, False) == "duplicate"
        assert s.add_update(1, "a", "h2", blob, 10, {"loss": 1.0}, 0.5, False) == "conflict"
        assert [u.sha256 for u in s.updates(1)] == ["h1"]
    with Store(tmp_path) as s:  # reopened: still exactly one
        assert len(s.updates(1)) == 1
        assert s.selections(1) == {"a": ("g-r0", "sha-task")}
        assert s.blobs.get(blob) == b"tensors"


def test_update_survives_kill_9_right_after_commit(tmp_path):
    # A separate interpreter stores an update and dies with SIGKILL at once: no close(), no flush.
    code = textwrap.dedent(f"""
        import os, signal
        from fedclip.coordinator.store import Store
        s = Store({str(tmp_path)!r})
        s.start_round(1, "fedavg", 1.0, [("a", "v", "t"), ("b", "v", "t")])
        assert s.add_update(1, "a", "h1", s.blobs.put(b"x"), 3, {{}}, None, False) == "stored"
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    with Store(tmp_path) as s:
        assert [(u.agent, u.sha256) for u in s.updates(1)] == [("a", "h1")]
        assert s.get_round(1).state == "collecting"
        assert s.add_update(1, "a", "h1", s.blobs.put(b"x"), 3, {}, None, False) == "duplicate"


def test_round_lifecycle(tmp_path):
    with Store(tmp_path) as s:
        s.start_round(1, "fedavg", 10.0, [])
        s.extend_round(1, 20.0)
        r = s.get_round(1)
        assert r.extended and r.deadline == 20.0
        s.fail_round(1, "quorum not reached")
        assert s.last_round().state == "failed"
        s.fail_round(1, "again")  # a closed round stays as it was
        assert s.get_round(1).reason == "quorum not reached"
        with pytest.raises(sqlite3.IntegrityError):  # one row per round id
            s.start_round(1, "fedavg", 10.0, [])
        assert s.count_rounds("failed") == 1


def test_registry_versions_lineage_and_export(tmp_path):
    t0 = {"c": np.eye(2, dtype=np.float32)}
    with Store(tmp_path) as s:
        reg = Registry(s, "bundle1", "tri-lora")
        assert reg.ensure_initial(t0, "ce-lora") == "g-r0"
        assert reg.ensure_initial({"c": np.zeros((2, 2), np.float32)}, "ce-lora") == "g-r0"  # once
        s.start_round(1, "ce-lora", 1.0, [("x", "g-r0", "t")])
        res = AggregateResult({"c": 2 * t0["c"]}, {"x": {"c": 3 * t0["c"]}})
        gv = reg.commit_round(1, "ce-lora", res, {"x": "g-r0"}, {"x": {"loss": 0.5}}, {"loss": 0.5})
        assert gv == "g-r1" and s.get_round(1).state == "aggregated"
        assert reg.global_adapter().version == "g-r1"
        np.testing.assert_array_equal(reg.agent_adapter("x").tensors["c"], 3 * t0["c"])
        assert reg.agent_adapter("y") is None
        row = reg.show("a-x-r1")
        assert (row.parent, row.round, row.strategy, row.scope, row.metrics) == (
            "g-r0",
            1,
            "ce-lora",
            "agent",
            {"loss": 0.5},
        )
        assert reg.show("g-r1").parent == "g-r0"
        assert [v.version for v in reg.list()] == ["g-r0", "g-r1", "a-x-r1"]
        out = reg.export("a-x-r1", tmp_path / "x.safetensors")
        tensors, meta = load_adapter(out)
        assert meta.version == "a-x-r1" and meta.agent == "x" and meta.bundle_id == "bundle1"
        np.testing.assert_array_equal(tensors["c"], 3 * t0["c"])
        with pytest.raises(AdapterError, match="not in the registry"):
            reg.show("nope")
        assert s.metrics(1) == [(1, "", "loss", 0.5), (1, "x", "loss", 0.5)]


def test_readonly_store_needs_existing_state(tmp_path):
    with pytest.raises(ConfigError, match="no coordinator state"):
        Store(tmp_path / "missing", readonly=True)
    with Store(tmp_path) as s:
        s.set_meta("k", "v")
    with Store(tmp_path, readonly=True) as s:
        assert s.get_meta("k") == "v"


def test_update_and_held_statistics_commit_together(tmp_path):
    with Store(tmp_path) as s:
        s.start_round(1, "ce-lora", 1.0, [("a", "g-r0", "t"), ("b", "g-r0", "t")])
        stats_blob = s.blobs.put(b"stats")
        out = s.add_update(1, "a", "h1", s.blobs.put(b"u"), 3, {}, None, False, 1234, ("d1", stats_blob))
        assert out == "stored"
        assert s.updates(1)[0].wire_bytes == 1234
        held = s.agent_stats("a")
        assert (held.agent, held.round, held.data_digest, held.blob) == ("a", 1, "d1", stats_blob)
        # a redelivery or a conflicting copy changes neither the update nor the held statistics
        assert s.add_update(1, "a", "h2", s.blobs.put(b"v"), 3, {}, None, False, 9, ("d2", "x")) == "conflict"
        assert s.agent_stats("a") == held
        # the statistics row fails to insert: the update is rolled back with it (one transaction)
        with sqlite3.connect(tmp_path / "coordinator.sqlite") as other:
            other.execute(
                "CREATE TRIGGER no_stats BEFORE INSERT ON agent_stats BEGIN SELECT RAISE(ABORT, 'boom'); END"
            )
        with pytest.raises(sqlite3.IntegrityError, match="boom"):
            s.add_update(1, "b", "h3", s.blobs.put(b"w"), 3, {}, None, False, 10, ("d3", stats_blob))
        assert [u.agent for u in s.updates(1)] == ["a"] and s.agent_stats("b") is None
        # an update without travelled statistics leaves the held ones alone
        assert s.add_update(1, "b", "h3", s.blobs.put(b"w"), 3, {}, None, False, 10) == "stored"
        assert s.agent_stats("b") is None and s.updates(1)[1].wire_bytes == 10


# The tables as the first release created them: no updates.wire_bytes, no agent_stats.
_OLD_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE updates(
    round INTEGER NOT NULL, agent TEXT NOT NULL, sha256 TEXT NOT NULL, blob TEXT NOT NULL,
    num_samples INTEGER NOT NULL, metrics TEXT NOT NULL, norm REAL, clipped INTEGER NOT NULL,
    received_at REAL, PRIMARY KEY(round, agent));
INSERT INTO meta VALUES('schema', '1');
INSERT INTO updates VALUES(1, 'a', 'h1', 'blob1', 5, '{}', 0.5, 0, 1.0);
"""


def test_a_state_dir_from_before_opens_and_upgrades_in_place(tmp_path):
    conn = sqlite3.connect(tmp_path / "coordinator.sqlite")
    conn.executescript(_OLD_SCHEMA)
    conn.close()
    with Store(tmp_path, readonly=True) as s:  # a read-only open (status) changes nothing
        assert [(u.agent, u.wire_bytes) for u in s.updates(1)] == [("a", None)]
        assert s.agent_stats("a") is None
    with Store(tmp_path) as s:
        assert [(u.agent, u.wire_bytes) for u in s.updates(1)] == [("a", None)]  # old rows: NULL
        assert s.add_update(1, "b", "h2", "blob2", 5, {}, None, False, 77, ("d", "sb")) == "stored"
        assert [u.wire_bytes for u in s.updates(1)] == [None, 77]
        assert s.agent_stats("b").data_digest == "d"
    with Store(tmp_path) as s:  # upgraded once: opening again is a no-op
        assert len(s.updates(1)) == 2


def test_blobs_are_named_by_content_and_read_by_tensor(tmp_path):
    from fedclip.sdk.adapters import encode_tensors

    with Store(tmp_path) as s:
        tensors = {"x": np.arange(4, dtype=np.float32), "stats/mean": np.ones((2, 3), np.float32)}
        data = encode_tensors(tensors, {})
        sha = s.blobs.put(data)
        assert s.blobs.put(data) == sha and s.blobs.has(sha) and s.blobs.size(sha) == len(data)
        assert not s.blobs.has("0" * 64) and s.blobs.size("0" * 64) is None
        assert list(s.blobs.read_tensors(sha, ["stats/mean", "absent"])) == ["stats/mean"]
        lazy = s.blobs.tensors(sha, ("x",))
        assert list(lazy) == ["x"] and len(lazy) == 1
        np.testing.assert_array_equal(lazy["x"], tensors["x"])
        with pytest.raises(KeyError):
            lazy["stats/mean"]  # only the names it was given
        with pytest.raises(StoreError, match="is missing"):
            s.blobs.get("0" * 64)


def test_a_closed_store_refuses_calls_instead_of_waiting_forever(tmp_path):
    s = Store(tmp_path)
    s.set_meta("k", "v")
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get_meta("k")


def test_the_rollout_store_shares_the_one_thread_model(tmp_path):
    """Calls from many threads run one at a time on the database's own thread, none lost."""
    import threading

    from fedclip.coordinator.rollout_store import RolloutStore

    store = RolloutStore(tmp_path / "rollout.sqlite")
    try:
        threads = [threading.Thread(target=store.event, args=(None, f"e{i}")) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        rows = store.db.rows("SELECT event FROM rollout_events ORDER BY id")
        assert sorted(r[0] for r in rows) == sorted(f"e{i}" for i in range(20))
    finally:
        store.close()


def test_reads_run_on_the_calling_thread_and_see_every_commit(tmp_path):
    """A read takes its thread's own connection (no hand-off to the writer's thread), sees what was
    committed just before, from any thread, and cannot write."""
    import threading

    with Store(tmp_path) as s:
        s.set_meta("k", "1")
        seen: dict[str, object] = {}

        def reader(name: str) -> None:
            seen[name] = (s.get_meta("k"), s.db.read(lambda c: threading.get_ident()))

        for value in ("2", "3"):  # each write, then a fresh thread reads it
            s.set_meta("k", value)
            t = threading.Thread(target=reader, args=(value,))
            t.start()
            t.join(30)
            assert seen[value] == (value, t.ident)  # the new value, read on that thread
        assert s.db.read(lambda c: threading.get_ident()) == threading.get_ident()
        # The readers' threads have ended: their connections are closed (a server's request threads
        # must not leave open files behind), only the writer's and this thread's are left.
        db_file = str(tmp_path / "coordinator.sqlite")
        fds = [f for f in os.listdir("/proc/self/fd") if _points_to(f"/proc/self/fd/{f}", db_file)]
        assert len(fds) == 2
        assert s.get_meta("k") == "3"
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            s.db.read(lambda c: c.execute("DELETE FROM meta"))
        assert s.get_meta("k") == "3"


def _points_to(link: str, path: str) -> bool:
    try:
        return os.readlink(link) == path
    except OSError:  # closed meanwhile
        return False


def test_the_registry_keeps_versions_in_memory_up_to_its_byte_budget(tmp_path, monkeypatch):
    """Versions never change: their tensors are cached, least recently used out first."""
    from fedclip.coordinator import registry as registry_mod

    t0 = {"c": np.zeros((4, 4), np.float32)}  # 64 bytes per version
    monkeypatch.setattr(registry_mod, "CACHE_BYTES", 3 * 64)
    with Store(tmp_path) as s:
        reg = Registry(s, "bundle1", "tri-lora")
        reg.ensure_initial(t0, "ce-lora")
        agents = [f"a{i}" for i in range(4)]
        s.start_round(1, "ce-lora", 1.0, [(a, "g-r0", "t") for a in agents])
        res = AggregateResult(t0, {a: {"c": np.full((4, 4), i, np.float32)} for i, a in enumerate(agents)})
        reg.commit_round(1, "ce-lora", res, dict.fromkeys(agents, "g-r0"), {}, {})
        loads: list[str] = []
        load = reg.load
        monkeypatch.setattr(reg, "load", lambda v: (loads.append(v), load(v))[1])
        first = reg.tensors("a-a0-r1")
        for a in ("a1", "a2", "a0"):  # a0 used again: a1 is now the least recent
            reg.tensors(f"a-{a}-r1")
        assert reg.tensors("a-a0-r1") is first  # from memory, the same arrays
        reg.tensors("a-a3-r1")  # a fourth version: over the budget, a1 goes
        assert loads == ["a-a0-r1", "a-a1-r1", "a-a2-r1", "a-a3-r1"]
        np.testing.assert_array_equal(reg.tensors("a-a1-r1")["c"], np.full((4, 4), 1, np.float32))
        assert loads[-1] == "a-a1-r1"  # read again from the store


def test_a_batch_of_updates_commits_together_and_dedupes_within_itself(tmp_path):
    """Group commit: one transaction for a batch; a second copy in the same batch is a duplicate,
    a different second update a conflict; the batch's rejections land in the same transaction."""
    from fedclip.coordinator.store import NewUpdate

    with Store(tmp_path) as s:
        s.start_round(1, "fedavg", 1.0, [(a, "g-r0", "t") for a in "abc"])
        blobs = s.blobs.put_many([b"a", b"b", b"a", b"c"])
        assert blobs[0] == blobs[2] and len(set(blobs)) == 3  # same bytes, same blob, written once
        rows = [
            NewUpdate(1, "a", "h-a", blobs[0], 1, {}, 0.1, False, stats=("d", blobs[0])),
            NewUpdate(1, "b", "h-b", blobs[1], 2, {}, 0.2, False, wire_bytes=9),
            NewUpdate(1, "a", "h-a", blobs[2], 1, {}, 0.1, False),  # a redelivery in the batch
            NewUpdate(1, "b", "h-x", blobs[3], 2, {}, 0.2, False),  # a different one: conflict
        ]
        reject = [("agents/c/update", "c", 1, "bad")]
        assert s.add_updates(rows, reject) == ["stored", "stored", "duplicate", "conflict"]
        assert [(u.agent, u.sha256, u.wire_bytes) for u in s.updates(1)] == [
            ("a", "h-a", None),
            ("b", "h-b", 9),
        ]
        assert s.agent_stats("a").blob == blobs[0]
        assert s.rejections() == [("agents/c/update", "c", 1, "bad")]
        assert s.add_updates([rows[1]]) == ["duplicate"]  # later batches see it too
        assert [s.blobs.get(b) for b in blobs] == [b"a", b"b", b"a", b"c"]
    leftovers = [p for p in (tmp_path / "blobs").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_failed_batch_of_blobs_leaves_no_partial_file(tmp_path):
    """A batch whose second file cannot be created (a folder squats on its temp name) raises and
    leaves neither a blob nor a temp file of the first; the store is usable afterwards."""
    import os

    from fedclip.sdk.hashing import sha256_bytes

    with Store(tmp_path) as s:
        data = [b"first", b"second"]
        second = sha256_bytes(data[1])
        squatter = tmp_path / "blobs" / second[:2] / f".{second}.{os.getpid()}.tmp"
        squatter.mkdir(parents=True)
        with pytest.raises(IsADirectoryError):
            s.blobs.put_many(data)
        assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []
        squatter.rmdir()
        assert s.blobs.put_many(data) == [sha256_bytes(d) for d in data]
        assert [s.blobs.get(sha256_bytes(d)) for d in data] == data


def test_put_all_takes_blobs_lazily_in_batches(tmp_path):
    """A round's task or adapter blobs: stored batch by batch as the generator yields them, so at most
    one batch is held; shas in order, duplicates stored once."""
    from fedclip.sdk.hashing import sha256_bytes

    data = [f"blob {i % 7}".encode() for i in range(23)]
    taken: list[int] = []

    def gen():
        for i, d in enumerate(data):
            taken.append(i)
            yield d

    with Store(tmp_path) as s:
        stored_before: list[int] = []
        real = s.blobs.put_many
        s.blobs.put_many = lambda chunk: (stored_before.append(len(taken)), real(chunk))[1]  # type: ignore[method-assign]  # watch the batches
        assert s.blobs.put_all(gen(), batch=5) == [sha256_bytes(d) for d in data]
        assert stored_before == [5, 10, 15, 20, 23]  # each batch stored before the next is taken
        assert [s.blobs.get(sha256_bytes(d)) for d in data] == data
