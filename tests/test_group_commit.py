"""Group commit in the round loop: a batch of updates is stored together and acknowledged after.

The real `Server` with a real store and registry on the in-memory broker (manual acks, as the MQTT
session); the same over a real mosquitto with a real kill -9 is in test_intake_crash.py.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.registry import Registry, load_initial_adapter
from fedclip.coordinator.server import Server
from fedclip.coordinator.server.tasks import RoundState
from fedclip.coordinator.store import Store
from fedclip.coordinator.trust import Trust
from fedclip.sdk import messages
from fedclip.sdk.adapters import encode_tensors
from fedclip.sdk.hashing import sha256_bytes
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.signing import generate_key, sign_envelope
from fedclip.sdk.transport import MemoryBroker
from fedclip.sdk.wire import Envelope, MsgType, Topics, encode

FLEET = "g1"
TOPICS = Topics(FLEET)
AGENTS = [f"a{i:02d}" for i in range(12)]


@pytest.fixture(scope="module")
def bundle(bundle_factory):
    path = bundle_factory(adapter="lora", labels=("a", "b", "c"))
    manifest = Manifest.load(path)
    return path, manifest, load_initial_adapter(path, manifest)


def _open_round(bundle, tmp_path, agents=AGENTS, trust: Trust | None = None, **kw):
    """A server whose round 1 is open for `agents`, and an agent-side client of its broker."""
    path, manifest, initial = bundle
    cfg = CoordConfig(
        broker="mqtt://in-memory", fleet=FLEET, bundle=path, state=tmp_path / "state", strategy="fedavg",
        rounds=1, min_updates=len(agents), selection="all", http=False, **kw,
    )  # fmt: skip
    store = Store(cfg.state)
    registry = Registry(store, manifest.bundle_id, manifest.adapter.kind)
    registry.ensure_initial(initial, "fedavg")
    broker = MemoryBroker()
    server = Server(cfg, manifest, broker.client(manual_ack=True), store, registry, trust=trust)
    store.start_round(1, "fedavg", time.time() + 60, [(a, "g-r0", "t") for a in agents])
    server.current = RoundState(1, time.time() + 60, False, {a: "g-r0" for a in agents}, {})
    server.transport.subscribe(TOPICS.all_agents("update"))
    server.transport.connect()
    sender = broker.client()
    sender.connect()
    return server, sender


def _update(bundle, agent: str, delta: float, key=None, named: str | None = None) -> bytes:
    """`agent`'s update (signed with `key` when given; its envelope naming `named` when given)."""
    _, manifest, initial = bundle
    body = {"bundle_id": manifest.bundle_id, "num_samples": 5, "metrics": {"loss": 1.0}}
    env = Envelope(MsgType.UPDATE, FLEET, named or agent, round=1, base_version="g-r0", body=body)
    tensors = {k: v + np.float32(delta) for k, v in initial.items()}
    return encode(sign_envelope(key, env, tensors) if key is not None else env, tensors)


def _squat_blob(bundle, tmp_path, agent: str) -> None:
    """A folder squats on the temp name of `agent`'s round-1 blob (its `_update` with delta 0.1):
    writing that blob fails."""
    blob = encode_tensors(
        {k: v + np.float32(0.1) for k, v in bundle[2].items()}, {"agent": agent, "round": "1"}
    )
    sha = sha256_bytes(blob)
    (tmp_path / "state" / "blobs" / sha[:2] / f".{sha}.{os.getpid()}.tmp").mkdir(parents=True)


def test_queued_updates_are_stored_in_batches_and_acknowledged_after(bundle, tmp_path):
    server, sender = _open_round(bundle, tmp_path, intake_batch=5)
    payloads = {a: _update(bundle, a, 0.01 * i) for i, a in enumerate(AGENTS)}
    for a in AGENTS:
        sender.publish(TOPICS.update(a), payloads[a])
    sender.publish(TOPICS.update(AGENTS[0]), payloads[AGENTS[0]])  # a redelivery in the last batch
    sender.publish(TOPICS.update("zz"), payloads[AGENTS[1]])  # refused: recorded with its batch
    assert server.transport.unacked == len(AGENTS) + 2
    server.pump(5.0)
    assert server.transport.unacked == 0
    try:
        ups = server.store.updates(1)
        assert [u.agent for u in ups] == AGENTS and server.current.received == set(AGENTS)
        # one transaction per batch of at most 5 messages: 12 updates, 3 commit times
        times = [r[0] for r in server.store.db.rows("SELECT received_at FROM updates ORDER BY agent")]
        assert len(set(times)) == 3 and [times.count(t) for t in sorted(set(times))] == [5, 5, 2]
        assert [r[1] for r in server.store.rejections()] == ["zz"]
        initial = bundle[2]
        for i, u in enumerate(ups):  # each blob holds the tensors that agent sent
            stored = server.store.blobs.read_tensors(u.blob, initial)
            for k, v in initial.items():
                np.testing.assert_array_equal(stored[k], v + np.float32(0.01 * i))
    finally:
        server.store.close()


def test_a_batch_that_cannot_be_stored_is_not_acknowledged(bundle, tmp_path):
    """The disk refuses one blob of the batch: the loop stops with the error and acknowledges none
    of the batch's messages, so the broker delivers them all again after a restart."""
    server, sender = _open_round(bundle, tmp_path, intake_batch=64)
    try:
        for a in AGENTS[:4]:
            sender.publish(TOPICS.update(a), _update(bundle, a, 0.1))
        _squat_blob(bundle, tmp_path, AGENTS[2])  # the third update's blob cannot be written
        with pytest.raises(IsADirectoryError):
            server.pump(5.0)
        assert server.transport.unacked == 4
        assert server.store.updates(1) == [] and server.store.rejections() == []
    finally:
        server.store.close()


