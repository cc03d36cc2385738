"""Data fixtures: real Fashion-MNIST images, from `$FEDCLIP_FASHION_MNIST` (the Debian package's
/usr/share/datasets/fashion-mnist by default, see `fedclip.sdk.partition.FASHION_MNIST_DIR`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedclip.sdk.data import label_folder_name
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.partition import FASHION_MNIST_DIR, read_idx

__all__ = [
    "FASHION_MNIST_DIR",
    "PER_CLASS",
    "fashion_mnist",
    "fmnist_dir",
    "synthetic_images",
    "write_label_folders",
]

PER_CLASS = 10  # images per label in `fmnist_dir`


def fashion_mnist(split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N]) of one official split; skips the test when missing."""
    images = FASHION_MNIST_DIR / f"{split}-images-idx3-ubyte.gz"
    if not images.is_file():
        pytest.skip(f"Fashion-MNIST is not at {FASHION_MNIST_DIR} (set FEDCLIP_FASHION_MNIST)")
    return read_idx(images, 3), read_idx(FASHION_MNIST_DIR / f"{split}-labels-idx1-ubyte.gz", 1)


def write_label_folders(root: Path, names: tuple[str, ...], per_class: int, split: str = "t10k") -> Path:
    """The first `per_class` images of each label of `split` as PNGs in `root/<label folder>/`."""
    images, labels = fashion_mnist(split)
    for c, name in enumerate(names):
        folder = root / label_folder_name(name)
        folder.mkdir(parents=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            Image.fromarray(images[i]).save(folder / f"{i}.png")
    return root


def synthetic_images(root: Path, labels: tuple[str, ...], per_label: dict[str, int], seed: int) -> Path:
    """`per_label[label]` small PNGs per label folder, each label a different mean brightness (so a
    model can tell them apart), deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    for i, label in enumerate(labels):
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_label.get(label, 0)):
            px = np.clip(rng.normal(60 + 60 * i, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(d / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory, tiny_bundle) -> Path:
    """PER_CLASS real Fashion-MNIST test images per label as PNG folders, plus one corrupt file."""
    names = Manifest.load(tiny_bundle).task.labels
    root = write_label_folders(tmp_path_factory.mktemp("fmnist"), names, PER_CLASS)
    (root / label_folder_name(names[0]) / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root
