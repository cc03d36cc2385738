"""Partitioning: determinism, Dirichlet label-skew statistics, camera shifts, the CLI's errors."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedclip.sdk.errors import ConfigError, DataError
from fedclip.sdk.partition import (
    FASHION_MNIST_DIR,
    SHIFT_KINDS,
    CameraShift,
    LabeledImages,
    agent_shifts,
    dirichlet_partition,
    dominant_share,
    label_histogram,
    load_digits,
    load_fashion_mnist,
    load_imagefolder,
    read_summary,
    write_partition,
)

HAVE_FMNIST = (FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def digits() -> LabeledImages:
    return load_digits()


def small(data: LabeledImages, n: int = 300) -> LabeledImages:
    return LabeledImages(labels=data.labels[:n], classes=data.classes, arrays=data.arrays[:n])


# ---- sources ---------------------------------------------------------------------------------------
def test_digits_loader(digits):
    assert digits.arrays.dtype == np.uint8 and digits.arrays.shape == (1797, 8, 8)
    assert digits.arrays.max() == 255 and len(digits.classes) == 10
    assert set(np.unique(digits.labels)) == set(range(10))


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST idx files not installed")
def test_fashion_mnist_loader():
    data = load_fashion_mnist()
    assert data.arrays.shape == (70000, 28, 28) and data.arrays.dtype == np.uint8
    assert np.array_equal(label_histogram(data.labels, 10), np.full(10, 7000))


def test_idx_file_errors(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 8))
    with pytest.raises(DataError, match="not an idx3"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(DataError, match="cannot read"):
        load_fashion_mnist(tmp_path / "missing")


def test_imagefolder_source(tmp_path, digits):
    for i in range(30):
        d = tmp_path / "src" / digits.classes[digits.labels[i]]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.arrays[i]).save(d / f"{i}.png")
    (tmp_path / "src" / "notes.txt").write_text("ignored")
    data = load_imagefolder(tmp_path / "src")
    assert len(data) == 30 and data.image(0).size == (8, 8)
    summary = write_partition(tmp_path / "out", f"imagefolder:{tmp_path / 'src'}", 2, 1.0, min_per_agent=3)
    assert summary["labels"] == list(data.classes)
    assert sum(sum(e["train"].values()) + sum(e["test"].values()) for e in summary["counts"].values()) == 30
    with pytest.raises(DataError, match="no label folders"):
        load_imagefolder(tmp_path / "out" / "agent-00" / "train" / data.classes[0])


# ---- label skew ------------------------------------------------------------------------------------
def test_dirichlet_partition_covers_every_sample_once(digits):
    parts = dirichlet_partition(digits.labels, 7, 0.5, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(digits) and len(np.unique(joined)) == len(digits)
    assert all(len(p) >= 10 for p in parts)
    again = dirichlet_partition(digits.labels, 7, 0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_partition(digits.labels, 7, 0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.fixture(scope="module")
def many_labels(digits) -> np.ndarray:
    if HAVE_FMNIST:
        return load_fashion_mnist().labels
    return np.tile(digits.labels, 10)


def test_small_beta_gives_skewed_agents(many_labels):
    parts = dirichlet_partition(many_labels, 10, 0.1, seed=0)
    shares = [dominant_share(label_histogram(many_labels[p], 10), top=2) for p in parts]
    # Uniform labels would put 20% in the top two; with beta 0.1 most agents have > 60% there.
    assert sum(s > 0.6 for s in shares) >= 7, shares


def test_large_beta_is_close_to_uniform(many_labels):
    parts = dirichlet_partition(many_labels, 10, 100.0, seed=0)
    for p in parts:
        frac = label_histogram(many_labels[p], 10) / len(p)
        assert np.abs(frac - 0.1).max() < 0.05, frac


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"n_agents": 0, "beta": 1.0}, ConfigError),
        ({"n_agents": 3, "beta": 0.0}, ConfigError),
        ({"n_agents": 3, "beta": float("nan")}, ConfigError),
        ({"n_agents": 50, "beta": 1.0, "min_per_agent": 10}, ConfigError),  # 50 x 10 > 300 samples
        ({"n_agents": 20, "beta": 0.01, "min_per_agent": 14, "max_tries": 5}, DataError),
    ],
)
def test_dirichlet_partition_rejects_bad_arguments(digits, kwargs, error):
    with pytest.raises(error):
        dirichlet_partition(digits.labels[:300], **kwargs)


# ---- camera shifts ---------------------------------------------------------------------------------
def test_agent_shifts_are_deterministic_and_cover_every_kind():
    shifts = agent_shifts(10, seed=1)
    assert shifts == agent_shifts(10, seed=1) and shifts != agent_shifts(10, seed=2)
    assert {s.kind for s in shifts} == set(SHIFT_KINDS)


@pytest.mark.parametrize(
    "kind, amount", [("invert", 1.0), ("rotate", 30.0), ("contrast", 0.4), ("blur", 1.0), ("noise", 20.0)]
)
def test_each_shift_changes_the_image_deterministically(digits, kind, amount):
    img = Image.fromarray(np.kron(digits.arrays[0], np.ones((4, 4), np.uint8)))  # 32x32: room to blur/rotate
    cam = CameraShift(kind, amount)
    a, b = np.asarray(cam.apply(img, 7)), np.asarray(cam.apply(img, 7))
    assert a.shape == np.asarray(img).shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, np.asarray(img))
    if kind == "invert":
        assert np.array_equal(a, 255 - np.asarray(img))
    if kind == "noise":
        assert not np.array_equal(a, np.asarray(cam.apply(img, 8)))


# ---- writing ---------------------------------------------------------------------------------------
def test_write_partition_is_deterministic(tmp_path, digits):
    data = small(digits)
    args = dict(n_agents=3, beta=0.5, shift="per-agent", seed=5, test_fraction=0.25)
    write_partition(tmp_path / "a", data, **args)
    write_partition(tmp_path / "b", data, **args)
    write_partition(tmp_path / "c", data, **{**args, "seed": 6})
    a, b, c = tree(tmp_path / "a"), tree(tmp_path / "b"), tree(tmp_path / "c")
    assert a == b and len(a) > 100
    assert a != c


def test_write_partition_layout_and_summary(tmp_path, digits):
    data = small(digits)
    write_partition(tmp_path / "out", data, 3, 0.3, seed=1, test_fraction=0.2, max_per_agent=60)
    summary = read_summary(tmp_path / "out")
    assert summary["agents"] == ["agent-00", "agent-01", "agent-02"]
    assert summary["labels"] == list(data.classes)
    for agent in summary["agents"]:
        for split in ("train", "test"):
            counts = summary["counts"][agent][split]
            for label, n in counts.items():
                assert len(list((tmp_path / "out" / agent / split / label).glob("*.png"))) == n
        train, test = summary["counts"][agent]["train"], summary["counts"][agent]["test"]
        assert sum(train.values()) + sum(test.values()) <= 60
        # the test split has the train split's skew: no test label is absent from train
        assert all(train[k] > 0 for k, n in test.items() if n > 0)
    assert not list(tmp_path.glob(".out.*")), "temporary folder left behind"


def test_shift_is_applied_to_train_and_test(tmp_path, digits):
    data = small(digits)
    write_partition(tmp_path / "plain", data, 5, 1.0, shift="none", seed=2)
    summary = write_partition(tmp_path / "shifted", data, 5, 1.0, shift="per-agent", seed=2)
    plain, shifted = tree(tmp_path / "plain"), tree(tmp_path / "shifted")
    files = [k for k in plain if k.endswith(".png")]
    assert files == [k for k in shifted if k.endswith(".png")]  # the shift does not move samples
    for agent, entry in summary["counts"].items():
        for split in ("train", "test"):
            mine = [f for f in files if f.startswith(f"{agent}/{split}/")]
            if not mine:
                continue
            assert any(plain[f] != shifted[f] for f in mine), (agent, split, entry["shift"])
            if entry["shift"]["kind"] == "invert":
                f = mine[0]
                orig = np.asarray(Image.open(tmp_path / "plain" / f))
                assert np.array_equal(np.asarray(Image.open(tmp_path / "shifted" / f)), 255 - orig)


def test_write_partition_refuses_nonempty_out_unless_overwrite(tmp_path, digits):
    data = small(digits, 100)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        write_partition(tmp_path / "out", data, 2, 1.0)
    write_partition(tmp_path / "out", data, 2, 1.0, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "partition.json").is_file()


# ---- CLI -------------------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `fedclip-coord partition ARGS` in-process through the real entry point; (exit code, out, err)."""
    from fedclip.coordinator.cli import main

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["fedclip-coord", "partition", *args])
        with pytest.raises(SystemExit) as exc:
            main()
        out = capsys.readouterr()
        return exc.value.code, out.out, out.err

    return invoke