def _status(bundle, agent: str, state: str = "online") -> bytes:
    return messages.encode(messages.AgentStatus(state, bundle[1].bundle_id, last_round=0), FLEET, agent)


def test_statuses_are_stored_with_their_batch_and_acknowledged_after(bundle, tmp_path):
    server, sender = _open_round(bundle, tmp_path, intake_batch=64)
    server.transport.subscribe(TOPICS.all_agents("status"))
    try:
        for a in AGENTS[:3]:
            sender.publish(TOPICS.status(a), _status(bundle, a))
        sender.publish(TOPICS.status(AGENTS[0]), _status(bundle, AGENTS[0], "offline"))  # the last one wins
        sender.publish(TOPICS.status(AGENTS[3]), b"not a status")  # refused: recorded with its batch
        assert server.transport.unacked == 5
        server.pump(5.0)
        assert server.transport.unacked == 0
        rows = {r["agent"]: r["online"] for r in server.store.agents()}
        assert rows == {AGENTS[0]: False, AGENTS[1]: True, AGENTS[2]: True}
        assert [r[1] for r in server.store.rejections()] == [AGENTS[3]]
    finally:
        server.store.close()


def test_statuses_share_the_fate_of_their_batch(bundle, tmp_path):
    """One transaction for the batch: when its update cannot be stored, neither are the statuses
    that came with it, and none of its messages is acknowledged (the broker sends them again)."""
    server, sender = _open_round(bundle, tmp_path, intake_batch=64)
    server.transport.subscribe(TOPICS.all_agents("status"))
    try:
        for a in AGENTS[:3]:
            sender.publish(TOPICS.status(a), _status(bundle, a))
        sender.publish(TOPICS.update(AGENTS[0]), _update(bundle, AGENTS[0], 0.1))
        _squat_blob(bundle, tmp_path, AGENTS[0])
        with pytest.raises(IsADirectoryError):
            server.pump(5.0)
        assert server.transport.unacked == 4
        assert server.store.agents() == []
    finally:
        server.store.close()


class Enrolled:
    """An enrolment registry of `keys` (agent -> private key), some of them revoked."""

    def __init__(self, keys: dict, revoked: set[str]):
        self.keys, self.revoked = keys, revoked

    def verify_key(self, agent_id):
        key = self.keys.get(agent_id)
        return None if key is None or agent_id in self.revoked else key.public_key()

    def is_revoked(self, agent_id):
        return agent_id in self.revoked


def test_updates_decoded_in_a_worker_are_stored_and_refused_as_in_the_loop(bundle, tmp_path):
    """A burst big enough for the intake's worker pool: each update is stored or refused, in the same
    words, as when the round loop decodes and checks it itself (`intake_workers: 0`)."""
    agents = [f"s{i:02d}" for i in range(24)]
    keys = {a: generate_key() for a in agents}
    enrolled = Enrolled(keys, revoked={"s05"})
    payloads = [(a, _update(bundle, a, 0.01 * i, keys[a])) for i, a in enumerate(agents)]
    payloads[1] = ("s01", _update(bundle, "s01", 0.5, keys["s02"]))  # signed by another device
    payloads[2] = ("s02", payloads[2][1][:-40])  # cut short on the way
    payloads[3] = ("s03", _update(bundle, "s03", 0.5, keys["s03"], named="s04"))  # speaks for another
    payloads[4] = ("s04", _update(bundle, "s04", 0.5))  # unsigned
    payloads.append(("zz", _update(bundle, "zz", 0.5, generate_key())))  # not enrolled
    payloads.append(("s06", payloads[6][1]))  # a redelivery
    outcomes = {}
    for workers in (0, 2):  # two: each takes its share of the batch, in order
        server, sender = _open_round(
            bundle, tmp_path / f"w{workers}", agents, Trust(enrolled), intake_batch=64, intake_workers=workers
        )
        try:
            for a, blob in payloads:
                sender.publish(TOPICS.update(a), blob)
            server.pump(30.0)
            assert server.transport.unacked == 0
            assert (server.intake.pool._pool is not None) == (workers > 0)  # the pool did the decoding
            # the blob too: what a worker stored ahead is, byte for byte, what the loop stores
            stored = [(u.agent, u.sha256, u.blob) for u in server.store.updates(1)]
            refused = sorted((r[1], r[3]) for r in server.store.rejections())
            # a worker wrote each stored update's blob (and the redelivered copy's, the same one)
            assert server.intake.stored_ahead == (len(stored) + 1 if workers else 0)
            outcomes[workers] = (stored, refused)
        finally:
            server.intake.close()
            server.store.close()
    assert outcomes[0] == outcomes[2]
    stored, refused = outcomes[2]
    assert [a for a, _, _ in stored] == [a for a in agents if a not in {"s01", "s02", "s03", "s04", "s05"}]
    reasons = dict(refused)
    assert "does not verify with agent s01's enrolled key" in reasons["s01"]
    assert "not a valid safetensors payload" in reasons["s02"] or "truncated" in reasons["s02"]
    assert "envelope names agent 's04', the topic 's03'" in reasons["s03"]
    assert "unsigned message" in reasons["s04"]
    assert "agent 's05' is revoked" in reasons["s05"]
    assert "agent 'zz' is not enrolled" in reasons["zz"]
