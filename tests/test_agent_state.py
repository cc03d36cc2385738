"""The agent's state dir: atomic writes, resume bookkeeping, one update per round, locking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedclip.device_agent.rounds import fleet_gain
from fedclip.device_agent.state import AgentState, current_adapter_path, read_record
from fedclip.device_agent.state_rounds import BUILT, DONE
from fedclip.device_agent.state_summary import summarize
from fedclip.sdk.adapters import AdapterMeta, load_adapter
from fedclip.sdk.errors import ConfigError, StateError
from fedclip.sdk.fsutil import atomic_write
from fedclip.sdk.ledger import Ledger
from fedclip.sdk.messages import FLEET_GAIN, Task

BUNDLE = "b" * 64


def _open(root: Path, **kw) -> AgentState:
    args = {"agent_id": "dev-1", "fleet": "f1", "bundle_id": BUNDLE} | kw
    return AgentState(root, **args)


def _fake_ckpt(content: bytes):
    def write(path: Path) -> None:
        path.write_bytes(content)

    return write


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_kill_during_writes_never_leaves_a_torn_state_file(tmp_path):
    """A child process rewrites state.json in a loop and is killed -9; what remains parses."""
    root = tmp_path / "state"
    _open(root).close()
    script = textwrap.dedent(f"""
        from fedclip.device_agent.state import AgentState
        s = AgentState({str(root)!r}, agent_id="dev-1", fleet="f1", bundle_id={BUNDLE!r})
        s.begin_round(1, b"task")
        print("ready", flush=True)
        i = 0
        while True:  # every call rewrites state.json; the record's size varies from call to call
            s.save_progress(1, steps_done=i, train_metrics=dict.fromkeys(map(str, range(i % 300)), 0.0))
            i += 1
    """)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        proc.kill()
        proc.wait(timeout=30)
        record = read_record(root)
        assert record["agent_id"] == "dev-1"
    # The next open sweeps whatever temp file the kill left behind.
    _open(root).close()
    assert not list(root.glob(".*.tmp"))


def test_round_lifecycle_and_summary(tmp_path):
    s = _open(tmp_path)
    assert s.last_round == -1 and s.in_progress() is None
    s.begin_round(3, b"task-3")
    assert s.in_progress().round == 3 and s.task_blob(3) == b"task-3"
    s.save_progress(3, save_checkpoint=_fake_ckpt(b"e1"), epochs_done=1, steps_done=10)
    s.save_progress(3, save_checkpoint=_fake_ckpt(b"e2"), epochs_done=2, steps_done=20)
    prog = s.in_progress()
    assert prog.checkpoint == "rounds/3/ckpt-2" and s.checkpoint_path(prog).read_bytes() == b"e2"
    assert not (tmp_path / "rounds/3/ckpt-1").exists()  # the replaced checkpoint is gone
    s.store_update(
        3,
        b"update-3",
        {"metrics": {"accuracy_after": 0.5}, "num_samples": 7},
        save_trainer_checkpoint=_fake_ckpt(b"trainer"),
    )
    assert s.round_status(3) == BUILT and s.pending_updates() == [3]
    assert s.in_progress() is None
    assert sorted(p.name for p in (tmp_path / "rounds/3").iterdir()) == ["update.bin"]
    assert s.trainer_checkpoint().read_bytes() == b"trainer"
    s.mark_published(3)
    assert s.round_status(3) == DONE and s.pending_updates() == []
    s.close()

    info = summarize(tmp_path)
    assert info["last_round"] == 3 and info["rounds_done"] == 1
    assert info["last_metrics"] == {"accuracy_after": 0.5}


def _built(s: AgentState, rnd: int, steps, accuracy_after: float, scoring: str = "held-out A") -> None:
    s.begin_round(rnd, b"task")
    metrics = {"accuracy_after": accuracy_after, "steps": steps}
    s.store_update(
        rnd, b"u", {"metrics": metrics, "scoring": scoring}, save_trainer_checkpoint=_fake_ckpt(b"t")
    )


def test_the_fleet_gain_compares_the_fleets_adapter_with_the_last_one_trained(tmp_path):
    s = _open(tmp_path)
    assert s.last_trained_summary(9) is None
    _built(s, 2, 10, 0.6)
    _built(s, 4, 0, 0.3)  # statistics only (a newcomer's first): trained nothing
    _built(s, 5, 10, 0.9)
    _built(s, 6, None, 0.1)  # a record without a step count is not taken for a trained round
    assert s.last_trained_summary(5)["metrics"]["accuracy_after"] == 0.6  # before 5, not 4
    last = s.last_trained_summary(7)
    assert last["metrics"]["accuracy_after"] == 0.9
    s.close()
    task = Task(7, BUNDLE, 100.0, adapter={"w": np.zeros(2, np.float32)})
    before = {"accuracy": 0.75, "num_samples": 20.0}
    # the fleet's adapter scored 0.75 where the device's own last one scored 0.9: the fleet cost it
    assert fleet_gain(task, before, last, "held-out A") == {FLEET_GAIN: pytest.approx(-0.15)}
    assert fleet_gain(task, {"accuracy": 0.95}, last, "held-out A") == {FLEET_GAIN: pytest.approx(0.05)}
    # nothing where the two scores do not compare, or there is nothing to compare
    assert fleet_gain(task, before, last, "held-out B") == {}  # other held-out files, loss or prior
    assert fleet_gain(task, before, last, "") == {}
    assert fleet_gain(Task(7, BUNDLE, 100.0), before, last, "held-out A") == {}  # no adapter from the fleet
    assert fleet_gain(task, before, None, "held-out A") == {}  # no round trained before
    for odd in ({"metrics": {"steps": 3.0}}, {"metrics": None}, {"metrics": {"accuracy_after": "x"}}):
        assert fleet_gain(task, before, {**odd, "scoring": "held-out A"}, "held-out A") == {}, odd


def test_state_survives_reopen_and_resume_points_at_checkpoint(tmp_path):
    s = _open(tmp_path)
    s.begin_round(5, b"task-5")
    s.save_progress(5, save_checkpoint=_fake_ckpt(b"e1"), epochs_done=1, metrics_before={"loss": 2.0})
    s.close()  # as if killed here
    s = _open(tmp_path)
    prog = s.in_progress()
    assert prog.round == 5 and prog.epochs_done == 1 and prog.metrics_before == {"loss": 2.0}
    assert s.checkpoint_path(prog).read_bytes() == b"e1"
    assert s.task_blob(5) == b"task-5"
    s.close()


def test_built_update_is_kept_byte_for_byte(tmp_path):
    s = _open(tmp_path)
    s.begin_round(1, b"t")
    s.store_update(1, b"\x00exact-bytes\xff", {"metrics": {}})
    s.close()
    s = _open(tmp_path)
    assert s.pending_updates() == [1] and s.update_blob(1) == b"\x00exact-bytes\xff"
    s.close()


def test_update_written_but_not_recorded_is_adopted_not_rebuilt(tmp_path):
    """Killed between writing update.bin and recording it: the blob is the round's update."""
    s = _open(tmp_path)
    s.begin_round(2, b"t")
    atomic_write(tmp_path / "rounds/2/update.bin", b"the-update")
    s.close()
    s = _open(tmp_path)
    assert s.round_status(2) is None
    assert s.adopt_built_update(2, {"metrics": {}})
    assert s.round_status(2) == BUILT and s.update_blob(2) == b"the-update" and s.in_progress() is None
    assert not s.adopt_built_update(2, {"metrics": {}})  # idempotent
    s.close()