def test_cli_writes_partition_and_summary_table(tmp_path, cli):
    code, out, err = cli(
        "--dataset",
        "digits",
        "--agents",
        "3",
        "--dirichlet",
        "0.5",
        "--shift",
        "per-agent",
        "--seed",
        "1",
        "--max-per-agent",
        "40",
        "--out",
        str(tmp_path / "p"),
    )
    assert code == 0, err
    assert "agent-02" in out and "partition written" in out
    assert json.loads((tmp_path / "p" / "partition.json").read_text())["shift"] == "per-agent"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "mnist-ish", "--agents", "2", "--dirichlet", "1"], "not one of fashion-mnist"),
        (["--dataset", "digits", "--agents", "2", "--dirichlet", "0"], "--dirichlet"),
        (["--dataset", "digits", "--agents", "0", "--dirichlet", "1"], "--agents"),
        (["--dataset", "digits", "--agents", "2", "--dirichlet", "1", "--shift", "tilt"], "--shift"),
        (["--dataset", "imagefolder:/nonexistent", "--agents", "2", "--dirichlet", "1"], "not found"),
        (["--dataset", "digits", "--agents", "2"], "--dirichlet"),
    ],
)
def test_cli_bad_arguments_exit_2(tmp_path, cli, args, message):
    code, out, err = cli(*args, "--out", str(tmp_path / "p"))
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()
