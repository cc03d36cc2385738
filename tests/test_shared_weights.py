"""Frozen weights through one memory map (`weights_index.json` + `device_agent.shared_weights`):
identical results with and without the index, one mapping for all sessions, bad indexes refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedclip.device_agent.shared_weights import INDEX_FILE, shared_initializers
from fedclip.sdk.errors import BundleError
from fedclip.sdk.manifest import Manifest


@pytest.fixture(scope="module")
def step_bundle(bundle_factory) -> Path:
    return bundle_factory(formats=("step",))


def _copy(src: Path, dst: Path, edit=None) -> Path:
    """A copy of the bundle, `edit(dst)` applied, resealed (as an exporter would have written it)."""
    shutil.copytree(src, dst)
    if edit is not None:
        edit(dst)
    Manifest.load(dst, verify=False).seal(dst)
    return dst


def _batch(manifest, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = manifest.preprocess.image_size
    return {
        "image": rng.standard_normal((4, 3, s, s)).astype(np.float32),
        "labels": rng.integers(0, len(manifest.task.labels), 4).astype(np.int64),
    }


def test_export_writes_an_index_the_manifest_covers(step_bundle):
    from onnx import load

    m = Manifest.load(step_bundle)
    assert INDEX_FILE in m.files
    doc = json.loads((step_bundle / INDEX_FILE).read_text())
    assert set(doc["graphs"]) >= {
        m.graphs["step"].file,
        m.graphs["step_eval"].file,
        m.graphs["inference"].file,
    }
    # Every entry is exactly the graph's own external-data record.
    model = load(str(step_bundle / m.graphs["step"].file), load_external_data=False)
    ext = {
        t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer if t.external_data
    }
    entries = doc["graphs"][m.graphs["step"].file]
    assert entries and set(entries) == set(ext)
    for name, e in entries.items():
        assert (e["offset"], e["length"]) == (int(ext[name]["offset"]), int(ext[name]["length"]))


def test_step_trainer_and_predictor_agree_with_and_without_the_index(step_bundle, tmp_path):
    from fedclip.device_agent.predictor import Predictor
    from fedclip.device_agent.step_backend import StepTrainer

    plain = _copy(step_bundle, tmp_path / "plain", lambda d: (d / INDEX_FILE).unlink())
    results = []
    for bundle in (step_bundle, plain):
        tr = StepTrainer(bundle, threads=1)
        tr.set_lr(1e-2)
        losses = [tr.train_step(_batch(tr.manifest, i % 2)) for i in range(4)]
        logits = tr.eval_step(_batch(tr.manifest, 5))["logits"]
        pred = Predictor(bundle, adapter=tr.get_tensors("trainable"), threads=1).predict(
            _batch(tr.manifest, 7)["image"]
        )
        results.append((losses, logits, pred))
    (la, ga, pa), (lb, gb, pb) = results
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-6)


_MAPPED_PROBE = """
import sys
from pathlib import Path
import numpy as np
from fedclip.device_agent.predictor import Predictor
from fedclip.device_agent.step_backend import StepTrainer
tr = StepTrainer(sys.argv[1], threads=1)
s = tr.manifest.preprocess.image_size
batch = {"image": np.zeros((2, 3, s, s), np.float32), "labels": np.zeros(2, np.int64)}
tr.train_step(batch)
tr.eval_step(batch)
Predictor(sys.argv[1], adapter=tr.get_tensors("trainable"), threads=1).predict(batch["image"])
maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith("weights.bin")]
print(len(maps))
"""


def _mappings(bundle: Path) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", _MAPPED_PROBE, str(bundle)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_three_sessions_share_one_mapping_of_the_weights(step_bundle, tmp_path):
    """Step, step_eval and inference sessions in one process map weights.bin once. Without the index
    ORT maps it itself, once per session and large tensor (each mapping's pages count in the RSS:
    ViT-B-32 peak 1.3 GB instead of 0.83 GB, benchmarks/results/step.md)."""
    assert _mappings(step_bundle) == 1
    plain = _copy(step_bundle, tmp_path / "plain", lambda d: (d / INDEX_FILE).unlink())
    # The control, and the lean session options at work: ORT maps weights instead of copying them.
    assert _mappings(plain) >= 3


def _edit_index(fn):
    def edit(d: Path) -> None:
        doc = json.loads((d / INDEX_FILE).read_text())
        fn(doc)
        (d / INDEX_FILE).write_text(json.dumps(doc))

    return edit


def _first_entry(doc: dict) -> dict:
    entries = next(e for e in doc["graphs"].values() if e)
    return entries[sorted(entries)[0]]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda doc: _first_entry(doc).update(offset=10**12), "does not fit"),
        (lambda doc: _first_entry(doc).update(shape=[3, 5]), "does not fit"),
        (lambda doc: _first_entry(doc).update(dtype="object"), "dtype"),
        (lambda doc: doc.update(weights="../etc/passwd"), "not a file of the bundle"),
        (lambda doc: doc.update(format=99), "unknown format"),
    ],
    ids=["offset", "shape", "dtype", "path", "format"],
)
def test_a_bad_index_is_one_clear_error(step_bundle, tmp_path, edit, message):
    bad = _copy(step_bundle, tmp_path / "bad", _edit_index(edit))
    m = Manifest.load(bad)
    file = m.graphs["step"].file
    with pytest.raises(BundleError, match=message) as err:
        for g in (file, m.graphs["step_eval"].file, m.graphs["inference"].file):
            shared_initializers(bad, m, g)
    assert "\n" not in str(err.value)


def test_an_index_the_manifest_does_not_list_is_ignored(step_bundle, tmp_path):
    unlisted = _copy(step_bundle, tmp_path / "unlisted", lambda d: (d / INDEX_FILE).unlink())
    shutil.copy(step_bundle / INDEX_FILE, unlisted / INDEX_FILE)  # appears after sealing
    m = Manifest.load(unlisted)
    assert shared_initializers(unlisted, m, m.graphs["step"].file) == {}
    assert shared_initializers(step_bundle, Manifest.load(step_bundle), m.graphs["step"].file)
