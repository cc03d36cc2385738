"""Non-IID fleets from one labeled dataset: Dirichlet label skew and per-agent "camera" shifts.

`write_partition` turns a source (Fashion-MNIST idx files, scikit-learn's digits, or an image folder)
into one image folder per agent, `agent-XX/{train,test}/<label>/*.png`, plus `partition.json`:
`{"labels": [...], "agents": [ids], "counts": {id: {"shift": {...}, "train": {label: n}, "test": {...}}},
"dataset", "dirichlet_beta", "shift", "seed", "test_fraction", "max_per_agent"}`.
Every step is a pure function of the seed: the same arguments write the same bytes.

Label skew follows the usual recipe (Hsu et al. 2019, NIID-Bench): for each class, agent shares are
drawn from Dir(beta); small beta gives agents few dominant labels, large beta near-uniform ones.
A camera shift is one fixed transform per agent (inversion, rotation, contrast, blur, noise), applied
to its train and test images alike, so agents differ in input distribution as well as in labels.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from fedclip.sdk.errors import ConfigError, DataError

FASHION_MNIST_DIR = Path(os.environ.get("FEDCLIP_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
# Folder-safe names that read well in a CLIP prompt ("a photo of a t-shirt.").
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SUMMARY_NAME = "partition.json"

ShiftKind = Literal["none", "invert", "rotate", "contrast", "blur", "noise"]
SHIFT_KINDS: tuple[ShiftKind, ...] = ("invert", "rotate", "contrast", "blur", "noise")


# ---- sources ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabeledImages:
    """Images (in memory as uint8 arrays, or as files) with integer labels into `classes`."""

    labels: np.ndarray
    classes: tuple[str, ...]
    arrays: np.ndarray | None = None  # uint8 [N, H, W] or [N, H, W, 3]
    paths: tuple[Path, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i])
        try:
            with Image.open(self.paths[i]) as img:
                img.load()
                return img.convert("RGB") if img.mode not in ("L", "RGB") else img.copy()
        except OSError as e:
            raise DataError(f"{self.paths[i]}: cannot read image ({e})") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read idx file ({e})") from None
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x0800 + ndim:  # 0x08: unsigned byte payload; low byte: number of dimensions
        raise DataError(f"{path}: not an idx{ndim} ubyte file (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: idx file is truncated")
    return body.reshape(shape)


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_DIR, splits: tuple[str, ...] = ("train", "t10k")
) -> LabeledImages:
    """Both official splits pooled (70,000 28x28 grayscale images); partitioning re-splits per agent.
    `splits=("t10k",)`: the test set alone, for agents of a model pretrained on the train set."""
    root = Path(root)
    images, labels = [], []
    for split in splits:
        images.append(read_idx(root / f"{split}-images-idx3-ubyte.gz", 3))
        labels.append(read_idx(root / f"{split}-labels-idx1-ubyte.gz", 1))
    x, y = np.concatenate(images), np.concatenate(labels).astype(np.int64)
    if len(x) != len(y):
        raise DataError(f"{root}: image and label files disagree in length")
    return LabeledImages(labels=y, classes=FASHION_MNIST_CLASSES, arrays=x)


def load_digits() -> LabeledImages:
    """scikit-learn's 1,797 8x8 digits, scaled from 0..16 to 0..255."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn (pip install scikit-learn)") from None
    d = _load()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return LabeledImages(labels=d.target.astype(np.int64), classes=DIGIT_CLASSES, arrays=x)


