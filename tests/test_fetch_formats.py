"""Devices fetch only what they run: a bundle with both training formats, served by the coordinator's
bundle server over HTTP, fetched for one format (or for inference only), every fetched sha256 checked."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fedclip.coordinator.bundle_server import BundleServer
from fedclip.device_agent.classifier import Classifier
from fedclip.device_agent.step_backend import make_trainer
from fedclip.sdk.errors import BundleError
from fedclip.sdk.fetch import fetch_bundle
from fedclip.sdk.manifest import SHARED, Manifest


@pytest.fixture(scope="module")
def both(bundle_factory):
    return bundle_factory(formats=("ort-training", "step"))


def test_manifest_says_which_files_belong_to_which_format(both):
    m = Manifest.load(both)
    groups = m.format_files()
    assert set(groups) == {"ort-training", "step", SHARED}
    assert {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"} == set(
        groups["ort-training"]
    )
    assert {"step_model.onnx", "step_eval_model.onnx", "initial_tensors.safetensors"} == set(groups["step"])
    # inference reads the shared weights file: it belongs to every device
    assert {"inference_model.onnx", "text_encoder.onnx", "weights.bin"} <= set(groups[SHARED])
    assert sorted(sum(groups.values(), ())) == sorted(m.files)  # every file in exactly one group


def test_fetch_one_format_then_another_over_http(both, tmp_path):
    m = Manifest.load(both)
    served = tmp_path / "served"
    served.mkdir()
    shutil.copytree(both, served / "b")
    dest = tmp_path / "device"
    with BundleServer(served) as server:
        out = fetch_bundle(f"{server.url}/b", dest, formats=("step",), progress=False)
        have = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.yaml"}
        assert have == set(m.format_files()[SHARED]) | set(m.format_files()["step"])
        assert m.present_formats(out) == ("step",)
        Manifest.load(out, verify=True)  # the fetched files verify; the absent format is not asked for
        trainer = make_trainer(out, backend="auto")  # ORT training API installed, but not fetched
        assert type(trainer).__name__ == "StepTrainer"
        fetched = sum((out / r).stat().st_size for r in have)
        assert fetched < sum((both / r).stat().st_size for r in m.files)

        # the same device later runs the ORT training API: only the missing files come
        out2 = fetch_bundle(f"{server.url}/b", dest, formats=("ort-training", "step"), progress=False)
        assert out2 == out and m.present_formats(out) == ("ort-training", "step")

        # a device that only serves inference
        inf = fetch_bundle(f"{server.url}/b", tmp_path / "inference-only", formats=(), progress=False)
        assert m.present_formats(inf) == ()
        assert not (inf / "step_model.onnx").exists() and not (inf / "checkpoint").exists()
        clf = Classifier.from_bundle(inf)
        assert clf.predict([np.zeros((20, 20, 3), np.uint8)]).logits.shape == (1, len(m.task.labels))

        with pytest.raises(BundleError, match="no nope format"):
            fetch_bundle(f"{server.url}/b", tmp_path / "x", formats=("nope",), progress=False)

        # a corrupt file of the chosen format is refused and deleted
        step = served / "b" / "step_model.onnx"
        step.write_bytes(step.read_bytes()[:-1] + b"\0")
        with pytest.raises(BundleError, match="step_model.onnx is corrupt"):
            fetch_bundle(f"{server.url}/b", tmp_path / "bad", formats=("step",), progress=False)
        # ... but a device fetching the other format never reads it
        ok = fetch_bundle(f"{server.url}/b", tmp_path / "ok", formats=("ort-training",), progress=False)
        assert m.present_formats(ok) == ("ort-training",)


def test_a_half_present_format_is_a_missing_file(both, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(both, out)
    (out / "step_model.onnx").unlink()  # step_eval and initial tensors still there
    with pytest.raises(BundleError, match="step_model.onnx listed in the manifest is missing"):
        Manifest.load(out, verify=True)
    shutil.rmtree(out)
    shutil.copytree(both, out)
    (out / "weights.bin").unlink()  # shared: always required
    with pytest.raises(BundleError, match="weights.bin listed in the manifest is missing"):
        Manifest.load(out, verify=True)
