"""Personal tuning end to end: a `fedclip-agent start` process with `personal: {mu: ...}` in its
agent.yaml tunes the adapter a signed rollout installs on its Fashion-MNIST images, and the device's
inference (`Classifier.from_state`) serves the tuned copy as `<version>+personal`.

Real parts: mosquitto, the agent subprocess (ONNX Runtime's step graph, PNG images, its state dir),
Ed25519-signed adapters as the coordinator sends them, the classifier an application would run.
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_bundle import FASHION_MNIST_LABELS
from fixtures_fleet import FLEET
from waiting import eventually

from fedclip.coordinator.fleet import status_from_message
from fedclip.device_agent.classifier import Classifier
from fedclip.sdk.adapters import load_adapter
from fedclip.sdk.ledger import Ledger
from fedclip.sdk.signing import ensure_keypair, sign_envelope
from fedclip.sdk.wire import Envelope, MsgType, encode

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(900)]


def _push(coord, key, rid: int, version: str, seed: int) -> dict:
    """Roll `version` (the coordinator's adapter for `seed`) out to dev-1, signed; its tensors."""
    tensors = coord.starting_adapter(seed)
    body = {"rollout": rid, "stage": "rest", "version": version, "bundle_id": coord.manifest.bundle_id}
    env = Envelope(MsgType.ADAPTER, FLEET, "dev-1", base_version=version, body=body)
    coord.publish(coord.topics.adapter("dev-1"), encode(sign_envelope(key, env, tensors), tensors), True)
    return tensors


def _copy_of(coord, state, version: str, agent):
    """The personal copy of `version` in the agent's state dir, once there."""

    def made():
        entry = Ledger.read(state).entry(version)
        return entry.personal if entry is not None and entry.personal and entry.personal.is_file() else None

    return coord.wait(made, f"the personal copy of {version}", agent)


def test_an_agent_tunes_each_rollout_on_its_images_and_serves_the_copy(
    mosquitto, coordinator_factory, agent_factory, bundle_factory, fmnist_dir, tmp_path
):
    bundle = bundle_factory(labels=FASHION_MNIST_LABELS, formats=("ort-training", "step"))
    key, pub = ensure_keypair(tmp_path / "keys")
    coord = coordinator_factory(mosquitto.url, bundle=bundle)
    state = tmp_path / "state-dev-1"
    plain = agent_factory(mosquitto.url, state=state, bundle=bundle, extra=("--coordinator-key", str(pub)))
    coord.wait_status(plain, lambda b: b["state"] == "online", "online")

    def push(rid: int, version: str, seed: int) -> dict:
        return _push(coord, key, rid, version, seed)

    def copy_of(version: str, agent):
        return _copy_of(coord, state, version, agent)

    # Installed while personal tuning was off: served as signed, no copy.
    r1 = push(1, "r1", 11)
    coord.wait_status(plain, lambda b: b["adapter_version"] == "r1", "rollout 1 installed")
    assert Ledger.read(state).entry("r1").personal is None
    assert plain.terminate() == 0

    # Turned on: the next start tunes the adapter in use; inference switches to the copy.
    tuning = {"personal": {"mu": 1.0, "epochs": 3, "lr": 0.01, "batch_size": 16}}
    agent = agent_factory(
        mosquitto.url, state=state, bundle=bundle, config=tuning, extra=("--coordinator-key", str(pub))
    )
    path = copy_of("r1", agent)
    mine, meta = load_adapter(path)
    assert meta.parent_version == "r1" and meta.strategy == "personal"
    assert any(not np.array_equal(mine[k], v) for k, v in r1.items()), "nothing was tuned"
    clf = Classifier.from_state(state, bundle=bundle, poll=0.05)
    try:
        assert clf.adapter_version == "r1+personal"
        images = sorted(p for p in fmnist_dir.rglob("*.png") if p.name != "corrupt.png")[:8]
        preds = clf.predict_files(images)
        assert preds.adapter_version == "r1+personal" and preds.logits.shape == (8, len(FASHION_MNIST_LABELS))
        assert np.isfinite(preds.logits).all()

        # A new rollout: the agent acknowledges it, tunes it, and the classifier follows to its copy.
        push(2, "r2", 22)
        coord.wait_status(agent, lambda b: b["adapter_version"] == "r2", "rollout 2 installed")
        copy_of("r2", agent)
        # its retained status says so, as the coordinator's fleet view reads it
        st = coord.wait_status(agent, lambda b: b["adapter_version"] == "r2" and "personal" in b, "r2's copy")
        seen = status_from_message("dev-1", st)
        assert seen.adapter_version == "r2" and 0 <= seen.info["personal"]["accuracy"] <= 1
        assert seen.info["personal"]["mu"] == 1.0
        eventually(lambda: clf.adapter_version == "r2+personal", 30, "the classifier on r2's copy")
        record = Ledger.read(state).entry("r2")
        assert record.source == "rollout" and record.rollout == 2
    finally:
        clf.close()
    assert agent.terminate() == 0
    text = agent.text()
    # tuned once per adapter (a tuning a message paused is resumed, not started over)
    for v in ("r1", "r2"):
        assert text.count(f"personal tuning of {v}: 3 epochs") == 1, text[-3000:]
        assert text.count(f"personal copy of {v} kept") == 1, text[-3000:]
    assert "starts over" not in text, text[-3000:]
    assert "personal copy of r2 kept: held-out accuracy" in text


def test_a_task_arriving_mid_tuning_is_answered_before_the_tuning_ends(
    mosquitto, coordinator_factory, agent_factory, bundle_factory, fmnist_dir, tmp_path
):
    """A long tuning (hundreds of epochs) and a round's task sent once it is under way: the agent
    pauses the tuning, trains the round and publishes its update, then finishes the tuning; its
    log orders the three. Without yielding the update would come after the copy."""
    bundle = bundle_factory(labels=FASHION_MNIST_LABELS, formats=("ort-training", "step"))
    key, pub = ensure_keypair(tmp_path / "keys")
    coord = coordinator_factory(mosquitto.url, bundle=bundle)
    state = tmp_path / "state-dev-1"
    tuning = {"personal": {"mu": 1.0, "epochs": 400, "lr": 0.01, "batch_size": 16}}
    agent = agent_factory(
        mosquitto.url, state=state, bundle=bundle, config=tuning, extra=("--coordinator-key", str(pub))
    )
    coord.wait_status(agent, lambda b: b["state"] == "online", "online")
    _push(coord, key, 1, "r1", 11)
    coord.wait(lambda: (state / "personal-trainer.ckpt").is_file(), "the tuning under way", agent)
    coord.send_task("dev-1", 1, key=key)
    update = coord.wait_update(agent, 1)
    assert update.envelope.round == 1
    _copy_of(coord, state, "r1", agent)
    assert agent.terminate() == 0
    text = agent.text()
    lines = ("personal tuning of r1: paused", "round 1: update published", "personal tuning of r1: resumed",
             "personal copy of r1 kept")  # fmt: skip
    order = [text.find(line) for line in lines]
    assert -1 not in order and order == sorted(order), (order, text[-3000:])
    assert not (state / "personal-work.ckpt").exists() and not (state / "personal-work.json").exists()
