"""The agent's rollout client without a broker: signed pushes and commands travel over the in-memory
transport to a real RolloutClient over a real state dir (AgentState, the adapter ledger), and its acks
come back on the coordinator's side.

- hostile bodies, correctly signed or not, are refused with one line each and change nothing;
- the ledger is the one rollout history: installs and rollbacks carry their rollout id, and a
  rollback returns to the adapter the ledger says was in use before;
- a state dir an older agent left with its own `rollout/rollout.json` is taken over once.

The same client over mosquitto with ONNX Runtime evaluation is in test_rollout.py (integration).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from fedclip.device_agent.rollout_client import RolloutClient
from fedclip.device_agent.state import AgentState
from fedclip.sdk import messages
from fedclip.sdk.adapters import AdapterMeta, adapter_bytes, load_adapter
from fedclip.sdk.errors import WireError
from fedclip.sdk.ledger import Ledger, installed
from fedclip.sdk.messages import Ack, AdapterPush, RolloutCommand
from fedclip.sdk.signing import generate_key, sign_envelope
from fedclip.sdk.transport import MemoryBroker
from fedclip.sdk.wire import Envelope, MsgType, Topics, encode

FLEET = "rc1"
AGENT = "dev-1"
BUNDLE = "b" * 64
TOPICS = Topics(FLEET)
LOGGER = "fedclip.device_agent.rollout_client"


def tensors(value: float) -> dict[str, np.ndarray]:
    return {"x.lora_A": np.full((2, 2), value, np.float32)}


def evaluate(t) -> dict[str, float]:
    """A stand-in held-out evaluation that tells adapters apart: accuracy = value / 10 (0.05 for the
    bundle's own)."""
    return {"accuracy": 0.05 if t is None else float(t["x.lora_A"][0, 0]) / 10, "num_samples": 4}


class Rig:
    """A coordinator end (signs, publishes retained, reads acks) and one agent's RolloutClient."""

    def __init__(self, root, key=None):
        self.root = root
        self.broker = MemoryBroker()
        self.key = key or generate_key()
        self.coord = self.broker.client()
        self.coord.subscribe(TOPICS.ack(AGENT))
        self.coord.connect()
        self.start()

    def start(self) -> None:
        self.state = AgentState(self.root, agent_id=AGENT, fleet=FLEET, bundle_id=BUNDLE)
        self.transport = self.broker.client()
        self.client = RolloutClient(
            self.transport, TOPICS, AGENT, self.state, self.key.public_key(), evaluate, bundle_id=BUNDLE
        )
        self.client.subscribe()
        self.transport.connect()

    def restart(self) -> None:
        self.transport.close()
        self.state.close()
        self.start()

    def deliver(self) -> int:
        """Hand every message waiting for the agent to its client; how many there were."""
        n = 0
        while (msg := self.transport.get(0)) is not None:
            assert self.client.handle(msg)
            n += 1
        return n

    def send(self, kind: str, payload: bytes) -> None:
        self.coord.publish(TOPICS.agent(AGENT, kind), payload, qos=1, retain=True)
        assert self.deliver() == 1

    def push(self, rollout: int, version: str, value: float) -> None:
        push = AdapterPush(version, BUNDLE, rollout=rollout, stage="rest", adapter=tensors(value))
        self.send("adapter", messages.encode(push, FLEET, AGENT, key=self.key))

    def command(self, command: str, rollout: int = 0, version: str = "") -> None:
        cmd = RolloutCommand(command, rollout, version, reason="test")
        self.send(
            "pin" if command != "rollback" else "command", messages.encode(cmd, FLEET, AGENT, key=self.key)
        )

    def acks(self) -> list[Ack]:
        out = []
        while (msg := self.coord.get(0)) is not None:
            out.append(messages.decode(Ack, msg.payload, fleet=FLEET, agent=AGENT, where="ack"))
        return out

    def ledger(self) -> Ledger:
        return Ledger.read(self.root)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "agent")
    yield r
    r.state.close()


def refusals(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("refused:")
    ]


