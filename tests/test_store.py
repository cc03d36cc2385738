"""The coordinator's SQLite store and registry: idempotent, durable, atomic."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedclip.coordinator.registry import Registry
from fedclip.coordinator.store import Store
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
