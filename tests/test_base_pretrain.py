"""The cached pretrained base: made once, reused while its settings match, remade when they differ."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _base(cache, steps):
    argv = [sys.executable, "-m", "fedclip.exporters.base_pretrain", "--cache", str(cache),
            "--public-n", "64", "--steps", str(steps), "--eval-n", "64"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cached_base_is_reused_and_keyed_by_settings(tmp_path):
    first = _base(tmp_path, 2)
    assert first["cached"] is False and first["steps"] == 2
    weights = tmp_path / "fedclip-tiny-fmnist-n64-s2-seed0.pt"
    assert first["weights"] == str(weights) and weights.is_file()
    mtime = weights.stat().st_mtime_ns
    again = _base(tmp_path, 2)
    assert again["cached"] is True and weights.stat().st_mtime_ns == mtime
    other = _base(tmp_path, 3)
    assert other["cached"] is False and other["weights"] != first["weights"]
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_settings_exit_2(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fedclip.exporters.base_pretrain", "--cache", str(tmp_path), "--steps", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "must be >= 1" in out.stdout