# ---- hostile bodies --------------------------------------------------------------------------------
GOOD = {"rollout": 7, "stage": "rest", "version": "v1", "bundle_id": BUNDLE}
HOSTILE_PUSHES = {  # body -> what the one line must say
    "huge rollout id": ({**GOOD, "rollout": 2**70}, "rollout"),
    "rollout id as text": ({**GOOD, "rollout": "7"}, "rollout"),
    "rollout id as bool": ({**GOOD, "rollout": True}, "rollout"),
    "path as version": ({**GOOD, "version": "../../etc/passwd"}, "version"),
    "unknown field": ({**GOOD, "exec": "rm -rf /"}, "exec"),
    "url to a local file": ({**GOOD, "url": "file:///etc/passwd", "sha256": "0" * 64}, "url"),
    "no bundle": ({k: v for k, v in GOOD.items() if k != "bundle_id"}, "bundle_id"),
    "bundle id as list": ({**GOOD, "bundle_id": [BUNDLE]}, "bundle_id"),
}
HOSTILE_COMMANDS = {  # (topic kind, body) -> what the one line must say
    "unknown command": ("command", {"command": "reboot"}, "command"),
    "rollback of no rollout": ("command", {"command": "rollback"}, "rollout"),
    "negative rollout": ("command", {"command": "rollback", "rollout": -1}, "rollout"),
    "reason as number": ("command", {"command": "rollback", "rollout": 3, "reason": 5}, "reason"),
    "pin to a path": ("pin", {"command": "pin", "version": "../x"}, "version"),
    "rollback on the pin topic": ("pin", {"command": "rollback", "rollout": 3}, "pin topic"),
    "pin on the command topic": ("command", {"command": "pin", "version": "v1"}, "pin topic"),
}


def _signed(key, kind: MsgType, body: dict, t=None) -> bytes:
    return encode(sign_envelope(key, Envelope(kind, FLEET, AGENT, body=body), t), t)


@pytest.mark.parametrize("case", sorted(HOSTILE_PUSHES))
def test_a_hostile_signed_push_is_refused_in_one_line_and_changes_nothing(rig, caplog, case):
    caplog.set_level(logging.INFO, logger="fedclip")
    body, why = HOSTILE_PUSHES[case]
    rig.send("adapter", _signed(rig.key, MsgType.ADAPTER, body, tensors(1.0)))
    (line,) = refusals(caplog)
    assert "\n" not in line and why in line, line
    assert rig.ledger().entries == () and rig.client.current_version is None
    assert rig.acks() == []  # nothing trustworthy names a rollout to answer
    rig.push(8, "v2", 2.0)  # the client keeps serving
    assert rig.client.current_version == "v2"


@pytest.mark.parametrize("case", sorted(HOSTILE_COMMANDS))
def test_a_hostile_signed_command_is_refused_in_one_line_and_changes_nothing(rig, caplog, case):
    caplog.set_level(logging.INFO, logger="fedclip")
    rig.push(3, "v1", 1.0)
    rig.acks()
    kind, body, why = HOSTILE_COMMANDS[case]
    rig.send(kind, _signed(rig.key, MsgType.COMMAND, body))
    (line,) = refusals(caplog)
    assert "\n" not in line and why in line, line
    assert rig.client.current_version == "v1" and rig.client.pinned is None
    assert rig.client.memory.rolled_back == [] and rig.acks() == []


def test_an_unsigned_push_is_refused_and_rejected_by_its_rollout_id(rig, caplog):
    caplog.set_level(logging.INFO, logger="fedclip")
    push = AdapterPush("v1", BUNDLE, rollout=5, adapter=tensors(1.0))
    rig.send("adapter", messages.encode(push, FLEET, AGENT))  # no key
    rig.send("adapter", messages.encode(push, FLEET, AGENT, key=generate_key()))
    assert [("unsigned" in x, "does not verify" in x) for x in refusals(caplog)] == [
        (True, False),
        (False, True),
    ]
    assert [(a.rollout, a.status, a.version) for a in rig.acks()] == [(5, "rejected", "v1")] * 2
    assert rig.client.current_version is None and rig.ledger().entries == ()