def load_imagefolder(root: str | Path) -> LabeledImages:
    """`root/<label>/*.png|jpg|...`; labels are the sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise DataError(f"{root}: no label folders (expected {root}/<label>/*.png)")
    paths, labels = [], []
    for k, name in enumerate(classes):
        for p in sorted((root / name).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                paths.append(p)
                labels.append(k)
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the label folders")
    return LabeledImages(labels=np.asarray(labels, dtype=np.int64), classes=classes, paths=tuple(paths))


def load_source(spec: str) -> LabeledImages:
    """`fashion-mnist`, `fashion-mnist-test` (the official test set only), `digits` or `imagefolder:PATH`."""
    if spec == "fashion-mnist":
        return load_fashion_mnist()
    if spec == "fashion-mnist-test":
        return load_fashion_mnist(splits=("t10k",))
    if spec == "digits":
        return load_digits()
    if spec.startswith("imagefolder:") and len(spec) > len("imagefolder:"):
        return load_imagefolder(spec[len("imagefolder:") :])
    raise ConfigError(
        f"dataset: {spec!r} is not one of fashion-mnist, fashion-mnist-test, digits, imagefolder:PATH"
    )


# ---- label skew ------------------------------------------------------------------------------------
def dirichlet_partition(
    labels: np.ndarray,
    n_agents: int,
    beta: float,
    seed: int = 0,
    min_per_agent: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split sample indices among agents with Dir(beta) label proportions; sorted index arrays."""
    labels = np.asarray(labels)
    if n_agents < 1:
        raise ConfigError(f"agents: must be >= 1, got {n_agents}")
    if not beta > 0 or not np.isfinite(beta):
        raise ConfigError(f"dirichlet beta: must be a positive number, got {beta}")
    if n_agents * min_per_agent > len(labels):
        raise ConfigError(
            f"agents: {n_agents} agents x {min_per_agent} samples need more than {len(labels)} samples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == k) for k in classes]
    target = len(labels) / n_agents
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_agents)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(n_agents, beta))
            # Agents already over their fair share get no more of this class: keeps sizes in range.
            sizes = np.array([len(part) for part in parts])
            p = p * (sizes < target)
            p = p / p.sum() if p.sum() > 0 else np.full(n_agents, 1.0 / n_agents)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_per_agent:
            return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
    raise DataError(
        f"could not give every agent {min_per_agent} samples with beta={beta} in {max_tries} tries "
        "(use fewer agents, a larger beta or a smaller minimum)"
    )


def label_histogram(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)


# ---- camera shifts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CameraShift:
    """One agent's fixed input transform; `amount` is its strength (degrees for rotate)."""

    kind: ShiftKind = "none"
    amount: float = 0.0

    def apply(self, img: Image.Image, noise_seed: int = 0) -> Image.Image:
        if self.kind == "none":
            return img
        if self.kind == "invert":
            return ImageOps.invert(img)
        if self.kind == "rotate":
            return img.rotate(self.amount, resample=Image.Resampling.BILINEAR, fillcolor=0)
        if self.kind == "contrast":
            arr = np.asarray(img, dtype=np.float32)
            out = (arr - 128.0) * self.amount + 128.0
            return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
        if self.kind == "blur":
            return img.filter(ImageFilter.GaussianBlur(self.amount))
        if self.kind == "noise":
            arr = np.asarray(img, dtype=np.float32)
            noise = np.random.default_rng(noise_seed).normal(0.0, self.amount, arr.shape)
            return Image.fromarray(np.clip(np.rint(arr + noise), 0, 255).astype(np.uint8))
        raise ConfigError(f"shift: unknown kind {self.kind!r}")


def agent_shifts(n_agents: int, seed: int = 0) -> list[CameraShift]:
    """Agent i gets kind SHIFT_KINDS[(i + offset) % 5] with a random strength; all from the seed."""
    rng = np.random.default_rng([seed, 0x5EED])
    offset = int(rng.integers(len(SHIFT_KINDS)))
    shifts = []
    for i in range(n_agents):
        kind = SHIFT_KINDS[(i + offset) % len(SHIFT_KINDS)]
        amount = {
            "invert": 1.0,
            "rotate": float(rng.choice([-1, 1]) * rng.uniform(10, 35)),
            "contrast": float(rng.uniform(0.3, 0.6)),
            "blur": float(rng.uniform(0.6, 1.5)),
            "noise": float(rng.uniform(15, 40)),
        }[kind]
        shifts.append(CameraShift(kind, round(amount, 3)))
    return shifts


