"""All-class test sets for a written partition: every label, under each agent's own camera shift.

An agent's own test split has its train split's label skew, so it cannot show what local training
costs on labels the agent has not seen. `write_all_class_sets` adds `<agent>/all/<label>/*.png` to a
`write_partition` folder: the same balanced images (`per_label` of every label, none of them in any
agent's train or test split) for every agent, each under that agent's shift from `partition.json`,
so all-class accuracies compare across agents and methods. Evaluate them like any test folder
(`fedclip-agent eval --data <agent>/all`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedclip.sdk.errors import DataError
from fedclip.sdk.partition import IMAGE_SUFFIXES, CameraShift, LabeledImages, load_source, read_summary

ALL_SPLIT = "all"


def _used_indices(root: Path, agents: list[str]) -> set[int]:
    """Dataset indices already in some agent's folders (write_partition names files by index)."""
    used = set()
    for a in agents:
        for split in ("train", "test"):
            for f in (root / a / split).glob("*/*"):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.stem.isdigit():
                    used.add(int(f.stem))
    return used


def write_all_class_sets(
    root: str | Path, dataset: str | LabeledImages, per_label: int = 20, seed: int = 0
) -> dict[str, int]:
    """Write `<agent>/all/<label>/<index>.png` for every agent of the partition at `root`.

    `dataset` must be the source the partition was written from. Returns {agent: images written}.
    """
    root = Path(root)
    summary = read_summary(root)
    data = load_source(dataset) if isinstance(dataset, str) else dataset
    if list(data.classes) != list(summary["labels"]):
        raise DataError(f"{root}: the partition's labels are not those of the dataset given")
    if per_label < 1:
        raise DataError(f"per_label: must be >= 1, got {per_label}")
    used = _used_indices(root, summary["agents"])
    rng = np.random.default_rng([seed, 0xA11])
    picked = []
    for k in range(len(data.classes)):
        free = np.array([i for i in np.flatnonzero(data.labels == k) if int(i) not in used], dtype=np.int64)
        if len(free) < per_label:
            raise DataError(f"label {data.classes[k]!r}: {len(free)} unused images, {per_label} needed")
        picked += rng.choice(free, per_label, replace=False).tolist()
    written = {}
    for agent in summary["agents"]:
        shift = CameraShift(**summary["counts"][agent]["shift"])
        for k in range(len(data.classes)):
            (root / agent / ALL_SPLIT / data.classes[k]).mkdir(parents=True, exist_ok=True)
        for i in picked:
            img = shift.apply(data.image(i), noise_seed=summary["seed"] * 1_000_003 + i)
            img.save(root / agent / ALL_SPLIT / data.classes[data.labels[i]] / f"{i:06d}.png", optimize=False)
        written[agent] = len(picked)
    return written