# ---- the ledger is the rollout history -------------------------------------------------------------
def test_installs_and_rollbacks_are_recorded_with_their_rollout_id(rig):
    rig.push(11, "v1", 1.0)
    rig.push(12, "v2", 2.0)
    ledger = rig.ledger()
    assert [(e.version, e.source, e.rollout) for e in ledger.entries] == [
        ("v1", "rollout", 11),
        ("v2", "rollout", 12),
    ]
    installed = rig.acks()
    assert [(a.status, a.previous_version) for a in installed] == [("installed", ""), ("installed", "v1")]
    # the current adapter evaluated against the new one is the ledger's current: v1 when v2 came
    assert installed[1].current.accuracy == pytest.approx(0.1) and installed[1].new.accuracy == pytest.approx(
        0.2
    )

    rig.command("rollback", 12, "v2")
    ledger = rig.ledger()
    v2 = ledger.entry("v2")
    assert ledger.current == "v1" and ledger.in_use().rollout == 11
    assert v2 is not None and v2.rollout == 12 and v2.rolled_back_at > 0 and not v2.usable
    (ack,) = rig.acks()
    assert (ack.rollout, ack.status, ack.version, ack.previous_version) == (12, "rolled_back", "v1", "v2")

    rig.command("rollback", 11, "v1")
    assert rig.client.current_version is None  # the bundle's own adapter again
    assert [e.rolled_back_at > 0 for e in rig.ledger().entries] == [True, True]


def test_rollback_order_comes_from_the_ledger(rig):
    # the device's own adapter before any rollout, then rollouts 1, 2, 3
    rig.state.install_adapter("own", tensors(0.5), AdapterMeta(BUNDLE, "own"), source="adapter")
    for rid, version in ((1, "a"), (2, "b"), (3, "c")):
        rig.push(rid, version, float(rid))
    rig.command("rollback", 2, "b")  # not in use: recorded, inference stays on c
    assert rig.client.current_version == "c" and rig.ledger().entry("b").rolled_back_at > 0
    rig.command("rollback", 3, "c")  # back past the rolled-back b, to a
    assert rig.client.current_version == "a"
    rig.command("rollback", 1, "a")
    assert rig.client.current_version == "own"
    assert rig.ledger().previous("own") is None

    # the retained adapter of a rolled-back rollout is never taken again, even after a restart
    rig.restart()
    rig.deliver()  # the retained pushes and commands arrive again
    push = AdapterPush("b", BUNDLE, rollout=2, adapter=tensors(2.0))
    rig.send("adapter", messages.encode(push, FLEET, AGENT, key=rig.key))
    assert rig.client.current_version == "own"


def test_rollout_entries_are_bounded(rig):
    for rid in range(1, 7):
        rig.push(rid, f"v{rid}", float(rid))
    rollouts = [e.version for e in rig.ledger().entries if e.source == "rollout"]
    assert rollouts == ["v4", "v5", "v6"]
    assert sorted(p.name for p in (rig.root / "adapters").iterdir()) == [
        f"v{i}.safetensors" for i in (4, 5, 6)
    ]


# ---- a fallback delivered beside a personalized adapter ----------------------------------------------
def test_a_fallback_is_kept_beside_its_adapter_and_goes_where_its_adapter_goes(rig):
    rig.state.set_label_prior([3.0, 1.0])  # a balanced-softmax device: its adapters carry the prior
    push = AdapterPush(
        "a-dev-1-r1", BUNDLE, rollout=1, adapter=tensors(1.0), fallback_version="g-r1", fallback=tensors(9.0)
    )
    rig.send("adapter", messages.encode(push, FLEET, AGENT, key=rig.key))
    entry = rig.ledger().entry("a-dev-1-r1")
    assert entry is not None and entry.fallback == rig.root / "adapters/a-dev-1-r1.fallback.safetensors"
    fb, fb_meta = load_adapter(entry.fallback)
    assert fb["x.lora_A"][0, 0] == 9.0 and fb_meta.version == "g-r1"
    assert fb_meta.label_prior == () and load_adapter(entry.file)[1].label_prior == (3.0, 1.0)
    assert installed(rig.root).fallback == entry.fallback
    (ack,) = rig.acks()  # the canary's evaluation is of the adapter, not of its fallback
    assert ack.status == "installed" and ack.new.accuracy == pytest.approx(0.1)

    rig.push(2, "v2", 2.0)  # no fallback with it: the gate goes back to the bundle's own model
    assert installed(rig.root).version == "v2" and installed(rig.root).fallback is None
    rig.command("rollback", 2, "v2")  # back to the personalized adapter, with its fallback
    assert installed(rig.root).fallback == entry.fallback
    for rid in range(3, 7):  # pruned from the ledger: its fallback file goes with it
        rig.push(rid, f"v{rid}", float(rid))
    assert rig.ledger().entry("a-dev-1-r1") is None and not entry.fallback.exists()


