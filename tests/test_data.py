"""fedclip.sdk.data: layouts, label checks, deterministic split, streaming, corrupt images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fedclip.sdk.data import Dataset, label_folder_name
from fedclip.sdk.errors import DataError
from fedclip.sdk.manifest import Preprocess
from fedclip.sdk.preprocess import ImageTransform

LABELS = ("T-shirt/top", "Trouser", "Bag")
TRANSFORM = ImageTransform(Preprocess(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))


def _img(path, seed: int, size=(20, 24)):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for c, label in enumerate(LABELS):
        for i in range(12):
            _img(root / label_folder_name(label) / f"{c}_{i}.png", seed=c * 100 + i)
    return root


def test_image_folder(folder):
    ds = Dataset.open(folder, labels=LABELS)
    assert len(ds) == 36
    assert ds.kind == "classify"
    assert list(ds.label_counts()) == [12, 12, 12]
    assert {s.key.split("/")[0] for s in ds.samples} == {"T-shirt_top", "Trouser", "Bag"}
    assert all(ds.labels[s.label] == "Bag" for s in ds.samples if s.key.startswith("Bag/"))


def test_a_device_may_lack_some_labels(folder):
    ds = Dataset.open(folder, labels=(*LABELS, "Sneaker"))
    assert list(ds.label_counts()) == [12, 12, 12, 0]


def test_unknown_folder_is_a_clear_error(folder):
    _img(folder / "Sandal" / "x.png", seed=1)
    with pytest.raises(DataError, match="'Sandal' is not a label"):
        Dataset.open(folder, labels=LABELS)


def test_missing_or_empty_datasets(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Dataset.open(tmp_path / "nope", labels=LABELS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="sub-folder"):
        Dataset.open(tmp_path / "empty", labels=LABELS)
    (tmp_path / "empty" / "Bag").mkdir()
    with pytest.raises(DataError, match="no images"):
        Dataset.open(tmp_path / "empty", labels=LABELS)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="not a dataset"):
        Dataset.open(tmp_path / "x.txt", labels=LABELS)


def test_csv_and_jsonl(tmp_path):
    for i in range(4):
        _img(tmp_path / "img" / f"{i}.png", seed=i)
    (tmp_path / "d.csv").write_text(
        "path,label\nimg/0.png,Bag\nimg/1.png,T-shirt/top\n" + f"{tmp_path / 'img' / '2.png'},Trouser\n"
    )
    ds = Dataset.open(tmp_path / "d.csv", labels=LABELS)
    assert [s.label for s in ds.samples] == [2, 0, 1]
    assert ds.samples[2].path == tmp_path / "img" / "2.png"
    lines = [{"path": f"img/{i}.png", "caption": f"a photo number {i}"} for i in range(4)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = Dataset.open(tmp_path / "c.jsonl", kind="contrastive")
    assert [s.caption for s in ds.samples] == [x["caption"] for x in lines]
    batch = next(ds.batches(TRANSFORM, 3))
    assert batch.captions == [x["caption"] for x in lines[:3]]
    assert batch.images.shape == (3, 3, 16, 16)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("path,label\nimg/0.png,Sandal\n", "label 'Sandal' is not a label"),
        ("path,caption\nimg/0.png,a cat\n", "missing 'label'"),
        ("file,label\nimg/0.png,Bag\n", "missing 'path'"),
        ("", "empty CSV"),
    ],
)
def test_csv_errors_name_the_line(tmp_path, text, match):
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        Dataset.open(tmp_path / "d.csv", labels=LABELS)


def test_jsonl_errors(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"path": "a.png", "label": "Bag"}\nnot json\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        Dataset.open(tmp_path / "d.jsonl", labels=LABELS)


def test_split_is_deterministic_and_stable_when_files_are_added(folder):
    ds = Dataset.open(folder, labels=LABELS)
    train, held = ds.split(0.25)
    assert len(train) + len(held) == len(ds)
    assert {s.key for s in train}.isdisjoint({s.key for s in held})
    train2, held2 = Dataset.open(folder, labels=LABELS).split(0.25)
    assert [s.key for s in held2] == [s.key for s in held]
    for i in range(30):
        _img(folder / "Bag" / f"new_{i}.png", seed=1000 + i)
    _, held3 = Dataset.open(folder, labels=LABELS).split(0.25)
    old = {s.key for s in ds.samples}
    assert {s.key for s in held3 if s.key in old} == {s.key for s in held}
    assert ds.split(0.0)[1].samples == ()
    with pytest.raises(DataError):
        ds.split(1.0)


def test_split_fraction_is_roughly_right(tmp_path):
    (tmp_path / "d.csv").write_text("path,label\n" + "".join(f"img/{i}.png,Bag\n" for i in range(4000)))
    _, held = Dataset.open(tmp_path / "d.csv", labels=LABELS).split(0.2)
    assert 0.17 < len(held) / 4000 < 0.23


def test_streaming_batches(folder):
    ds = Dataset.open(folder, labels=LABELS)
    batches = ds.batches(TRANSFORM, 10)
    assert not isinstance(batches, list)  # a generator: nothing is decoded up front
    sizes = [len(b) for b in batches]
    assert sizes == [10, 10, 10, 6]
    b = next(ds.batches(TRANSFORM, 10))
    assert b.images.dtype == np.float32 and b.labels.dtype == np.int64
    assert [len(x) for x in ds.batches(TRANSFORM, 10, drop_last=True)] == [10, 10, 10]
    one = [s.key for b in ds.batches(TRANSFORM, 7, shuffle=True, seed=3) for s in b.samples]
    two = [s.key for b in ds.batches(TRANSFORM, 7, shuffle=True, seed=3) for s in b.samples]
    other = [s.key for b in ds.batches(TRANSFORM, 7, shuffle=True, seed=4) for s in b.samples]
    assert one == two != other
    assert sorted(one) == sorted(s.key for s in ds.samples)
    with pytest.raises(DataError):
        next(ds.batches(TRANSFORM, 0))


def test_corrupt_images_are_skipped_and_counted_once(folder):
    (folder / "Bag" / "broken.png").write_bytes(b"garbage")
    (folder / "Trouser" / "empty.jpg").write_bytes(b"")
    ds = Dataset.open(folder, labels=LABELS)
    assert len(ds) == 38
    train, held = ds.split(0.3)
    for _ in range(2):
        n = sum(len(b) for part in (train, held) for b in part.batches(TRANSFORM, 8))
        assert n == 36
    assert ds.skipped == {"Bag/broken.png", "Trouser/empty.jpg"}
    assert train.skipped is ds.skipped


def test_a_small_set_the_hashes_put_nothing_aside_still_holds_one_out(tmp_path):
    """16 images at holdout 0.2 put none aside 1 time in 36 by hash: such a device could not score
    anything and refused to start; it now holds out the sample of the lowest hash."""
    from fedclip.sdk.data import _unit_hash

    names = [f"img/{i}.png" for i in range(400) if _unit_hash(f"img/{i}.png") >= 0.2][:16]
    (tmp_path / "d.csv").write_text("path,label\n" + "".join(f"{n},Bag\n" for n in names))
    ds = Dataset.open(tmp_path / "d.csv", labels=LABELS)
    assert [s.key for s in ds.samples if _unit_hash(s.key) < 0.2] == []  # the hashes alone: none
    train, held = ds.split(0.2)
    lowest = min(ds.samples, key=lambda s: _unit_hash(s.key))
    assert [s.key for s in held.samples] == [lowest.key] and len(train) == 15
    assert ds.split(0.0)[1].samples == ()  # no held-out asked for: none
    one = Dataset.open(tmp_path / "d.csv", labels=LABELS)
    single = type(one)(one.samples[:1], one.labels, one.kind, one.source, one.skipped)
    assert single.split(0.2)[1].samples == ()  # one sample: it trains