def test_new_round_drops_scratch_of_abandoned_round(tmp_path):
    s = _open(tmp_path)
    s.begin_round(1, b"t1")
    s.save_progress(1, save_checkpoint=_fake_ckpt(b"c"), epochs_done=1)
    s.begin_round(2, b"t2")
    assert not (tmp_path / "rounds/1").exists()
    with pytest.raises(StateError, match="not in progress"):
        s.save_progress(1, epochs_done=2)
    s.close()


def test_adapters_install_and_current_path(tmp_path):
    s = _open(tmp_path)
    assert current_adapter_path(tmp_path) is None
    tensors = {"x.lora_C": np.eye(2, dtype=np.float32)}
    s.install_adapter("v1", tensors, AdapterMeta(bundle_id=BUNDLE, version="v1"), source="adapter")
    s.install_adapter(
        "v2",
        {"x.lora_C": 2 * np.eye(2, dtype=np.float32)},
        AdapterMeta(bundle_id=BUNDLE, version="v2"),
        source="task",
        rnd=4,
    )
    assert s.current_adapter == "v2"
    path = current_adapter_path(tmp_path)
    assert path == s.current_adapter_path() and path.name == "v2.safetensors"
    loaded, meta = load_adapter(path)
    assert meta.version == "v2" and np.array_equal(loaded["x.lora_C"], 2 * np.eye(2, dtype=np.float32))
    with pytest.raises(StateError, match="not a valid id"):
        s.install_adapter("../evil", tensors, AdapterMeta(bundle_id=BUNDLE, version="x"), source="adapter")
    s.close()