# ---- writing ---------------------------------------------------------------------------------------
def agent_ids(n_agents: int) -> list[str]:
    width = max(2, len(str(n_agents - 1)))
    return [f"agent-{i:0{width}d}" for i in range(n_agents)]


def split_train_test(indices: np.ndarray, labels: np.ndarray, test_fraction: float, rng: np.random.Generator):
    """Per-label split, so an agent's test set has its train set's skew."""
    train, test = [], []
    for k in np.unique(labels[indices]):
        idx = rng.permutation(indices[labels[indices] == k])
        n_test = int(round(len(idx) * test_fraction))
        test.extend(idx[:n_test].tolist())
        train.extend(idx[n_test:].tolist())
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


def write_partition(
    out: str | Path,
    dataset: str | LabeledImages,
    n_agents: int,
    beta: float,
    shift: Literal["none", "per-agent"] = "none",
    seed: int = 0,
    test_fraction: float = 0.2,
    max_per_agent: int | None = None,
    min_per_agent: int = 10,
    overwrite: bool = False,
    on_image: Callable[[], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict:
    """Write one image folder per agent and `partition.json`; returns the summary.

    The folder is built next to `out` and renamed into place, so `out` is either complete or absent.
    `on_total(n)` and `on_image()` feed a progress bar.
    """
    out = Path(out)
    if shift not in ("none", "per-agent"):
        raise ConfigError(f"shift: {shift!r} is not one of none, per-agent")
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test fraction: must be in [0, 1), got {test_fraction}")
    if seed < 0:
        raise ConfigError(f"seed: must be >= 0, got {seed}")
    if max_per_agent is not None and max_per_agent < 1:
        raise ConfigError(f"max per agent: must be >= 1, got {max_per_agent}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DataError(f"{out}: exists and is not empty (choose another --out or pass --force)")
    source_name = dataset if isinstance(dataset, str) else "custom"
    data = load_source(dataset) if isinstance(dataset, str) else dataset

    parts = dirichlet_partition(data.labels, n_agents, beta, seed, min(min_per_agent, len(data) // n_agents))
    rng = np.random.default_rng([seed, 0x7E57])
    if max_per_agent is not None:
        parts = [
            np.sort(rng.choice(p, max_per_agent, replace=False)) if len(p) > max_per_agent else p
            for p in parts
        ]
    shifts = agent_shifts(n_agents, seed) if shift == "per-agent" else [CameraShift()] * n_agents
    splits = [split_train_test(p, data.labels, test_fraction, rng) for p in parts]
    if on_total is not None:
        on_total(sum(len(p) for p in parts))

    ids = agent_ids(n_agents)
    summary: dict = {
        "dataset": source_name,
        "agents": ids,
        "dirichlet_beta": beta,
        "shift": shift,
        "seed": seed,
        "test_fraction": test_fraction,
        "max_per_agent": max_per_agent,
        "labels": list(data.classes),
        "counts": {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for agent, cam, (train, test) in zip(ids, shifts, splits, strict=True):
            entry: dict = {"shift": asdict(cam)}
            for split, idx in (("train", train), ("test", test)):
                for k in range(len(data.classes)):
                    (tmp / agent / split / data.classes[k]).mkdir(parents=True, exist_ok=True)
                for i in idx.tolist():
                    img = cam.apply(data.image(i), noise_seed=seed * 1_000_003 + i)
                    img.save(
                        tmp / agent / split / data.classes[data.labels[i]] / f"{i:06d}.png", optimize=False
                    )
                    if on_image is not None:
                        on_image()
                hist = label_histogram(data.labels[idx], len(data.classes))
                entry[split] = {name: int(c) for name, c in zip(data.classes, hist, strict=True)}
            summary["counts"][agent] = entry
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def read_summary(out: str | Path) -> dict:
    path = Path(out) / SUMMARY_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read partition summary ({e})") from None


def dominant_share(counts: Sequence[int], top: int = 2) -> float:
    """Fraction of an agent's samples in its `top` most frequent labels (1.0: fully skewed)."""
    ordered = np.sort(np.asarray(counts))[::-1]
    return float(ordered[:top].sum() / max(1, ordered.sum()))
