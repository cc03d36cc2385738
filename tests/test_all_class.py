"""All-class test sets: balanced, unused by any agent, and under each agent's own shift."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fedclip.sdk.all_class import ALL_SPLIT, write_all_class_sets
from fedclip.sdk.errors import DataError
from fedclip.sdk.partition import CameraShift, load_digits, read_summary, write_partition


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_all_class_sets_are_balanced_unused_and_shifted(tmp_path, digits):
    root = tmp_path / "part"
    write_partition(root, digits, 3, beta=0.1, shift="per-agent", seed=4, max_per_agent=60)
    written = write_all_class_sets(root, digits, per_label=5, seed=1)
    summary = read_summary(root)
    assert written == {a: 50 for a in summary["agents"]}
    names = {}
    for a in summary["agents"]:
        files = sorted((root / a / ALL_SPLIT).glob("*/*.png"))
        per_label = {lab: len(list((root / a / ALL_SPLIT / lab).glob("*.png"))) for lab in summary["labels"]}
        assert set(per_label.values()) == {5}
        names[a] = [f.relative_to(root / a / ALL_SPLIT) for f in files]
        own = {int(f.stem) for s in ("train", "test") for f in (root / a / s).glob("*/*.png")}
        assert own.isdisjoint(int(f.stem) for f in files)
        # each image is the dataset image under this agent's shift
        shift = CameraShift(**summary["counts"][a]["shift"])
        f = files[0]
        i = int(f.stem)
        expect = np.asarray(shift.apply(digits.image(i), noise_seed=summary["seed"] * 1_000_003 + i))
        np.testing.assert_array_equal(np.asarray(Image.open(f)), expect)
    a0, a1 = summary["agents"][:2]
    assert names[a0] == names[a1]  # the same images for every agent
    assert not np.array_equal(
        np.asarray(Image.open(root / a0 / ALL_SPLIT / names[a0][0])),
        np.asarray(Image.open(root / a1 / ALL_SPLIT / names[a1][0])),
    )


def test_all_class_sets_refuse_bad_input(tmp_path, digits):
    root = tmp_path / "part"
    write_partition(root, digits, 2, beta=1.0, seed=0, max_per_agent=40)
    with pytest.raises(DataError, match="per_label"):
        write_all_class_sets(root, digits, per_label=0)
    with pytest.raises(DataError, match="unused images"):
        write_all_class_sets(root, digits, per_label=10_000)