def test_lock_refuses_a_second_agent(tmp_path):
    s = _open(tmp_path)
    with pytest.raises(StateError, match="in use"):
        _open(tmp_path)
    s.close()
    _open(tmp_path).close()


def test_state_of_another_agent_is_refused(tmp_path):
    _open(tmp_path).close()
    with pytest.raises(ConfigError, match="belongs to agent"):
        _open(tmp_path, agent_id="dev-2")


def test_bundle_change_drops_adapters_keeps_history(tmp_path):
    s = _open(tmp_path)
    s.begin_round(1, b"t")
    s.store_update(1, b"u", {"metrics": {}})
    s.install_adapter(
        "v1", {"a": np.zeros(1, np.float32)}, AdapterMeta(bundle_id=BUNDLE, version="v1"), source="adapter"
    )
    s.close()
    s = _open(tmp_path, bundle_id="c" * 64)
    assert s.current_adapter is None and s.round_status(1) == BUILT
    s.close()


def test_write_failure_raises_state_error_and_keeps_record(tmp_path):
    s = _open(tmp_path)
    (tmp_path / "rounds").write_text("a file where a folder should be")
    with pytest.raises(StateError, match="cannot write"):
        s.begin_round(1, b"t")
    assert s.in_progress() is None
    assert read_record(tmp_path)["in_progress"] is None
    s.close()


def test_corrupt_state_file_is_a_clear_error(tmp_path):
    _open(tmp_path).close()
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="not valid JSON"):
        _open(tmp_path)
    with pytest.raises(StateError, match="not an agent state dir"):
        read_record(tmp_path / "nowhere")


