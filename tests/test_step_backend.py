"""`StepTrainer` over real step-format bundles: parity with `OrtTrainer`, checkpoints, validation,
backend choice, and a run in the device venv (plain onnxruntime, no torch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedclip.sdk.adapters import AdapterMeta
from fedclip.sdk.errors import AdapterError, BackendError, BundleError, DataError

REPO = Path(__file__).resolve().parents[1]
DEVICE_PY = REPO / ".venv-device" / "bin" / "python"


def _batches(manifest, n_batches: int = 3, size: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    s = manifest.preprocess.image_size
    out = []
    for _ in range(n_batches):
        out.append(
            {
                "image": rng.standard_normal((size, 3, s, s)).astype(np.float32),
                "labels": rng.integers(0, len(manifest.task.labels), size).astype(np.int64),
            }
        )
    return out


@pytest.fixture(scope="module")
def step_bundle(bundle_factory, export_cache, tmp_path_factory) -> Path:
    """The default tiny classify bundle (ORT artifacts) plus the step format."""
    from fedclip.exporters.step_bundle import add_step_format

    src = bundle_factory()
    dst = tmp_path_factory.mktemp("step") / "bundle"
    shutil.copytree(src, dst)
    add_step_format(dst, cache=export_cache)
    return dst


def _train(trainer, batches, steps: int, lr: float = 1e-2) -> list[float]:
    trainer.set_lr(lr)
    return [trainer.train_step(batches[i % len(batches)]) for i in range(steps)]


def test_step_backend_imports_without_torch():
    code = (
        "import sys, fedclip.device_agent.step_backend as s; "
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')], 'torch imported'; "
        "print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_unknown_backend_is_refused(tmp_path: Path):
    from fedclip.device_agent.step_backend import make_trainer

    with pytest.raises(BackendError, match="not supported"):
        make_trainer(tmp_path, backend="tensorflow")


@pytest.mark.slow
def test_bundle_without_step_graph_is_refused(bundle_factory):
    from fedclip.device_agent.step_backend import StepTrainer

    with pytest.raises(BundleError, match="step"):
        StepTrainer(bundle_factory())


@pytest.mark.slow
def test_step_and_ort_training_backends_agree(step_bundle: Path):
    """Same bundle, same data: the adapters the two backends train agree closely."""
    from fedclip.device_agent.step_backend import StepTrainer, make_trainer
    from fedclip.device_agent.trainer import OrtTrainer

    ort_trainer = make_trainer(step_bundle, backend="auto", threads=2)
    assert isinstance(ort_trainer, OrtTrainer)  # this venv has the training API and the bundle its artifacts
    step_trainer = make_trainer(step_bundle, backend="step", threads=2)
    assert isinstance(step_trainer, StepTrainer)
    start_ort, start_step = ort_trainer.get_tensors(), step_trainer.get_tensors()
    assert start_ort.keys() == start_step.keys()
    for name in start_ort:
        np.testing.assert_array_equal(start_ort[name], start_step[name], err_msg=name)
    batches = _batches(step_trainer.manifest)
    ours = _train(step_trainer, batches, 15)
    theirs = _train(ort_trainer, batches, 15)
    np.testing.assert_allclose(ours, theirs, rtol=2e-3, atol=1e-4)
    assert ours[-1] < ours[0]
    a, b = step_trainer.get_tensors(), ort_trainer.get_tensors()
    for name in a:
        delta = np.linalg.norm(a[name] - start_step[name])
        if delta == 0:
            continue  # nothing to compare against a tensor that did not move
        assert np.linalg.norm(a[name] - b[name]) < 0.05 * delta, name
    ev_ours, ev_theirs = step_trainer.eval_step(batches[0]), ort_trainer.eval_step(batches[0])
    assert set(ev_ours) == {"loss", "logits"}
    np.testing.assert_allclose(ev_ours["logits"], ev_theirs["logits"], rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_restart_continues_with_optimizer_state(step_bundle: Path, tmp_path: Path):
    from fedclip.device_agent.step_backend import StepTrainer

    batches = _batches(StepTrainer(step_bundle).manifest)
    straight = StepTrainer(step_bundle, threads=2)
    expected = _train(straight, batches, 8)

    first = StepTrainer(step_bundle, threads=2)
    got = _train(first, batches, 4)
    ckpt = first.save_checkpoint(tmp_path / "ckpt" / "trainer.safetensors")
    assert not [p for p in ckpt.parent.iterdir() if p.name != ckpt.name], "no temp files left behind"
    resumed = StepTrainer(step_bundle, threads=2)
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 4 and resumed.lr == pytest.approx(1e-2)
    got += [resumed.train_step(batches[i % 3]) for i in range(4, 8)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    for name, arr in straight.get_tensors().items():
        np.testing.assert_allclose(resumed.get_tensors()[name], arr, rtol=1e-6, err_msg=name)

    # Without the moments the run differs, so the comparison above is not vacuous.
    fresh = StepTrainer(step_bundle, threads=2)
    fresh.set_tensors(first.get_tensors())
    assert not np.allclose(_train(fresh, batches[1:] + batches[:1], 4), expected[4:], rtol=1e-6)


@pytest.mark.slow
def test_tensors_adapters_and_checkpoints_are_validated(step_bundle: Path, tmp_path: Path, bundle_factory):
    from fedclip.device_agent.step_backend import StepTrainer

    trainer = StepTrainer(step_bundle, threads=2)
    name, arr = next(iter(trainer.get_tensors().items()))
    with pytest.raises(AdapterError, match="shape"):
        trainer.set_tensors({name: np.zeros((1, 1), np.float32)})
    with pytest.raises(AdapterError, match="unknown tensor"):
        trainer.set_tensors({"visual.nope.lora_A": arr})
    with pytest.raises(AdapterError, match="non-finite"):
        trainer.set_tensors({name: np.full_like(arr, np.nan)})
    with pytest.raises(DataError, match="labels"):
        trainer.train_step({"image": _batches(trainer.manifest)[0]["image"]})
    with pytest.raises(DataError, match="learning rate"):
        trainer.set_lr(-1.0)

    trainer.set_tensors({name: arr + 1})
    meta = AdapterMeta(bundle_id=trainer.manifest.bundle_id, version="v1")
    path = trainer.save_adapter(tmp_path / "a.safetensors", meta, which="trainable")
    other = StepTrainer(step_bundle, threads=2)
    assert other.load_adapter(path).version == "v1"
    np.testing.assert_array_equal(other.get_tensors()[name], arr + 1)

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(BundleError):
        trainer.load_checkpoint(garbage)
    with pytest.raises(BundleError, match="not found"):
        trainer.load_checkpoint(tmp_path / "missing.ckpt")
    ckpt = trainer.save_checkpoint(tmp_path / "t.ckpt")
    import dataclasses

    from fedclip.sdk.adapters import decode_tensors, encode_tensors

    tensors, meta_strings = decode_tensors(ckpt.read_bytes(), "t")
    forged = tmp_path / "forged.ckpt"
    forged.write_bytes(encode_tensors(tensors, {**meta_strings, "bundle_id": "0" * 64}))
    with pytest.raises(BundleError, match="belongs to bundle"):
        trainer.load_checkpoint(forged)
    del tensors[f"exp_avg/{name}"]
    partial = tmp_path / "partial.ckpt"
    partial.write_bytes(encode_tensors(tensors, meta_strings))
    with pytest.raises(BundleError, match="incomplete or corrupt"):
        trainer.load_checkpoint(partial)
    assert dataclasses.is_dataclass(trainer.manifest)


def _distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


@pytest.mark.slow
def test_the_proximal_term_holds_training_near_its_anchor(step_bundle: Path):
    """`set_prox`: at mu 0 (or none) the steps are the ones without it, bit for bit; a large mu keeps
    the tensors near the anchor while the data still moves them; bad weights and anchors refused."""
    from fedclip.device_agent.step_backend import StepTrainer, make_trainer

    batches = _batches(StepTrainer(step_bundle).manifest)
    plain = StepTrainer(step_bundle, threads=2)
    start = plain.get_tensors()
    _train(plain, batches, 6, lr=5e-2)
    off = StepTrainer(step_bundle, threads=2)
    off.set_prox({k: v + 3.0 for k, v in start.items()}, 0.0)  # an anchor at weight 0 changes nothing
    _train(off, batches, 6, lr=5e-2)
    for k, v in plain.get_tensors().items():
        np.testing.assert_array_equal(off.get_tensors()[k], v, err_msg=k)

    held = StepTrainer(step_bundle, threads=2)
    held.set_prox(start, 1000.0)
    _train(held, batches, 6, lr=5e-2)
    moved_plain, moved_held = _distance(plain.get_tensors(), start), _distance(held.get_tensors(), start)
    assert 0 < moved_held < 0.5 * moved_plain, (moved_held, moved_plain)
    # the anchor, not the start, is what it is held to: anchored elsewhere, it walks toward there
    far = {k: v + 0.05 for k, v in start.items()}
    pulled = StepTrainer(step_bundle, threads=2)
    pulled.set_prox(far, 1000.0)
    _train(pulled, batches, 6, lr=5e-2)
    assert _distance(pulled.get_tensors(), far) < _distance(start, far)

    with pytest.raises(DataError, match="proximal weight"):
        held.set_prox(start, float("nan"))
    with pytest.raises(DataError, match="proximal weight"):
        held.set_prox(start, -1.0)
    name = next(iter(start))
    with pytest.raises(AdapterError, match="shape"):
        held.set_prox({**start, name: np.zeros((1, 1), np.float32)}, 1.0)
    with pytest.raises(AdapterError):  # every trainable tensor needs its anchor
        held.set_prox({name: start[name]}, 1.0)
    ort = make_trainer(step_bundle, backend="ort-training", threads=2)
    ort.set_prox(start, 0.0)  # off is fine everywhere
    with pytest.raises(BackendError, match="--backend step"):
        ort.set_prox(start, 1.0)


@pytest.mark.slow
def test_a_step_graph_without_the_proximal_inputs_still_trains(step_bundle: Path, tmp_path: Path):
    """A bundle exported before the step graph had `prox_mu` and the anchors (its inputs end at the
    second moments): it trains as before, and asking it for the term is refused in one line."""
    import onnx
    import yaml

    from fedclip.device_agent.step_backend import StepTrainer
    from fedclip.sdk.manifest import MANIFEST_NAME, Manifest

    old = tmp_path / "old"
    shutil.copytree(step_bundle, old)
    doc = yaml.safe_load((old / MANIFEST_NAME).read_text())
    spec = doc["graphs"]["step"]
    graph_file = old / spec["file"]
    model = onnx.load(str(graph_file), load_external_data=False)
    g = model.graph
    names = [t.name for t in Manifest.load(step_bundle).trainable]
    # what the old exporter wrote: the gradient straight into AdamW (each `grad_prox` Add -> Identity)
    for node in g.node:
        if node.name.endswith("/grad_prox"):
            node.op_type, node.input[:] = "Identity", node.input[:1]
    keep = [n for n in g.node if not n.name.endswith(("/prox", "/from_anchor"))]
    del g.node[:]
    g.node.extend(keep)
    dropped = {"prox_mu", *(n + ".anchor" for n in names)}
    inputs = [i for i in g.input if i.name not in dropped]
    del g.input[:]
    g.input.extend(inputs)
    onnx.save(model, str(graph_file))
    spec["inputs"] = [i for i in spec["inputs"] if i not in dropped]
    (old / MANIFEST_NAME).write_text(yaml.safe_dump(doc, sort_keys=False))

    batches = _batches(StepTrainer(step_bundle).manifest)
    legacy, current = StepTrainer(old, threads=2, verify=False), StepTrainer(step_bundle, threads=2)
    np.testing.assert_array_equal(_train(legacy, batches, 4), _train(current, batches, 4))
    legacy.set_prox(current.get_tensors(), 0.0)
    with pytest.raises(BackendError, match="no proximal term"):
        legacy.set_prox(current.get_tensors(), 1.0)


@pytest.mark.slow
def test_trained_adapter_works_in_the_inference_graph(step_bundle: Path):
    """Tensors from the step trainer override the inference graph's initializers: same logits."""
    from fixtures_bundle import ort_infer

    from fedclip.device_agent.step_backend import StepTrainer

    trainer = StepTrainer(step_bundle, threads=2)
    batches = _batches(trainer.manifest)
    _train(trainer, batches, 5)
    logits = trainer.eval_step(batches[0])["logits"]
    inf = ort_infer(
        step_bundle / trainer.manifest.graphs["inference"].file,
        {"image": batches[0]["image"]},
        trainer.get_tensors(),
    )[0]
    np.testing.assert_allclose(logits, inf, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_device_venv_trains_with_plain_onnxruntime(step_bundle: Path, tmp_path: Path):
    """`make_trainer(auto)` in the device venv (no training API, no torch) picks the step graph.

    Runs in every `.venv-device*` venv there is, e.g. one made with onnxruntime 1.16 (what pip gives
    a manylinux2014 aarch64 board) by scripts/device_venv.sh.
    """
    if not DEVICE_PY.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{DEVICE_PY} is missing in CI (scripts/device_venv.sh creates it)")
        pytest.skip(f"{DEVICE_PY} not found: run `bash scripts/device_venv.sh` to create the device venv")
    venvs = sorted(p for p in REPO.glob(".venv-device*/bin/python") if p.exists())
    from fedclip.device_agent.step_backend import StepTrainer

    trainer = StepTrainer(step_bundle, threads=2)
    batches = _batches(trainer.manifest)
    np.savez(tmp_path / "batches.npz", **{f"{k}{i}": v for i, b in enumerate(batches) for k, v in b.items()})
    expected = _train(trainer, batches, 4)
    script = f"""
import json, sys, numpy as np
from fedclip.device_agent.step_backend import StepTrainer, make_trainer
t = make_trainer({str(step_bundle)!r}, threads=2)
assert isinstance(t, StepTrainer), type(t)
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
d = np.load({str(tmp_path / "batches.npz")!r})
b = [{{"image": d[f"image{{i}}"], "labels": d[f"labels{{i}}"]}} for i in range(3)]
t.set_lr(1e-2)
import onnxruntime
print(json.dumps({{"losses": [t.train_step(b[i % 3]) for i in range(4)], "ort": onnxruntime.__version__}}))
"""
    for python in venvs:
        proc = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{python}: {proc.stderr[-3000:]}"
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        np.testing.assert_allclose(got["losses"], expected, rtol=1e-5, err_msg=f"{python} (ort {got['ort']})")
