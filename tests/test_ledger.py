"""The adapter ledger: the agent writes it through AgentState, everyone else reads it through
sdk.ledger; a task's starting adapter is kept for the record but never used for inference."""

from __future__ import annotations

import numpy as np
import pytest

from fedclip.device_agent.state import AgentState
from fedclip.sdk.adapters import AdapterMeta
from fedclip.sdk.errors import StateError
from fedclip.sdk.ledger import Ledger

T = {"x.lora_C": np.ones((2, 2), np.float32)}


def meta(version: str, rnd: int) -> AdapterMeta:
    return AdapterMeta(bundle_id="b", version=version, round=rnd, kind="tri-lora")


def test_tasks_are_recorded_rollouts_are_used(tmp_path):
    state = AgentState(tmp_path, agent_id="a", fleet="f", bundle_id="b")
    state.install_adapter("g-r0", T, meta("g-r0", 0), source="task", rnd=1, use=False)
    state.install_adapter("g-r1", T, meta("g-r1", 1), source="task", rnd=2, use=False)
    ledger = Ledger.read(tmp_path)
    assert ledger.current is None and ledger.in_use() is None  # no task ever reaches inference
    assert [e.version for e in ledger.entries] == ["g-r0", "g-r1"]
    state.install_adapter("g-r2", T, meta("g-r2", 2), source="rollout", rnd=-1, rollout=7)
    ledger = Ledger.read(tmp_path)
    used = ledger.in_use()
    assert used is not None and (used.version, used.source, used.rollout) == ("g-r2", "rollout", 7)
    after = ledger.after_rounds(rollout_round=2)
    assert sorted(after) == [0, 1, 2] and after[2] == used.file
    assert ledger.bundle_id == "b"
    state.close()


def test_no_ledger_is_one_line(tmp_path):
    with pytest.raises(StateError, match="not an agent state dir"):
        Ledger.read(tmp_path)
    (tmp_path / "state.json").write_text("{oops")
    with pytest.raises(StateError, match="not valid JSON"):
        Ledger.read(tmp_path)


def test_previous_skips_tasks_rolled_back_and_missing_adapters(tmp_path):
    state = AgentState(tmp_path, agent_id="a", fleet="f", bundle_id="b")
    state.install_adapter("own", T, meta("own", 0), source="adapter")
    state.install_adapter("r1", T, meta("r1", 1), source="rollout", rollout=1)
    state.install_adapter("t2", T, meta("t2", 2), source="task", rnd=2, use=False)  # never served
    state.install_adapter("r2", T, meta("r2", 2), source="rollout", rollout=2)
    state.install_adapter("r3", T, meta("r3", 3), source="rollout", rollout=3)
    state.retire_adapters(["r2"])  # rolled back: the entry stays, and its file, never used again
    ledger = Ledger.read(tmp_path)
    assert ledger == state.ledger()  # the writer's view and the reader's agree
    (r2,) = ledger.of_rollout(2)
    assert r2.rolled_back_at > 0 and r2.file.exists() and not r2.usable
    assert [e.version for e in ledger.entries] == ["own", "r1", "t2", "r2", "r3"]
    assert ledger.previous("r3").version == "r1"
    r3 = ledger.entry("r3").file
    assert ledger.previous("r1").version == "own"
    assert ledger.previous("own") is None and ledger.previous("nope") is None
    # a rollout rolled back after r3 is not "the model after the round" either
    state.install_adapter("r4", T, meta("r4", 4), source="rollout", rollout=4)
    state.set_current_adapter("r3")
    state.retire_adapters(["r4"])
    assert Ledger.read(tmp_path).after_rounds(rollout_round=9) == {
        1: tmp_path / "adapters/t2.safetensors",
        9: r3,
    }
    state.retire_adapters(["r1"], forget=True)
    assert (
        Ledger.read(tmp_path).previous("r3").version == "own"
        and not (tmp_path / "adapters/r1.safetensors").exists()
    )
    state.retire_adapters(["r3"], forget=True)  # the adapter in use is never retired
    assert Ledger.read(tmp_path).in_use().version == "r3"
    state.close()


def test_a_new_bundle_leaves_no_adapter_of_the_old_one_to_roll_back_to(tmp_path):
    state = AgentState(tmp_path, agent_id="a", fleet="f", bundle_id="b")
    state.install_adapter("r1", T, meta("r1", 1), source="rollout", rollout=1)
    state.install_adapter("r2", T, meta("r2", 2), source="rollout", rollout=2)
    state.close()
    state = AgentState(tmp_path, agent_id="a", fleet="f", bundle_id="c")
    ledger = Ledger.read(tmp_path)
    assert ledger.bundle_id == "c" and ledger.current is None and ledger.entries == ()
    assert not list((tmp_path / "adapters").iterdir())
    state.close()