def test_the_next_rounds_task_and_a_second_rollout_of_the_version_keep_its_side_files(rig):
    """A personalized fleet's next task starts from the version a rollout installed: the entry (its
    rollout id, fallback and personal copy) stays. Rolling the version in use out again with
    `--fallback` gives it the fallback; nothing else changes."""
    version = "a-dev-1-r1"
    rig.push(1, version, 1.0)  # without a fallback first
    assert installed(rig.root).fallback is None
    again = AdapterPush(
        version, BUNDLE, rollout=2, adapter=tensors(1.0), fallback_version="g-r1", fallback=tensors(9.0)
    )
    rig.send("adapter", messages.encode(again, FLEET, AGENT, key=rig.key))
    assert [(a.rollout, a.status) for a in rig.acks()] == [(1, "installed"), (2, "installed")]
    entry = rig.ledger().entry(version)
    assert entry.rollout == 1 and load_adapter(entry.fallback)[0]["x.lora_A"][0, 0] == 9.0
    rig.state.keep_personal(version, tensors(1.5), AdapterMeta(BUNDLE, version), {"accuracy": 0.9})

    rig.state.install_adapter(
        version, tensors(1.0), AdapterMeta(BUNDLE, version), source="task", rnd=2, use=False
    )
    after = rig.ledger().entry(version)
    assert (after.source, after.rollout, after.fallback, after.personal) == (
        "rollout",
        1,
        entry.fallback,
        rig.root / f"adapters/{version}.personal.safetensors",
    )
    assert after.fallback.is_file() and after.personal.is_file()
    assert installed(rig.root) == installed(rig.root).__class__(
        BUNDLE, version + "+personal", after.personal, after.fallback
    )
    rig.push(3, "v2", 2.0)
    rig.push(4, version, 1.0)  # installed again by a rollout without --fallback: its side files stay
    again = rig.ledger().entry(version)
    assert (again.rollout, again.fallback, again.personal) == (4, entry.fallback, after.personal)
    assert installed(rig.root).fallback == entry.fallback and entry.fallback.is_file()


def test_a_fallback_without_its_version_is_refused_and_changes_nothing(rig, caplog):
    caplog.set_level(logging.INFO, logger="fedclip")
    half = {**tensors(1.0), "fallback/x.lora_A": np.ones((2, 2), np.float32)}
    rig.send("adapter", _signed(rig.key, MsgType.ADAPTER, GOOD, half))
    (line,) = refusals(caplog)
    assert "fallback_version" in line and "\n" not in line
    assert rig.ledger().entries == () and not (rig.root / "adapters").exists()


def test_a_fallback_that_does_not_fit_the_bundle_rejects_the_whole_push(tmp_path, caplog):
    """The agent checks the fallback as it checks the adapter (`check_fn`: the bundle's names and
    shapes); a bad one is refused in one line, acked `rejected`, and nothing is installed."""
    caplog.set_level(logging.INFO, logger="fedclip")

    def check(t, where):
        bad = [k for k, v in t.items() if v.shape != (2, 2)]
        if bad:
            raise WireError(f"{where}: tensor {bad[0]!r} has the wrong shape")
        return t

    rig = Rig(tmp_path / "agent")
    rig.client.check_fn = check
    try:
        push = AdapterPush(
            "a-dev-1-r1",
            BUNDLE,
            rollout=4,
            adapter=tensors(1.0),
            fallback_version="g-r1",
            fallback={"x.lora_A": np.ones((3, 3), np.float32)},
        )
        rig.send("adapter", messages.encode(push, FLEET, AGENT, key=rig.key))
        (line,) = refusals(caplog)
        assert "fallback" in line and "wrong shape" in line and "\n" not in line
        (ack,) = rig.acks()
        assert (ack.rollout, ack.status) == (4, "rejected") and "fallback" in ack.reason
        assert rig.ledger().entries == () and rig.client.current_version is None
    finally:
        rig.state.close()


