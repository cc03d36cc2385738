"""`fedclip-coord export` through the real CLI: bad input gives one line, exit 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedclip.sdk.manifest import Manifest

BASE = ["--model", "fedclip-tiny", "--task", "classify", "--labels", "a,b,c"]


def _subprocess_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedclip.coordinator.cli", "export", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def cli(capsys, monkeypatch):
    """The real `fedclip-coord` main, in-process (torch is imported once for all cases)."""
    from fedclip.coordinator.cli import main

    def call(*args: str) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["fedclip-coord", "export", *args])
        with pytest.raises(SystemExit) as exc:
            main()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, exc.value.code, out, err)

    return call


def _assert_one_line_error(res: subprocess.CompletedProcess, out: Path, needle: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, res.stderr
    assert errors[0].startswith("fedclip-coord: error:"), res.stderr
    assert needle in errors[0], errors[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


@pytest.fixture
def bad_weights(tmp_path) -> Path:
    path = tmp_path / "bad.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    return path


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "ViT-Nope-99", "--labels", "a,b"], "unknown model"),
        ([*BASE, "--pretrained", "/nonexistent/weights.pt"], "not found"),
        ([*BASE, "--rank", "0"], "rank"),
        ([*BASE, "--rank", "-3"], "rank"),
        ([*BASE, "--targets", "q,x"], "unknown target"),
        (["--model", "fedclip-tiny", "--labels", ""], "label"),
        (["--model", "fedclip-tiny", "--labels", "missing_labels.txt"], "not found"),
        ([*BASE, "--adapter", "tri-lora", "--train", "C"], "zero"),
        ([*BASE, "--towers", "audio"], "unknown tower"),
        (["--labels", "a,b"], "model"),
    ],
    ids=[
        "unknown-model",
        "missing-weights",
        "rank-0",
        "rank-negative",
        "unknown-target",
        "empty-labels",
        "missing-labels-file",
        "c-only-with-zero-b",
        "unknown-tower",
        "no-model",
    ],
)
def test_bad_input_is_one_line_exit_2(cli, tmp_path, args, needle):
    out = tmp_path / "bundle"
    _assert_one_line_error(cli(*args, "--out", str(out)), out, needle)


def test_bad_input_through_the_installed_entry_point(tmp_path):
    out = tmp_path / "bundle"
    _assert_one_line_error(_subprocess_cli(*BASE, "--rank", "0", "--out", str(out)), out, "rank")


def test_weights_that_do_not_fit(cli, tmp_path, bad_weights):
    out = tmp_path / "bundle"
    _assert_one_line_error(cli(*BASE, "--pretrained", str(bad_weights), "--out", str(out)), out, "do not fit")


def test_unwritable_out(cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "bundle"
    res = cli(*BASE, "--out", str(out))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("fedclip-coord: error: --out")
    assert blocker.read_text() == "x"


def test_existing_nonempty_out_is_refused(cli, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli(*BASE, "--out", str(out))
    assert res.returncode == 2 and "already exists" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_config_file_field(cli, tmp_path):
    cfg = tmp_path / "export.yaml"
    cfg.write_text(yaml.safe_dump({"model": "fedclip-tiny", "rnak": 4}))
    out = tmp_path / "bundle"
    _assert_one_line_error(cli("--config", str(cfg), "--labels", "a", "--out", str(out)), out, "rnak")


@pytest.mark.slow
def test_config_file_with_flags_winning_and_labels_file(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n\nbird\n")
    cfg = tmp_path / "export.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"model": "fedclip-tiny", "rank": 2, "alpha": 4.0, "targets": ["q", "k"], "labels": str(labels)}
        )
    )
    out = tmp_path / "bundle"
    res = _subprocess_cli("--config", str(cfg), "--rank", "4", "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    assert "random weights" in res.stderr
    m = Manifest.load(out)
    summary = json.loads(res.stdout)  # --json: the summary alone on stdout
    assert (summary["bundle_id"], summary["out"], summary["model"]) == (m.bundle_id, str(out), "fedclip-tiny")
    assert summary["formats"] == list(m.formats) and summary["pretrained"] is None
    assert summary["trainable_tensors"] == sum(t.trainable for t in m.tensors) > 0
    assert m.adapter.rank == 4 and m.adapter.alpha == 4.0  # flag beat the file, the file beat defaults
    assert m.adapter.targets == ("q", "k")
    assert m.task.labels == ("cat", "dog", "bird")


@pytest.mark.slow
def test_cli_reuses_traced_graphs_from_the_cache_dir(bundle_factory, export_cache, tmp_path):
    seen = bundle_factory(formats=("step",))  # labels a,b,c: the shape of BASE, traced into the cache
    before = sorted(p.relative_to(export_cache.root) for p in export_cache.root.rglob("*"))
    out = tmp_path / "bundle"
    res = _subprocess_cli(
        *BASE, "--seed", "3", "--format", "step", "--cache-dir", str(export_cache.root), "--out", str(out)
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 graph(s) reused, 0 traced" in " ".join(res.stderr.split())
    assert sorted(p.relative_to(export_cache.root) for p in export_cache.root.rglob("*")) == before
    assert (out / "weights.bin").read_bytes() != (seen / "weights.bin").read_bytes()  # seed 3's weights


def test_cache_prune_evicts_down_to_the_cap(cli, tmp_path):
    from fedclip.exporters.export_cache import ExportCache

    root = tmp_path / "cache"
    cache = ExportCache(root, max_bytes=1 << 40)
    for i in range(3):
        cache.get_or_build({"graph": "step", "n": i}, lambda: bytes(100_000))
    res = cli("--cache-prune", "--cache-dir", str(root), "--cache-max-size", "250K")
    assert res.returncode == 0, res.stderr
    assert f"export cache {root}: 1 graph(s) evicted, 2 kept" in res.stdout
    assert len(ExportCache(root).entries()) == 2
    res = cli("--cache-prune", "--cache-dir", str(root), "--cache-max-size", "0")
    assert res.returncode == 0 and "2 graph(s) evicted, 0 kept" in res.stdout
    assert not ExportCache(root).entries()


def test_bad_cache_size_is_one_line_exit_2(cli, tmp_path):
    res = cli("--cache-prune", "--cache-dir", str(tmp_path), "--cache-max-size", "lots")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("fedclip-coord: error: --cache-max-size: 'lots' is not a size")
    assert len(res.stderr.strip().splitlines()) == 1
