"""`Classifier`: open vocabulary against the bundle's own graph, bad input, and following a real agent
through a signed rollout and its rollback while a thread keeps predicting (real mosquitto, a real
`fedclip-agent start` process, the rollout CLI in its own process)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fixtures_fleet import FLEET
from PIL import Image
from test_rollout_agents import WAIT_S, rollout_cli

from fedclip.device_agent.classifier import Classifier, installed_adapter
from fedclip.sdk.adapters import save_adapter
from fedclip.sdk.errors import DataError
from fedclip.sdk.signing import ensure_keypair


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (28 + i, 30, 3), dtype=np.uint8) for i in range(n)]


def test_open_vocabulary_matches_the_bundle_graph_and_is_cached(tiny_bundle):
    clf = Classifier.from_bundle(tiny_bundle, batch_size=3)
    labels = list(clf.manifest.task.labels)
    imgs = _images(7)
    own = clf.predict(imgs)  # the inference graph's built-in label logits
    assert own.logits.shape == (7, len(labels)) and own.adapter_version is None
    # the same labels reversed go through the text encoder graph: same numbers, reversed
    rev = clf.predict(imgs, labels=labels[::-1])
    np.testing.assert_allclose(rev.logits[:, ::-1], own.logits, atol=1e-4)
    assert rev.labels == tuple(labels[::-1])
    # PIL images and preprocessed arrays give the same answer as uint8 arrays
    pil = clf.predict([Image.fromarray(a) for a in imgs])
    np.testing.assert_allclose(pil.logits, own.logits, atol=1e-6)
    custom = clf.predict(imgs, labels=["cat", "forklift"], prompt="a picture of a {}")
    assert custom.logits.shape == (7, 2) and len(custom.top(2)[0]) == 2
    cached = len(clf._text_cache)
    clf.predict(imgs[:1], labels=["cat", "forklift"], prompt="a picture of a {}")
    assert len(clf._text_cache) == cached  # computed once per (adapter version, prompts)
    e = clf.embed_images(imgs)
    t = clf.embed_texts(["a cat", "a dog"])
    assert e.shape[0] == 7 and t.shape[0] == 2
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)


def test_bad_input_is_a_one_line_data_error(tiny_bundle, tmp_path):
    clf = Classifier.from_bundle(tiny_bundle)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    cases = [
        lambda: clf.predict_files([bad]),
        lambda: clf.predict([]),
        lambda: clf.predict([np.zeros((4, 4, 3), np.float64)]),
        lambda: clf.predict([42]),
        lambda: clf.predict(_images(1), labels=[]),
        lambda: clf.predict(_images(1), labels=["a"], prompt="no placeholder"),
        lambda: clf.embed_texts([]),
    ]
    for case in cases:
        with pytest.raises(DataError) as info:
            case()
        assert "\n" not in str(info.value)


def _reference(bundle, adapter=None) -> Classifier:
    return Classifier.from_bundle(bundle, adapter=adapter)


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_follows_a_rollout_and_its_rollback_while_predicting(
    mosquitto,
    tmp_path,
    world,  # noqa: F811
    agent_factory,  # noqa: F811
    tiny_bundle,
):
    _, source = world
    coord = tmp_path / "coord"
    _, pub = ensure_keypair(coord / "keys")
    tensors, meta = source.load_for("good", "any")
    good_file = save_adapter(tmp_path / "good.safetensors", tensors, meta)
    agent = agent_factory(mosquitto.url, "dev-1", extra=("--coordinator-key", str(pub)))
    common = ["--state", str(coord), "--broker", mosquitto.url, "--fleet", FLEET]

    cli = rollout_cli

    deadline = time.monotonic() + WAIT_S
    while not (agent.state / "state.json").is_file():
        assert time.monotonic() < deadline, agent.tail()
        time.sleep(0.1)
    imgs = _images(4, seed=3)
    clf = Classifier.from_state(agent.state, bundle=tiny_bundle, poll=0.05)
    assert clf.adapter_version is None
    results, errors, stop = [], [], threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                results.append(clf.predict(imgs))
            except Exception as e:  # every failure is recorded, the test fails on any
                errors.append(repr(e))

    worker = threading.Thread(target=hammer, daemon=True)
    worker.start()
    try:
        r = cli("start", str(good_file), "--to", "all", "--wait", "--stage-timeout", str(WAIT_S), *common)
        assert r.returncode == 0, r.stdout + r.stderr + agent.tail()
        assert clf.wait_for("good", WAIT_S), (clf.adapter_version, agent.tail())
        _, version, good_path = installed_adapter(agent.state)
        assert version == "good"
        n_after_install = len(results)
        r = cli("rollback", "1", *common)
        assert r.returncode == 0, r.stdout + r.stderr
        assert clf.wait_for(None, WAIT_S), (clf.adapter_version, agent.tail())
        # keep predicting until some requests were served after the rollback too
        deadline = time.monotonic() + WAIT_S
        while sum(p.adapter_version is None for p in results[n_after_install:]) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=60)
        clf.close()
        agent.terminate()
    assert not errors, errors[:3]
    refs = {
        None: _reference(tiny_bundle).predict(imgs),
        "good": _reference(tiny_bundle, good_path).predict(imgs),
    }
    assert not np.allclose(refs[None].logits, refs["good"].logits, atol=1e-3)  # the switch is visible
    versions = [p.adapter_version for p in results]
    # in order: the bundle's own, then good, then the bundle's own again after the rollback
    runs = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
    assert runs == [None, "good", None], runs
    for p in results:  # never a mixed prediction: each equals the reference of the version it names
        np.testing.assert_allclose(p.logits, refs[p.adapter_version].logits, atol=1e-5)
