"""Offline agent: `fedclip-agent train | eval | predict` and the training loop on real Fashion-MNIST."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_bundle import FASHION_MNIST_LABELS
from fixtures_data import fashion_mnist
from PIL import Image

from fedclip.device_agent.batches import batch_source
from fedclip.device_agent.embed_cache import EmbeddingCache
from fedclip.device_agent.loops import evaluate, train_local
from fedclip.device_agent.predictor import Predictor
from fedclip.device_agent.statistics import data_statistics
from fedclip.device_agent.trainer import OrtTrainer
from fedclip.sdk.adapters import load_adapter
from fedclip.sdk.data import Dataset, label_folder_name
from fedclip.sdk.errors import DataError
from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, STAT_VAR

PER_CLASS = 150


@pytest.fixture(scope="module")
def fm_folder(tmp_path_factory) -> Path:
    """PER_CLASS Fashion-MNIST training images per class as PNGs in label folders, plus a corrupt one."""
    root = tmp_path_factory.mktemp("fmnist") / "images"
    x, y = fashion_mnist("train")
    for c, label in enumerate(FASHION_MNIST_LABELS):
        folder = root / label_folder_name(label)
        folder.mkdir(parents=True)
        for i in np.flatnonzero(y == c)[:PER_CLASS]:
            Image.fromarray(x[i]).save(folder / f"{i}.png")
    (root / "Bag" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return root


def agent(*args, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedclip.device_agent.cli", *map(str, args)]
    env = {**os.environ, "FEDCLIP_CACHE_DIR": os.environ.get("FEDCLIP_CACHE_DIR", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cli_train_eval_predict_on_fashion_mnist(tiny_bundle, fm_folder, tmp_path):
    adapter = tmp_path / "adapter.safetensors"
    res = _json(
        agent(
            "train",
            "--bundle",
            tiny_bundle,
            "--data",
            fm_folder,
            "--epochs",
            2,
            "--batch-size",
            32,
            "--lr",
            "1e-2",
            "--holdout",
            "0.2",
            "--threads",
            2,
            "--out",
            adapter,
            "--json",
        )
    )
    print("offline training on Fashion-MNIST:", res)
    assert res["accuracy_after"] > 0.3  # chance is 0.1
    assert res["accuracy_after"] > res["accuracy_before"] + 0.15
    assert res["train_loss_mean"] < res["train_loss_first"]
    assert adapter.is_file()
    assert res["num_train"] + res["num_held_out"] + res["skipped_images"] == 10 * PER_CLASS + 1

    # eval on the same held-out part with the saved adapter gives the same accuracy
    ev = _json(
        agent(
            "eval",
            "--bundle",
            tiny_bundle,
            "--data",
            fm_folder,
            "--holdout",
            "0.2",
            "--adapter",
            adapter,
            "--json",
        )
    )
    assert ev["accuracy"] == pytest.approx(res["accuracy_after"])
    assert ev["num_samples"] == res["num_held_out"]

    # the whole folder: the corrupt image is skipped and counted, not fatal
    full = _json(agent("eval", "--bundle", tiny_bundle, "--data", fm_folder, "--adapter", adapter, "--json"))
    assert full["skipped_images"] == 1
    assert full["num_samples"] == 10 * PER_CLASS

    # predict: top-k labels with scores; mostly right on images it never saw
    x, y = fashion_mnist("t10k")
    paths = []
    for i in range(40):
        paths.append(tmp_path / f"test_{i}.png")
        Image.fromarray(x[i]).save(paths[-1])
    pred = _json(
        agent("predict", "--bundle", tiny_bundle, "--adapter", adapter, "--top-k", 3, "--json", *paths)
    )
    rows = pred["predictions"]
    assert len(rows) == 40
    for row in rows:
        scores = [t["score"] for t in row["top"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        assert all(t["label"] in FASHION_MNIST_LABELS for t in row["top"])
    hits = sum(row["top"][0]["label"] == FASHION_MNIST_LABELS[y[i]] for i, row in enumerate(rows))
    assert hits / 40 > 0.3

    human = agent("predict", "--bundle", tiny_bundle, "--adapter", adapter, paths[0])
    assert "predictions" in human.stdout


@pytest.mark.parametrize(
    ("make_args", "match"),
    [
        (lambda b, d, t: ["train", "--bundle", t, "--data", d], "not a fedclip bundle"),
        (lambda b, d, t: ["train", "--bundle", b, "--data", t / "missing"], "dataset not found"),
        (lambda b, d, t: ["eval", "--bundle", b, "--data", d, "--device", "cuda"], "CUDAExecutionProvider"),
        (lambda b, d, t: ["predict", "--bundle", b, t / "missing.png"], "no image could be read"),
        (
            lambda b, d, t: ["eval", "--bundle", b, "--data", d, "--adapter", t / "nope.safetensors"],
            "cannot read",
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tiny_bundle, tmp_path, make_args, match):
    data = tmp_path / "data"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(_mk(data / "Bag") / "0.png")
    proc = agent(*make_args(tiny_bundle, data, tmp_path), check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedclip-agent: error:") and match in last
    assert "Traceback" not in proc.stderr


def test_cli_unknown_label_folder(tiny_bundle, tmp_path):
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(_mk(tmp_path / "Giraffe") / "0.png")
    proc = agent("train", "--bundle", tiny_bundle, "--data", tmp_path, check=False)
    assert proc.returncode == 2
    assert "'Giraffe' is not a label" in proc.stderr


def test_cli_corrupt_bundle_is_refused(tiny_bundle, fm_folder, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    with open(bad / "checkpoint", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    proc = agent("eval", "--bundle", bad, "--data", fm_folder, check=False)
    assert proc.returncode == 2
    assert "corrupt" in proc.stderr.strip().splitlines()[-1]


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- the loop in-process -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_set(fm_folder) -> Dataset:
    return Dataset.open(fm_folder, labels=FASHION_MNIST_LABELS)


def test_train_local_limits_and_callbacks(tiny_bundle, small_set):
    trainer = OrtTrainer(tiny_bundle, threads=2)
    seen = []
    m = train_local(
        trainer,
        small_set,
        epochs=3,
        batch_size=16,
        lr=1e-3,
        max_steps=5,
        progress=False,
        on_step=lambda step, loss: seen.append((step, loss)),
    )
    assert m["steps"] == 5 and m["samples"] == 80
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5]
    assert m["loss_first"] == seen[0][1] and m["loss_last"] == seen[-1][1]
    calls = iter(range(100))
    m = train_local(
        trainer,
        small_set,
        epochs=1,
        batch_size=16,
        lr=1e-3,
        progress=False,
        should_stop=lambda: next(calls) >= 3,
    )
    assert m["steps"] == 3
    with pytest.raises(DataError):
        train_local(
            trainer, small_set, epochs=1, batch_size=16, lr=1e-3, progress=False, should_stop=lambda: True
        )
    ev = evaluate(trainer, small_set, batch_size=100)
    assert set(ev) == {"loss", "accuracy", "num_samples"}
    assert ev["num_samples"] == 10 * PER_CLASS
    _assert_skip_resumes(batch_source(trainer, small_set))


def _assert_skip_resumes(src) -> None:
    """`batches(skip=k)` is the same order's batches after the first k (a paused tuning resumes)."""
    every = list(src.batches(16, shuffle=True, seed=5))
    for k in (0, 2, len(every), len(every) + 3):
        rest = list(src.batches(16, shuffle=True, seed=5, skip=k))
        assert len(rest) == max(len(every) - k, 0)
        for (a, na), (b, nb) in zip(every[k:], rest, strict=True):
            assert na == nb and a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_data_statistics(tiny_bundle, fm_folder, tmp_path):
    subset = Dataset.open(fm_folder, labels=FASHION_MNIST_LABELS).split(0.9)[0]  # ~10%: fast
    predictor = Predictor(tiny_bundle, threads=2)
    stats = data_statistics(predictor, subset, kinds=("histogram", "gaussian"))
    assert set(stats) == {STAT_LABEL_HIST, STAT_MEAN, STAT_VAR}
    d = predictor.manifest.base_model.embed_dim
    assert stats[STAT_MEAN].shape == stats[STAT_VAR].shape == (10, d)
    assert all(v.dtype == np.float32 for v in stats.values())

    # against a direct computation from the same embeddings
    embeds, labels = [], []
    for b in subset.batches(predictor.transform, 50):
        embeds.append(predictor.embed_images(b.images))
        labels.append(b.labels)
    embeds, labels = np.concatenate(embeds), np.concatenate(labels)
    np.testing.assert_array_equal(stats[STAT_LABEL_HIST], np.bincount(labels, minlength=10))
    for c in range(10):
        if (labels == c).sum():
            np.testing.assert_allclose(stats[STAT_MEAN][c], embeds[labels == c].mean(0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(stats[STAT_VAR][c], embeds[labels == c].var(0), rtol=1e-3, atol=1e-5)

    hist_only = data_statistics(predictor, subset, kinds=("histogram",))
    np.testing.assert_array_equal(hist_only[STAT_LABEL_HIST], stats[STAT_LABEL_HIST])

    noisy = data_statistics(predictor, subset, noise_std=0.5, seed=1)
    again = data_statistics(predictor, subset, noise_std=0.5, seed=1)
    np.testing.assert_array_equal(noisy[STAT_MEAN], again[STAT_MEAN])
    assert not np.allclose(noisy[STAT_MEAN], stats[STAT_MEAN])
    assert (noisy[STAT_VAR] >= 0).all() and (noisy[STAT_LABEL_HIST] >= 0).all()
    with pytest.raises(DataError):
        data_statistics(predictor, subset, kinds=("median",))


def test_embedding_cache_for_text_tower_bundles(bundle_factory, tmp_path):
    bundle = bundle_factory(towers=("text",), labels=FASHION_MNIST_LABELS)
    x, y = fashion_mnist("train")
    data = tmp_path / "data"
    for i in range(60):
        Image.fromarray(x[i]).save(_mk(data / label_folder_name(FASHION_MNIST_LABELS[y[i]])) / f"{i}.png")
    cache_dir = tmp_path / "cache"
    trainer = OrtTrainer(bundle, threads=2)
    ds = Dataset.open(data, labels=FASHION_MNIST_LABELS)
    src = batch_source(trainer, ds, cache_dir=cache_dir)
    cache_files = cache_dir / trainer.manifest.bundle_id
    size = (cache_files / "embeds.f32").stat().st_size
    assert size == 60 * trainer.manifest.base_model.embed_dim * 4

    # the cached rows are the encoder's embeddings
    inputs, n = next(src.batches(60))
    predictor = Predictor(bundle, threads=2)
    direct = predictor.embed_images(np.stack([predictor.transform.load(s.path) for s in ds.samples]))
    np.testing.assert_allclose(inputs["image_embeds"], direct, atol=1e-5)
    np.testing.assert_array_equal(inputs["labels"], [s.label for s in ds.samples])
    # embedding needs the image encoder only: the inference graph (both towers) stays closed
    assert predictor.open_graphs == ("image_encoder",)

    # a second run embeds nothing and opens no ONNX session at all; a changed file is embedded
    # again; the training uses the cache
    warm = batch_source(trainer, Dataset.open(data, labels=FASHION_MNIST_LABELS), cache_dir=cache_dir)
    assert (cache_files / "embeds.f32").stat().st_size == size
    assert warm.cache is not None and warm.cache.predictor.open_graphs == ()
    # rows a crash appended after the last saved index are dropped, not mistaken for new ones
    with open(cache_files / "embeds.f32", "ab") as f:
        f.write(np.full((3, trainer.manifest.base_model.embed_dim), 7.0, np.float32).tobytes())
    changed = ds.samples[0].path
    Image.fromarray(255 - x[0]).save(changed)
    ds2 = Dataset.open(data, labels=FASHION_MNIST_LABELS)
    src2 = batch_source(trainer, ds2, cache_dir=cache_dir)
    assert (cache_files / "embeds.f32").stat().st_size == size + trainer.manifest.base_model.embed_dim * 4
    inputs2, _ = next(src2.batches(60))
    fresh = predictor.embed_images(predictor.transform.load(changed)[None])[0]
    np.testing.assert_allclose(inputs2["image_embeds"][0], fresh, atol=1e-5)
    _assert_skip_resumes(src2)  # the cache's path
    m = train_local(trainer, src2, epochs=4, batch_size=20, lr=1e-2, progress=False)
    assert m["loss_last"] < m["loss_first"]

    # a lost data file behind the index is detected and rebuilt, never read as garbage
    (cache_files / "embeds.f32").write_bytes(b"")
    again = EmbeddingCache(cache_dir, predictor)
    assert again.rows == {}


def test_cli_quick_train_then_predict(tiny_bundle, fm_folder, tmp_path):
    adapter = tmp_path / "a.safetensors"
    res = _json(
        agent(
            "train",
            "--bundle",
            tiny_bundle,
            "--data",
            fm_folder,
            "--max-steps",
            3,
            "--quiet",
            "--json",
            "--out",
            adapter,
        )
    )
    assert res["train_steps"] == 3 and res["adapter"] == str(adapter)
    tensors, meta = load_adapter(adapter)
    assert meta.strategy == "local" and meta.version == res["adapter_version"]
    image = next((fm_folder / "Bag").glob("[0-9]*.png"))
    pred = _json(
        agent("predict", "--bundle", tiny_bundle, "--adapter", adapter, "--top-k", 20, "--json", image)
    )
    assert len(pred["predictions"][0]["top"]) == 10  # capped at the number of labels


def test_contrastive_bundle_trains_on_captions(bundle_factory, fm_folder, tmp_path):
    bundle = bundle_factory(task="contrastive")
    captions = {"Bag": "a bag to carry things", "Trouser": "long trousers", "Sneaker": "a sports shoe"}
    rows = ["path,caption"]
    for folder, caption in captions.items():
        rows += [f"{p},{caption}" for p in sorted((fm_folder / folder).glob("[0-9]*.png"))[:24]]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    ds = Dataset.open(tmp_path / "captions.csv", kind="contrastive")
    trainer = OrtTrainer(bundle, threads=2)
    assert trainer.manifest.tokenizer is not None
    m = train_local(trainer, ds, epochs=3, batch_size=12, lr=1e-2, progress=False)
    assert np.isfinite(m["loss_last"]) and m["steps"] == 18
    ev = evaluate(trainer, ds, batch_size=12)
    assert "accuracy" not in ev and np.isfinite(ev["loss"])
    with pytest.raises(DataError, match="classify"):
        Dataset.open(tmp_path / "captions.csv", labels=FASHION_MNIST_LABELS).labels  # noqa: B018
    with pytest.raises(DataError, match="classify"):
        Predictor(bundle).predict(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.slow
def test_cli_personal_tuning_stays_near_the_adapter_it_starts_from(bundle_factory, tmp_path):
    """`train --adapter FLEET --prox-mu MU`: the device's images move the adapter, the proximal term
    toward FLEET holds it near (docs/aggregation.md, "Personal tuning"); auto picks the step backend,
    the ORT training backend and a bad weight are refused in one line."""
    from fixtures_data import synthetic_images

    from fedclip.sdk.adapters import load_adapter

    bundle = bundle_factory(labels=("a", "b", "c"), formats=("ort-training", "step"))
    data = synthetic_images(tmp_path / "d", ("a", "b", "c"), {"a": 12, "b": 12, "c": 4}, seed=0)
    common = ("--bundle", bundle, "--data", data, "--lr", "5e-2", "--threads", 2, "--json")
    fleet = tmp_path / "fleet.safetensors"
    made = _json(agent("train", *common, "--epochs", 2, "--out", fleet))
    assert made["adapter_version"].startswith("local-")

    free = _json(agent("train", *common, "--epochs", 3, "--adapter", fleet, "--backend", "step"))
    personal = tmp_path / "personal.safetensors"
    held = _json(
        agent("train", *common, "--epochs", 3, "--adapter", fleet, "--prox-mu", 1000, "--out", personal)
    )
    assert held["prox_mu"] == 1000 and "prox_mu" not in free
    assert 0 < held["moved"] < 0.5 * free["moved"], (held["moved"], free["moved"])
    assert held["adapter_version"].startswith("personal-")
    _, meta = load_adapter(personal)
    assert meta.parent_version == made["adapter_version"] and meta.strategy == "personal"

    refused = agent(
        "train", *common, "--adapter", fleet, "--backend", "ort-training", "--prox-mu", 1, check=False
    )
    assert refused.returncode == 2, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("fedclip-agent: error:") and "--backend step" in last, last
    nan = agent("train", *common, "--adapter", fleet, "--prox-mu", "nan", check=False)
    assert nan.returncode == 2 and "'--prox-mu'" in nan.stderr.strip().splitlines()[-1], nan.stderr
    huge = agent("train", *common, "--adapter", fleet, "--prox-mu", "1e30", check=False)
    last = huge.stderr.strip().splitlines()[-1]
    assert huge.returncode == 2 and last.startswith("fedclip-agent: error: proximal weight"), huge.stderr
    assert "Traceback" not in huge.stderr