def test_status_command_table_and_json(tmp_path):
    s = _open(tmp_path)
    s.begin_round(1, b"t")
    s.store_update(1, b"u", {"metrics": {"accuracy_after": 0.25}, "num_samples": 3})
    s.mark_published(1)
    s.close()
    from typer.testing import CliRunner

    from fedclip.device_agent.cli import app

    out = CliRunner().invoke(app, ["status", "--state", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info["agent_id"] == "dev-1" and info["rounds_done"] == 1 and info["last_round"] == 1
    out = CliRunner().invoke(app, ["status", "--state", str(tmp_path)])
    assert out.exit_code == 0 and "dev-1" in out.output and "accuracy_after" in out.output


def test_status_names_where_the_adapter_in_use_came_from(tmp_path):
    s = _open(tmp_path)
    tensors = {"x.lora_C": np.eye(2, dtype=np.float32)}
    assert summarize(tmp_path)["adapter_source"] is None  # the bundle's own adapter serves
    s.install_adapter("r3", tensors, AdapterMeta(bundle_id=BUNDLE, version="r3"), source="rollout", rollout=7)
    t4 = AdapterMeta(bundle_id=BUNDLE, version="t4")
    s.install_adapter("t4", tensors, t4, source="task", rnd=4, use=False)
    s.save_rollout_memory({"pinned": "r3"})
    s.close()
    info = summarize(tmp_path)
    assert (info["adapter_version"], info["adapter_source"], info["adapter_rollout"]) == ("r3", "rollout", 7)
    assert info["adapter_round"] is None and info["pinned"] == "r3" and info["open_set_fallback"] is None
    s = _open(tmp_path)  # a personalized adapter delivered with the fleet's (`rollout start --fallback`)
    fallback = (tensors, AdapterMeta(bundle_id=BUNDLE, version="g-r5"))
    s.install_adapter(
        "a-x-r5", tensors, AdapterMeta(BUNDLE, "a-x-r5"), source="rollout", rollout=8, fallback=fallback
    )
    s.close()
    assert summarize(tmp_path)["open_set_fallback"] == "g-r5"
    # ... and the agent's retained status names it, for the coordinator's fleet view, while its file
    # is there (what inference serves the gate's images with: `sdk.ledger.installed`)
    from fedclip.device_agent.config import AgentConfig
    from fedclip.device_agent.status import status_blob
    from fedclip.sdk import messages

    s = _open(tmp_path)
    cfg = AgentConfig(broker="mqtt://127.0.0.1:1", fleet="f1", id="dev-1", bundle=tmp_path, data=tmp_path,
                      state=tmp_path)  # fmt: skip
    said = messages.decode(messages.AgentStatus, status_blob(cfg, BUNDLE, s, 0, "online"), fleet="f1")
    assert (said.adapter_version, said.fallback_version) == ("a-x-r5", "g-r5")
    assert messages.FEATURE_FALLBACK in messages.wire_features(said.versions)  # it says it takes them
    (tmp_path / "adapters" / "a-x-r5.fallback.safetensors").unlink()
    said = messages.decode(messages.AgentStatus, status_blob(cfg, BUNDLE, s, 0, "online"), fleet="f1")
    assert said.fallback_version == "" and s.fallback_version() == ""
    s.close()
    assert summarize(tmp_path)["open_set_fallback"] is None  # the same rule for `fedclip-agent status`


def test_a_personal_copy_is_served_beside_its_adapter_and_goes_with_it(tmp_path):
    """`keep_personal`: the ledger names the copy (`served`), the summary shows both, a forgotten
    entry takes its copy's file along, and an adapter not in the ledger gets none."""
    s = _open(tmp_path)
    tensors = {"x.lora_C": np.eye(2, dtype=np.float32)}
    s.install_adapter("r1", tensors, AdapterMeta(bundle_id=BUNDLE, version="r1"), source="rollout", rollout=1)
    mine = AdapterMeta(bundle_id=BUNDLE, version="r1+personal", parent_version="r1", strategy="personal")
    path = s.keep_personal("r1", {"x.lora_C": 2 * np.eye(2, dtype=np.float32)}, mine, {"accuracy": 0.5})
    assert path.name == "r1.personal.safetensors" and current_adapter_path(tmp_path) == path
    entry = Ledger.read(tmp_path).entry("r1")
    assert entry.served == ("r1+personal", path) and entry.file.name == "r1.safetensors"
    assert summarize(tmp_path)["serving"] == "r1+personal"
    with pytest.raises(StateError, match="not in the ledger"):
        s.keep_personal("nope", tensors, mine, {})
    s.install_adapter("r2", tensors, AdapterMeta(bundle_id=BUNDLE, version="r2"), source="rollout", rollout=2)
    assert summarize(tmp_path)["serving"] == "r2"  # no copy yet: the adapter itself
    s.retire_adapters(["r1"], forget=True)
    assert not path.exists() and not (tmp_path / "adapters" / "r1.safetensors").exists()
    s.close()
