"""Balanced-softmax training (`loss: balanced-softmax`) and the device's label prior, part by part:
the prior's math and its adapter-metadata form, the task field, the graphs of both training formats
(loss = CE(logits + label_bias), logits untouched, the two backends stepping alike), the agent's
batches and state, the refusals, and the Classifier adding the prior back. The fleet run with real
agents is `test_fleet_lora_agents.py`."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedclip.sdk import label_prior as lp
from fedclip.sdk import messages as m
from fedclip.sdk.adapters import AdapterMeta, adapter_bytes, adapter_from_bytes
from fedclip.sdk.errors import AdapterError, ConfigError, DataError, WireError
from fedclip.sdk.manifest import LABEL_BIAS, Manifest


# ---- the prior ---------------------------------------------------------------------------------
def test_log_prior_and_inference_bias():
    h = np.array([3.0, 0.0, 1.0, 0.0])
    train = lp.log_prior(h, lp.TRAIN_PSEUDO)
    assert train.dtype == np.float32 and abs(float(np.exp(train.astype(np.float64)).sum()) - 1) < 1e-6
    np.testing.assert_allclose(train, np.log((h + 0.1) / (h + 0.1).sum()), rtol=1e-6)
    # an unseen label is far less likely under the training prior than under the inference one
    infer = lp.log_prior(h, lp.INFER_PSEUDO)
    assert train[1] < infer[1] - 1.5
    np.testing.assert_allclose(lp.inference_bias(tuple(h), 4, 0.5, "t"), 0.5 * infer, rtol=1e-6)
    assert lp.inference_bias((), 4, 1.0, "t") is None and lp.inference_bias(tuple(h), 4, 0.0, "t") is None
    with pytest.raises(AdapterError, match="3 counts, the bundle has 4 labels"):
        lp.inference_bias((1.0, 2.0, 3.0), 4, 1.0, "t")


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "not JSON"),
        ("[]", "non-empty list"),
        ('{"a": 1}', "non-empty list"),
        ('["a"]', "non-number"),
        ("[true]", "non-number"),
        ("[1, NaN]", "non-number"),
        ("[1e400]", "non-number"),
        ("[1, -1]", "outside"),
        (f"[{10**30}]", "outside"),
        ("[" + ",".join(["1"] * 100_001) + "]", "non-empty list"),
    ],
)
def test_hostile_label_prior_metadata_is_a_one_line_adapter_error(text, message):
    meta = {**AdapterMeta("b", "v1").to_strings(), "label_prior": text}
    blob = adapter_bytes({"x": np.zeros(2, np.float32)}, AdapterMeta("b", "v1"))
    from fedclip.sdk.adapters import decode_tensors, encode_tensors

    tensors, _ = decode_tensors(blob, "t")
    with pytest.raises(AdapterError, match=message) as e:
        adapter_from_bytes(encode_tensors(tensors, meta), "t")
    assert "\n" not in str(e.value)


def test_adapter_metadata_carries_the_prior_and_leaves_other_adapters_unchanged():
    tensors = {"x": np.arange(3, dtype=np.float32)}
    plain = AdapterMeta("b", "v1", round=2)
    assert "label_prior" not in plain.to_strings()  # same bytes (content address) as before format 2
    with_prior = dataclasses.replace(plain, label_prior=(3.0, 0.0, 1.5))
    assert with_prior.to_strings()["label_prior"] == "[3, 0, 1.5]"
    _, meta = adapter_from_bytes(adapter_bytes(tensors, with_prior), "t")
    assert meta == with_prior
    _, meta = adapter_from_bytes(adapter_bytes(tensors, plain), "t")
    assert meta.label_prior == ()


# ---- the task field ------------------------------------------------------------------------------
def test_task_loss_travels_only_when_not_ce_and_bad_values_are_refused():
    assert "loss" not in m.Hyperparameters().to_body()  # agents that predate it read CE tasks as before
    hp = m.Hyperparameters(loss="balanced-softmax")
    task = m.Task(3, "b1", 100.0, hyperparameters=hp)
    payload = m.encode(task, "f", "cam1")
    assert m.decode(m.Task, payload, fleet="f", agent="cam1").hyperparameters.loss == "balanced-softmax"
    for bad in ("focal", 3, None, ["ce"], "CE"):
        with pytest.raises(WireError, match="'loss' must be one of ce, balanced-softmax") as e:
            m.Hyperparameters.parse({"loss": bad}, "t")
        assert "\n" not in str(e.value)
    with pytest.raises(WireError, match="loss"):
        m.Hyperparameters(loss="focal")


# ---- refusals: a bundle whose graphs cannot take the bias ---------------------------------------
def _without_bias(manifest: Manifest) -> Manifest:
    graphs = {
        k: dataclasses.replace(g, inputs=tuple(i for i in g.inputs if i != LABEL_BIAS))
        for k, g in manifest.graphs.items()
    }
    return dataclasses.replace(manifest, format_version=1, graphs=graphs)


def test_balanced_tasks_and_configs_are_refused_for_bundles_without_label_bias(tiny_bundle, tmp_path):
    from fedclip.coordinator.config import CoordConfig
    from fedclip.coordinator.server.setup import check_bundle
    from fedclip.device_agent.task import parse_task
    from fedclip.sdk.wire import Envelope, MsgType, decode, encode

    manifest = Manifest.load(tiny_bundle)
    assert manifest.format_version == 2 and manifest.takes_label_bias
    old = _without_bias(manifest)
    body = {"bundle_id": manifest.bundle_id, "hyperparameters": {"loss": "balanced-softmax"}}
    msg = decode(encode(Envelope(MsgType.TASK, "f", "cam1", round=1, body=body)), fleet="f")
    assert parse_task(msg, manifest, "cam1", "task").hyperparameters.loss == "balanced-softmax"
    with pytest.raises(WireError, match="needs a classify bundle whose training graphs take label_bias"):
        parse_task(msg, old, "cam1", "task")

    where = dict(broker="mqtt://x:1", fleet="f", bundle=tiny_bundle, state=tmp_path)
    cfg = CoordConfig(**where, loss="balanced-softmax")
    assert cfg.hyperparameters().loss == "balanced-softmax"
    check_bundle(cfg, manifest)
    with pytest.raises(ConfigError, match="loss: balanced-softmax needs a classify bundle"):
        check_bundle(cfg, old)
    with pytest.raises(ConfigError, match="loss"):
        CoordConfig(**where, loss="focal")  # type: ignore[arg-type]  # the point: a bad value


def test_the_coordinators_default_loss_resolves_against_the_bundle(tiny_bundle, tmp_path):
    """`loss: auto`: balanced softmax where the bundle's training graphs take label_bias, plain CE
    where they do not (an older bundle starts as before instead of being refused); a task never
    says auto."""
    from fedclip.coordinator.config import CoordConfig
    from fedclip.coordinator.server.setup import check_bundle

    manifest = Manifest.load(tiny_bundle)
    old = _without_bias(manifest)
    cfg = CoordConfig(broker="mqtt://x:1", fleet="f", bundle=tiny_bundle, state=tmp_path)
    assert cfg.loss == lp.AUTO
    with pytest.raises(ConfigError, match="loss: auto is resolved against the bundle"):
        cfg.hyperparameters()
    assert cfg.with_loss_for(manifest).hyperparameters().loss == "balanced-softmax"
    assert cfg.with_loss_for(old).hyperparameters().loss == "ce"
    check_bundle(cfg, manifest)
    check_bundle(cfg, old)  # auto is ce there: not refused
    for loss in lp.LOSSES:  # asked for, kept (balanced softmax on `old`: refused by check_bundle)
        assert dataclasses.replace(cfg, loss=loss).with_loss_for(old).loss == loss


# ---- the graphs: both training formats -----------------------------------------------------------
def _ce(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


@pytest.mark.slow
def test_both_formats_compute_ce_of_logits_plus_bias_and_step_alike(bundle_factory):
    """The loss is CE(logits + label_bias), the logits output is the model's own, a missing bias is
    zeros (plain CE), and one AdamW step with a bias moves both backends' tensors alike, and
    differently from a step without it (the bias reaches the gradient)."""
    from fedclip.device_agent.step_backend import make_trainer

    bundle = bundle_factory(labels=("a", "b", "c"), formats=("ort-training", "step"))
    manifest = Manifest.load(bundle)
    rng = np.random.default_rng(0)
    s = manifest.preprocess.image_size
    x = rng.standard_normal((6, 3, s, s)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 0, 1], np.int64)
    bias = np.broadcast_to(lp.log_prior([20, 5, 0], lp.TRAIN_PSEUDO), (6, 3)).copy()
    plain, biased = {"image": x, "labels": y}, {"image": x, "labels": y, LABEL_BIAS: bias}

    stepped = {}
    for backend in ("ort-training", "step"):
        trainer = make_trainer(bundle, backend=backend, threads=1)
        out0, out1 = trainer.eval_step(plain), trainer.eval_step(biased)
        np.testing.assert_array_equal(out0["logits"], out1["logits"])
        assert abs(float(out0["loss"]) - _ce(out0["logits"], y)) < 1e-4
        assert abs(float(out1["loss"]) - _ce(out1["logits"] + bias, y)) < 1e-4
        assert abs(float(out1["loss"]) - float(out0["loss"])) > 0.1
        start = trainer.get_tensors("trainable")
        trainer.set_lr(1e-2)
        trainer.train_step(biased)
        stepped[backend] = trainer.get_tensors("trainable")
        trainer.set_tensors(start)
        trainer.reset_optimizer()
        trainer.train_step(plain)
        unbiased = trainer.get_tensors("trainable")
        assert any(not np.allclose(stepped[backend][k], unbiased[k], atol=1e-6) for k in unbiased)
    for k, a in stepped["ort-training"].items():
        np.testing.assert_allclose(a, stepped["step"][k], atol=2e-5, rtol=0, err_msg=k)


def test_torch_twin_matches_the_exported_loss_with_bias(tiny_bundle):
    import torch

    from fedclip.exporters.bundle import torch_twin
    from fedclip.exporters.tasks import ClassifyGraph

    manifest = Manifest.load(tiny_bundle)
    twin = torch_twin(manifest)
    assert isinstance(twin.graph, ClassifyGraph)
    s = manifest.preprocess.image_size
    x = torch.randn(4, 3, s, s, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    bias = torch.from_numpy(lp.log_prior(np.arange(10), lp.TRAIN_PSEUDO)).expand(4, -1)
    with torch.no_grad():
        loss0, logits0 = twin.graph.eval()(x, y)
        loss1, logits1 = twin.graph(x, y, bias)
    assert torch.equal(logits0, logits1)
    assert abs(float(loss1) - _ce((logits1 + bias).numpy(), y.numpy())) < 1e-5
    assert abs(float(loss0) - _ce(logits0.numpy(), y.numpy())) < 1e-5


# ---- the agent's batches and state -------------------------------------------------------------
def test_batch_source_feeds_the_prior_row_per_sample(bundle_factory, tmp_path):
    from fixtures_data import synthetic_images

    from fedclip.device_agent.batches import BatchSource
    from fedclip.sdk.data import Dataset

    bundle = bundle_factory(labels=("a", "b", "c"))
    manifest = Manifest.load(bundle)
    labels = manifest.task.labels
    data = synthetic_images(tmp_path / "d", labels, {"a": 3, "c": 2}, seed=0)
    source = BatchSource(manifest, bundle, Dataset.open(data, labels=labels, kind="classify"))
    inputs, n = next(source.batches(8))
    assert n == 5 and LABEL_BIAS not in inputs  # the trainers feed zeros
    row = lp.log_prior(np.bincount(inputs["labels"], minlength=len(labels)), lp.TRAIN_PSEUDO)
    source.label_bias = row
    inputs, _ = next(source.batches(8))
    assert inputs[LABEL_BIAS].shape == (5, len(labels)) and inputs[LABEL_BIAS].flags.c_contiguous
    assert all(np.array_equal(r, row) for r in inputs[LABEL_BIAS])


def test_agent_state_stamps_its_prior_on_every_adapter_it_keeps(tmp_path):
    from fedclip.device_agent.state import AgentState
    from fedclip.sdk.adapters import load_adapter

    tensors = {"x": np.ones(2, np.float32)}
    state = AgentState(tmp_path / "s", agent_id="cam1", fleet="f", bundle_id="b" * 64)
    try:
        path = state.install_adapter("v1", tensors, AdapterMeta("b" * 64, "v1"), source="task")
        assert load_adapter(path)[1].label_prior == ()
        state.set_label_prior((4.0, 0.0, 2.0))
        path = state.install_adapter("v2", tensors, AdapterMeta("b" * 64, "v2"), source="rollout")
        assert load_adapter(path)[1].label_prior == (4.0, 0.0, 2.0)
    finally:
        state.close()
    state = AgentState(tmp_path / "s", agent_id="cam1", fleet="f", bundle_id="b" * 64)
    try:  # kept across restarts; a CE task clears it
        assert state.label_prior() == (4.0, 0.0, 2.0)
        state.set_label_prior(())
        path = state.install_adapter("v3", tensors, AdapterMeta("b" * 64, "v3"), source="rollout")
        assert load_adapter(path)[1].label_prior == ()
    finally:
        state.close()


# ---- inference: the Classifier adds the prior back ----------------------------------------------
def test_classifier_adds_a_balanced_adapters_prior_over_the_bundle_labels(tiny_bundle, tmp_path):
    from fedclip.device_agent.classifier import Classifier
    from fedclip.device_agent.step_backend import make_trainer

    manifest = Manifest.load(tiny_bundle)
    trainer = make_trainer(tiny_bundle, threads=1)
    counts = tuple(float(c) for c in range(10))
    paths = {}
    for name, prior in (("plain", ()), ("balanced", counts), ("wrong", counts[:3])):
        paths[name] = tmp_path / f"{name}.safetensors"
        meta = AdapterMeta(manifest.bundle_id, f"v-{name}", label_prior=prior)
        trainer.save_adapter(paths[name], meta, which="trainable")
    frames = np.random.default_rng(0).integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
    frames = list(frames)

    with Classifier.from_bundle(tiny_bundle, adapter=paths["plain"], threads=1) as clf:
        assert not clf.label_prior
        base = clf.predict(frames).logits
    with Classifier.from_bundle(tiny_bundle, adapter=paths["balanced"], threads=1) as clf:
        assert clf.label_prior
        np.testing.assert_allclose(
            clf.predict(frames).logits, base + lp.log_prior(counts, lp.INFER_PSEUDO), atol=1e-5
        )
        own = list(manifest.task.labels[:3])  # other labels (open vocabulary): no prior to add
        custom = clf.predict(frames, labels=["a cat", "a dog"]).logits
    with Classifier.from_bundle(tiny_bundle, adapter=paths["plain"], threads=1) as clf:
        np.testing.assert_allclose(clf.predict(frames, labels=["a cat", "a dog"]).logits, custom, atol=1e-5)
        assert clf.predict(frames, labels=own).logits.shape == (3, 3)
    with Classifier.from_bundle(tiny_bundle, adapter=paths["balanced"], threads=1, prior_weight=0) as clf:
        assert not clf.label_prior
        np.testing.assert_allclose(clf.predict(frames).logits, base, atol=1e-5)
    with pytest.raises(AdapterError, match="3 counts, the bundle has 10 labels"):
        Classifier.from_bundle(tiny_bundle, adapter=paths["wrong"], threads=1)
    with pytest.raises(DataError, match="prior_weight"):
        Classifier.from_bundle(tiny_bundle, threads=1, prior_weight=math.nan)


# ---- the local commands ---------------------------------------------------------------------------
@pytest.mark.slow
def test_local_train_eval_and_predict_with_balanced_softmax(bundle_factory, tmp_path):
    import json
    import subprocess
    import sys

    from fixtures_data import synthetic_images

    from fedclip.sdk.adapters import load_adapter
    from fedclip.sdk.data import Dataset

    bundle = bundle_factory(labels=("a", "b", "c"))
    labels = ("a", "b", "c")
    data = synthetic_images(tmp_path / "d", labels, {"a": 12, "b": 4}, seed=1)
    adapter = tmp_path / "bsm.safetensors"

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "fedclip.device_agent.cli",
            *args,
            "--bundle",
            str(bundle),
            "--threads",
            "1",
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    bad = cli("train", "--data", str(data), "--loss", "focal", "--json")
    assert bad.returncode != 0 and "--loss: 'focal' is not one of ce, balanced-softmax" in bad.stderr
    done = cli("train", "--data", str(data), "--loss", "balanced-softmax", "--holdout", "0.25",
               "--epochs", "2", "--lr", "0.01", "--out", str(adapter), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    train, _ = Dataset.open(data, labels=labels, kind="classify").split(0.25)
    counts = train.label_counts()
    assert counts[2] == 0 and load_adapter(adapter)[1].label_prior == tuple(counts.tolist())

    results = {}
    for w in ("1", "0"):
        out = cli("eval", "--data", str(data), "--adapter", str(adapter), "--prior-weight", w, "--json")
        assert out.returncode == 0, out.stderr[-2000:]
        results[w] = json.loads(out.stdout.strip().splitlines()[-1])
    assert results["1"]["label_prior"] is True and results["0"]["label_prior"] is False
    assert results["1"]["loss"] == results["0"]["loss"]  # the prior changes the argmax only

    image = str(next((data / "a").iterdir()))
    scores = {}
    for w in ("1", "0"):
        out = cli("predict", image, "--adapter", str(adapter), "--prior-weight", w, "--top-k", "3", "--json")
        assert out.returncode == 0, out.stderr[-2000:]
        top = json.loads(out.stdout)["predictions"][0]["top"]
        scores[w] = {t["label"]: t["score"] for t in top}
    # with the prior, the unseen label "c" moves against "a" by exactly the prior's difference
    prior = lp.log_prior(counts, lp.INFER_PSEUDO)
    shift = np.log(scores["1"]["c"] / scores["1"]["a"]) - np.log(scores["0"]["c"] / scores["0"]["a"])
    assert abs(shift - float(prior[2] - prior[0])) < 1e-3