def test_a_pinned_device_stays_on_its_version(rig):
    rig.push(1, "v1", 1.0)
    rig.command("pin", version="v1")
    rig.push(2, "v2", 2.0)
    rig.command("rollback", 1, "v1")
    assert rig.client.current_version == "v1" and rig.ledger().entry("v1").rolled_back_at == 0
    assert [a.status for a in rig.acks()] == ["installed", "pinned", "rolled_back"]
    rig.command("unpin")
    assert rig.client.pinned is None


# ---- a state dir an older agent left ---------------------------------------------------------------
def _old_state_dir(root) -> None:
    """What an agent before the single ledger left: the ledger recorded every rollout install with
    rollout id 0 (own, a, b, c in turn; b was rolled back by re-installing a, then c came), and
    `rollout/rollout.json` kept the rollout history, the rolled-back ids, acks and copies."""
    state = AgentState(root, agent_id=AGENT, fleet=FLEET, bundle_id=BUNDLE)
    state.install_adapter("own", tensors(0.5), AdapterMeta(BUNDLE, "own"), source="adapter")
    for version, value in (("a", 1.0), ("b", 2.0), ("a", 1.0), ("c", 3.0)):
        state.install_adapter(version, tensors(value), AdapterMeta(BUNDLE, version), source="rollout")
    state.close()
    old = root / "rollout"
    (old / "adapters").mkdir(parents=True)
    history = []
    for version, rid in (("own", 0), ("a", 1), ("c", 3)):
        rel = f"adapters/{version}.safetensors"
        (old / rel).write_bytes(adapter_bytes(tensors(1.0), AdapterMeta(BUNDLE, version)))
        history.append({"version": version, "rollout": rid, "file": rel, "sent_at": 0.0})
    installed = {"rollout": 3, "status": "installed", "version": "c", "reason": "", "previous_version": "a"}
    record = {
        "history": history,
        "pinned": None,
        "rolled_back": [2],
        "acks": {"3": {**installed, "metrics": {}}},
        "last_sent_at": 100.0,
    }
    (old / "rollout.json").write_text(json.dumps(record))


def test_an_old_rollout_json_is_taken_into_the_ledger_once(tmp_path):
    root = tmp_path / "agent"
    key = generate_key()
    _old_state_dir(root)
    rig = Rig(root, key)
    try:
        assert not (root / "rollout").exists()
        ledger = rig.ledger()
        assert [(e.version, e.source, e.rollout) for e in ledger.entries] == [
            ("own", "adapter", 0),
            ("a", "rollout", 1),
            ("c", "rollout", 3),
        ]  # b, rolled back under the old client, is no rollback target any more
        assert rig.client.memory.rolled_back == [2] and rig.client.memory.last_sent_at == 100.0
        # a retained copy of rollout 3's adapter is answered with the ack the old client kept
        rig.push(3, "c", 3.0)
        (ack,) = rig.acks()
        assert (ack.rollout, ack.status, ack.previous_version) == (3, "installed", "a")
        rig.command("rollback", 3, "c")
        assert rig.client.current_version == "a"
        rig.command("rollback", 1, "a")
        assert rig.client.current_version == "own"
        rig.restart()  # once: nothing is imported again
        assert rig.client.current_version == "own" and not (root / "rollout").exists()
    finally:
        rig.state.close()


def test_an_unreadable_old_rollout_json_is_dropped_and_the_ledger_serves(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedclip")
    root = tmp_path / "agent"
    key = generate_key()
    _old_state_dir(root)
    (root / "rollout" / "rollout.json").write_text("{half a file")
    rig = Rig(root, key)
    try:
        assert not (root / "rollout").exists()
        assert any("unreadable" in r.getMessage() and "\n" not in r.getMessage() for r in caplog.records)
        rig.push(4, "d", 4.0)
        rig.command("rollback", 4, "d")
        assert rig.client.current_version == "c"
    finally:
        rig.state.close()
