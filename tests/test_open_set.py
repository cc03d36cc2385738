"""The open-set gate (`device_agent.open_set`): its math on embeddings whose answer is known, its
refusals, and the `Classifier` serving with it on a real bundle (real ONNX Runtime): images like
the device's own keep the label prior, the others get the bundle's own model without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from waiting import eventually

from fedclip.device_agent.open_set import DEFAULT_QUANTILE, OpenSet, fit_gate
from fedclip.sdk.adapters import AdapterMeta, load_adapter, save_adapter
from fedclip.sdk.data import label_folder_name
from fedclip.sdk.errors import DataError
from fedclip.sdk.manifest import Manifest


def _clusters(centres: np.ndarray, n: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c + spread * rng.standard_normal((n, len(c))) for c in centres])


def test_the_gate_keeps_the_devices_own_labels_and_sends_the_others_away():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 16)) * 3  # five labels, far apart
    own_labels = np.repeat([1, 3], 40)  # the device has seen labels 1 and 3
    train = _clusters(centres[[1, 3]], 40, 0.3, 1)
    gate = fit_gate(train, own_labels, 0.05)
    assert gate.labels == (1, 3) and gate.means.shape == (2, 16) and gate.var.shape == (16,)
    # the threshold is the quantile of the training images' own nearness: 5% of them fall under it
    assert abs((~gate.keeps(train)).mean() - 0.05) <= 1 / len(train)
    fresh_own = _clusters(centres[[1, 3]], 50, 0.3, 2)
    unseen = _clusters(centres[[0, 2, 4]], 50, 0.3, 3)
    assert gate.keeps(fresh_own).mean() >= 0.85
    assert not gate.keeps(unseen).any()
    # unit embeddings: a rescaled embedding is the same image
    np.testing.assert_array_equal(gate.keeps(7.5 * unseen), gate.keeps(unseen))
    # a larger quantile sends more of the device's own images away
    assert (~fit_gate(train, own_labels, 0.3).keeps(fresh_own)).sum() > (~gate.keeps(fresh_own)).sum()


def test_a_single_label_device_and_a_constant_dimension_still_give_a_finite_gate():
    e = np.zeros((10, 4))
    e[:, 0] = 1.0  # every training embedding the same: zero variance on every axis
    gate = fit_gate(e, np.zeros(10, dtype=np.int64))
    assert gate.labels == (0,) and np.all(np.isfinite(gate.var)) and np.isfinite(gate.threshold)
    assert gate.keeps(e).all()
    assert not gate.keeps(np.array([[0.0, 1.0, 0.0, 0.0]])).any()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: OpenSet(Path("d"), 0.0), "quantile must be in"),
        (lambda: OpenSet(Path("d"), 0.5), "quantile must be in"),
        (lambda: OpenSet(Path("d"), float("nan")), "quantile must be in"),
        (lambda: fit_gate(np.ones((4, 3)), np.array([0, 1, 0, 1]), 2.0), "quantile must be in"),
        (lambda: fit_gate(np.ones((4, 3)), np.array([0.0, 1.0, 0.0, 1.0])), "labels must be integers"),
        (lambda: fit_gate(np.ones((1, 3)), np.array([0])), "at least 2 training images"),
        (lambda: fit_gate(np.ones((3, 3)), np.array([0, 1, 0, 1])), "3 embeddings for 4 labels"),
        (lambda: fit_gate(np.full((2, 3), np.nan), np.array([0, 1])), "not finite"),
        (lambda: fit_gate(np.ones(6), np.array([0, 1])), "must be [N, D]"),
        (lambda: fit_gate(np.eye(3), np.arange(3)).keeps(np.ones((2, 4))), "must be [N, 3]"),
    ],
)
def test_bad_input_is_a_one_line_data_error(call, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        call()
    assert "\n" not in str(info.value)


# ---- the Classifier serving with the gate (real bundle, real ONNX Runtime) ------------------------
def _frames(n: int, level: int, seed: int) -> list[np.ndarray]:
    """Near-uniform frames of one grey level: the device's own kind of image."""
    rng = np.random.default_rng(seed)
    return [np.clip(level + rng.integers(-6, 7, (32, 32, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


def _noise(n: int, seed: int) -> list[np.ndarray]:
    """Frames of uniform noise: nothing like the device's own images."""
    return list(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def _device(bundle: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(the device's own images: two labels, 12 frames each, dark for the first and light for the
    second; an adapter that moves the model, B != 0, with the device's label prior in its metadata)."""
    from fedclip.device_agent.step_backend import make_trainer

    manifest = Manifest.load(bundle)
    labels = manifest.task.labels
    own = tmp_path / "own"
    for k, level in ((0, 40), (1, 200)):
        folder = own / label_folder_name(labels[k])
        folder.mkdir(parents=True)
        for i, f in enumerate(_frames(12, level, k)):
            Image.fromarray(f).save(folder / f"{i}.png")
    trainer = make_trainer(bundle, threads=1)
    rng = np.random.default_rng(0)
    tensors = {n: t + 0.05 * rng.standard_normal(t.shape).astype(t.dtype)
               for n, t in trainer.get_tensors("trainable").items()}  # fmt: skip
    counts = (12.0, 12.0) + (0.0,) * (len(labels) - 2)
    meta = AdapterMeta(manifest.bundle_id, "v1", label_prior=counts)
    return own, save_adapter(tmp_path / "a.safetensors", tensors, meta)


def test_the_classifier_scores_what_its_gate_sends_away_with_the_bundles_own_model(tiny_bundle, tmp_path):
    from fedclip.device_agent.classifier import Classifier

    own, adapter = _device(tiny_bundle, tmp_path)
    frames = _frames(6, 40, 10) + _frames(6, 200, 11) + _noise(8, 12)
    with Classifier.from_bundle(tiny_bundle, adapter=adapter, threads=1) as plain:
        with_prior = plain.predict(frames).logits
        assert plain.open_set_gate is None
    with Classifier.from_bundle(tiny_bundle, threads=1) as bundle_own:
        base = bundle_own.predict(frames).logits
    with Classifier.from_bundle(tiny_bundle, adapter=adapter, threads=1, open_set=OpenSet(own)) as clf:
        gate = clf.open_set_gate
        assert gate is not None and gate.labels == (0, 1)
        kept = gate.keeps(clf.embed_images(frames))
        assert kept[:12].mean() >= 0.75 and not kept[12:].any()  # own kinds kept, noise sent away
        got = clf.predict(frames).logits
        np.testing.assert_allclose(got[kept], with_prior[kept], atol=1e-5)
        np.testing.assert_allclose(got[~kept], base[~kept], atol=1e-5)  # no adapter, no prior
        # the prior would have called every noise frame one of the two labels the device has seen
        assert set(with_prior[12:].argmax(axis=1)) <= {0, 1}
        assert not np.allclose(got[~kept], with_prior[~kept], atol=1e-3)
        assert clf.swap_stats().open_set_sent_away == int((~kept).sum())
        # other labels (open vocabulary) have no prior, so nothing to gate
        other = clf.predict(frames, labels=["a cat", "a dog"]).logits
    with Classifier.from_bundle(tiny_bundle, adapter=adapter, threads=1) as plain:
        np.testing.assert_allclose(plain.predict(frames, labels=["a cat", "a dog"]).logits, other, atol=1e-5)


def test_the_gate_sends_away_to_the_fleets_adapter_when_one_was_delivered(tiny_bundle, tmp_path):
    from fedclip.device_agent.classifier import Classifier
    from fedclip.device_agent.state import AgentState

    own, adapter = _device(tiny_bundle, tmp_path)
    bid = Manifest.load(tiny_bundle).bundle_id
    tensors, meta = load_adapter(adapter)
    rng = np.random.default_rng(1)  # the fleet's global adapter: another moved model, no prior
    fleet_t = {n: t + 0.05 * rng.standard_normal(t.shape).astype(t.dtype) for n, t in tensors.items()}
    fleet = save_adapter(tmp_path / "g.safetensors", fleet_t, AdapterMeta(bid, "g-r1"))
    frames = _frames(6, 40, 10) + _frames(6, 200, 11) + _noise(8, 12)
    with Classifier.from_bundle(tiny_bundle, adapter=fleet, threads=1) as f:
        fleet_logits = f.predict(frames).logits
    with Classifier.from_bundle(tiny_bundle, threads=1) as b:
        base = b.predict(frames).logits
    assert not np.allclose(fleet_logits, base, atol=1e-3)  # the two fallbacks tell apart
    gated = dict(threads=1, open_set=OpenSet(own))
    with Classifier.from_bundle(tiny_bundle, adapter=adapter, fallback=fleet, **gated) as clf:
        kept = clf.open_set_gate.keeps(clf.embed_images(frames))
        assert (~kept).sum() >= 8  # the noise at least
        got = clf.predict(frames).logits
        np.testing.assert_allclose(got[~kept], fleet_logits[~kept], atol=1e-5)
        assert clf.swap_stats().open_set_fallback == "g-r1"

    # following the agent: the fallback its ledger entry carries, and none once an adapter without one
    state = AgentState(tmp_path / "agent", agent_id="d1", fleet="f", bundle_id=bid)
    fb = (fleet_t, AdapterMeta(bid, "g-r1"))
    state.install_adapter("a-d1-r1", tensors, meta, source="rollout", fallback=fb)
    try:
        with Classifier.from_state(state.root, tiny_bundle, poll=0.1, **gated) as clf:
            np.testing.assert_allclose(clf.predict(frames).logits[~kept], fleet_logits[~kept], atol=1e-5)
            state.install_adapter("v2", tensors, meta, source="rollout")
            assert clf.wait_for("v2", 30)
            np.testing.assert_allclose(clf.predict(frames).logits[~kept], base[~kept], atol=1e-5)
            assert clf.swap_stats().open_set_fallback is None
            # the version in use gets its fallback later (a second rollout with --fallback): followed
            state.keep_fallback("v2", *fb)
            eventually(lambda: clf.swap_stats().open_set_fallback == "g-r1", 30, "the new fallback served")
            np.testing.assert_allclose(clf.predict(frames).logits[~kept], fleet_logits[~kept], atol=1e-5)
            # a fallback that cannot be loaded (another bundle's) keeps no adapter out: the bundle's
            # own model takes its place, and the failure is counted
            state.install_adapter(
                "v3", tensors, meta, source="rollout", fallback=(fleet_t, AdapterMeta("0" * 64, "g-r9"))
            )
            assert clf.wait_for("v3", 30)
            stats = clf.swap_stats()
            assert (stats.open_set_fallback, stats.load_failures) == (None, 1)
            np.testing.assert_allclose(clf.predict(frames).logits[~kept], base[~kept], atol=1e-5)
        other = save_adapter(tmp_path / "o.safetensors", fleet_t, AdapterMeta("0" * 64, "g-r1"))
        for call, why in (
            (lambda: Classifier.from_bundle(tiny_bundle, adapter=adapter, fallback=fleet), "pass open_set"),
            (lambda: Classifier.from_bundle(tiny_bundle, adapter=adapter, fallback=other, **gated), "bundle"),
            (
                lambda: Classifier.from_state(state.root, tiny_bundle, fallback=fleet, **gated),
                "fixed adapters",
            ),
        ):
            with pytest.raises(DataError, match=why) as info:
                call()
            assert "\n" not in str(info.value)
    finally:
        state.close()


def test_a_gate_without_own_images_is_refused_and_without_a_prior_it_is_off(tiny_bundle, tmp_path):
    from fedclip.device_agent.classifier import Classifier

    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "missing", empty):
        with pytest.raises(DataError) as info:
            Classifier.from_bundle(tiny_bundle, threads=1, open_set=OpenSet(folder))
        assert "\n" not in str(info.value)
    own = tmp_path / "own" / label_folder_name(Manifest.load(tiny_bundle).task.labels[0])
    own.mkdir(parents=True)
    for i, f in enumerate(_frames(3, 90, 0)):
        Image.fromarray(f).save(own / f"{i}.png")
    # the bundle's own model carries no label prior: nothing to gate
    with Classifier.from_bundle(
        tiny_bundle, threads=1, open_set=OpenSet(own.parent, DEFAULT_QUANTILE)
    ) as clf:
        assert clf.open_set_gate is None
        assert clf.swap_stats().open_set_sent_away == 0


def test_serve_inference_gates_and_shows_it_in_health_and_metrics(tiny_bundle, tmp_path):
    import base64
    import io

    from test_inference_http import Served

    manifest = Manifest.load(tiny_bundle)
    labels = manifest.task.labels
    own = tmp_path / "own" / label_folder_name(labels[3])
    own.mkdir(parents=True)
    for i, f in enumerate(_frames(10, 120, 0)):
        Image.fromarray(f).save(own / f"{i}.png")
    rng = np.random.default_rng(1)
    tensors = {t.name: rng.normal(0, 0.05, t.shape).astype(np.float32) for t in manifest.trainable}
    counts = tuple(10.0 if k == 3 else 0.0 for k in range(len(labels)))
    meta = AdapterMeta(manifest.bundle_id, "v9", label_prior=counts)
    adapter = save_adapter(tmp_path / "v9.safetensors", tensors, meta)

    def png(frame: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    server = Served(tmp_path, "--bundle", str(tiny_bundle), "--adapter", str(adapter), "--port", "0",
                    "--open-set", str(own.parent), "--open-set-quantile", "0.1")  # fmt: skip
    try:
        status, health = server.request("GET", "/health")
        assert status == 200 and health["label_prior"]
        assert health["open_set"] == {
            "labels": [labels[3]],
            "quantile": 0.1,
            "sent_away": 0,
            "fallback": None,
        }
        frames = _noise(4, 7)
        status, answer = server.request("POST", "/predict", {"images": [png(f) for f in frames], "top_k": 1})
        assert status == 200, answer
        from fedclip.device_agent.classifier import Classifier

        with Classifier.from_bundle(tiny_bundle, adapter=adapter, threads=1) as plain:
            with_prior = plain.predict(frames).logits.argmax(axis=1)
        with Classifier.from_bundle(tiny_bundle, threads=1) as bundle_own:
            base = bundle_own.predict(frames).logits.argmax(axis=1)
        got = [labels.index(p["top"][0]["label"]) for p in answer["predictions"]]
        assert got == list(base) and got != list(with_prior)
        sent = server.request("GET", "/health")[1]["open_set"]["sent_away"]
        assert sent == 4
        assert server.metrics()[("fedclip_inference_open_set_sent_away_total", ())] == sent
        assert server.metrics()[("fedclip_inference_open_set_fallback", (("version", ""),))] == 1
    finally:
        assert server.stop() == 0
    with pytest.raises(DataError, match="quantile must be in"):
        OpenSet(own.parent, 0.9)


def test_eval_with_the_gate_answers_as_the_gated_classifier(tiny_bundle, tmp_path):
    """`fedclip-agent eval --open-set`: the accuracy the gated Classifier gives (how an operator
    picks q on held-out images), and a bad quantile refused in one line."""
    import json
    import subprocess
    import sys

    from fedclip.device_agent.classifier import Classifier

    own, adapter = _device(tiny_bundle, tmp_path)
    labels = Manifest.load(tiny_bundle).task.labels
    test = tmp_path / "test"
    frames = {0: _frames(5, 40, 20), 1: _frames(5, 200, 21), 7: _noise(6, 22)}  # 7: a label never seen
    for k, fs in frames.items():
        (test / label_folder_name(labels[k])).mkdir(parents=True)
        for i, f in enumerate(fs):
            Image.fromarray(f).save(test / label_folder_name(labels[k]) / f"{i}.png")

    def run(*extra: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "fedclip.device_agent.cli", "eval", "--bundle", str(tiny_bundle),
                "--adapter", str(adapter), "--data", str(test), "--threads", "1", "--json",
                *extra]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    done = run("--open-set", str(own), "--open-set-quantile", "0.1")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    with Classifier.from_bundle(tiny_bundle, adapter, threads=1, open_set=OpenSet(own, 0.1)) as clf:
        want = [int(np.argmax(row)) for fs in frames.values() for row in clf.predict(fs).logits]
        truth = [k for k, fs in frames.items() for _ in fs]
        sent = clf.swap_stats().open_set_sent_away
    assert got["num_samples"] == len(truth) and got["open_set"] and got["label_prior"]
    assert got["accuracy"] == pytest.approx(np.mean(np.array(want) == np.array(truth)))
    assert got["open_set_sent_away"] == sent >= len(frames[7])
    bad = run("--open-set", str(own), "--open-set-quantile", "0.7")
    assert bad.returncode != 0 and "quantile must be in (0, 0.5)" in bad.stderr
    assert len([ln for ln in bad.stderr.splitlines() if "quantile" in ln]) == 1

    # with the fleet's adapter as the fallback: what the Classifier with that fallback answers
    tensors, _ = load_adapter(adapter)
    rng = np.random.default_rng(5)
    fleet_t = {n: t + 0.2 * rng.standard_normal(t.shape).astype(t.dtype) for n, t in tensors.items()}
    fleet = save_adapter(
        tmp_path / "g.safetensors", fleet_t, AdapterMeta(Manifest.load(tiny_bundle).bundle_id, "g-r3")
    )
    done = run("--open-set", str(own), "--open-set-quantile", "0.1", "--open-set-fallback", str(fleet))
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    gated = dict(threads=1, open_set=OpenSet(own, 0.1), fallback=fleet)
    with Classifier.from_bundle(tiny_bundle, adapter, **gated) as clf:
        want = [int(np.argmax(row)) for fs in frames.values() for row in clf.predict(fs).logits]
    assert got["open_set_fallback"] == "g-r3"
    assert got["accuracy"] == pytest.approx(np.mean(np.array(want) == np.array(truth)))
    alone = run("--open-set-fallback", str(fleet))
    assert alone.returncode != 0 and "give --open-set too" in alone.stderr
