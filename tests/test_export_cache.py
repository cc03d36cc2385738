"""The export cache of traced step graphs: a cached export writes the bytes a fresh one writes, a
damaged entry is found by its sha256 and rebuilt, and concurrent exports share one entry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedclip.exporters.export_cache import GRAPH, ExportCache, cache_key

# Same label count and prompt length as bundle_factory's default ("a", "b", "c"), other texts.
OTHER = {"seed": 7, "labels": ("x", "y", "z")}


def _export(out: Path, cache: ExportCache | None, **kw) -> Path:
    from fedclip.exporters.bundle import export_bundle
    from fedclip.exporters.config import ExportConfig

    export_bundle(ExportConfig(model="fedclip-tiny", out=str(out), format="step", **kw), cache=cache)
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _assert_same_bundle(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    differ = [name for name in fa if fa[name] != fb[name]]
    assert not differ, f"files differ: {differ}"


@pytest.fixture(scope="module")
def fresh_other(tmp_path_factory) -> Path:
    """OTHER exported without the cache: what a cached export must reproduce byte for byte."""
    return _export(tmp_path_factory.mktemp("fresh") / "bundle", None, **OTHER)


@pytest.mark.slow
def test_cached_export_of_other_weights_and_labels_is_byte_identical(
    bundle_factory, export_cache, fresh_other, tmp_path
):
    seen = bundle_factory(formats=("step",))  # this shape is in the session's cache now
    hits = export_cache.hits
    cached = _export(tmp_path / "cached", export_cache, **OTHER)
    assert export_cache.hits == hits + 2  # step and step_eval: no tracing
    _assert_same_bundle(cached, fresh_other)
    # The weights are the new model's, not the cached shape's.
    assert (cached / "weights.bin").read_bytes() != (seen / "weights.bin").read_bytes()


@pytest.mark.slow
def test_damaged_entry_is_rebuilt_and_gives_the_same_bundle(
    bundle_factory, export_cache, fresh_other, tmp_path
):
    bundle_factory(formats=("step",))
    cache = ExportCache(tmp_path / "cache")
    shutil.copytree(export_cache.root, cache.root)
    damaged = 0
    for entry in cache.root.rglob("entry.json"):
        if json.loads(entry.read_text())["key"]["graph"] == "step_eval":
            graph = entry.parent / GRAPH
            graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])  # a torn write
            damaged += 1
    assert damaged
    out = _export(tmp_path / "bundle", cache, **OTHER)
    assert (cache.hits, cache.misses, cache.rebuilt) == (1, 1, 1)
    _assert_same_bundle(out, fresh_other)
    again = ExportCache(cache.root)
    _export(tmp_path / "again", again, **OTHER)
    assert (again.hits, again.misses, again.rebuilt) == (2, 0, 0)


# ---- the cache itself, with a cheap build function ---------------------------------------------
def _payload(n: int = 1 << 16) -> bytes:
    return bytes(range(256)) * (n // 256)


def test_an_entry_is_built_once_then_read(tmp_path):
    cache = ExportCache(tmp_path)
    builds = []

    def build() -> bytes:
        builds.append(1)
        return _payload()

    doc = {"architecture": {"width": 64}, "graph": "step"}
    assert cache.get_or_build(doc, build) == _payload()
    assert cache.get_or_build(dict(doc), build) == _payload()
    assert (len(builds), cache.hits, cache.misses) == (1, 1, 1)
    # Another shape is another entry.
    cache.get_or_build({**doc, "graph": "step_eval"}, build)
    assert len(builds) == 2 and cache_key(doc) != cache_key({**doc, "graph": "step_eval"})


@pytest.mark.parametrize("damage", ["flip-a-byte", "truncate", "no-entry-json", "no-graph", "bad-json"])
def test_a_damaged_entry_is_detected_and_rebuilt(tmp_path, damage):
    cache = ExportCache(tmp_path)
    doc = {"graph": "step"}
    cache.get_or_build(doc, _payload)
    where = cache.entry_dir(cache_key(doc))
    graph, entry = where / GRAPH, where / "entry.json"
    if damage == "flip-a-byte":
        data = bytearray(graph.read_bytes())
        data[100] ^= 1
        graph.write_bytes(bytes(data))
    elif damage == "truncate":
        graph.write_bytes(graph.read_bytes()[:10])
    elif damage == "no-entry-json":
        entry.unlink()
    elif damage == "no-graph":
        graph.unlink()
    else:
        entry.write_text("{not json")
    again = ExportCache(tmp_path)
    assert again.get_or_build(doc, _payload) == _payload()
    assert (again.hits, again.misses, again.rebuilt) == (0, 1, 1)
    third = ExportCache(tmp_path)
    assert third.get_or_build(doc, lambda: b"never built") == _payload()
    assert third.hits == 1
    leftovers = [p.name for p in where.parent.iterdir() if p.name not in (where.name, f".{where.name}.lock")]
    assert not leftovers  # no trash or temp folder stays behind


def test_an_unusable_cache_folder_does_not_fail_the_export(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cache = ExportCache(blocker / "cache")
    assert cache.get_or_build({"graph": "step"}, _payload) == _payload()


_WORKER = r"""
import sys, time
from pathlib import Path
from fedclip.exporters.export_cache import ExportCache, cache_key

root, me, other, log = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
def build():
    with open(log, "a") as f:
        f.write(me + "\n")
    # Hold the build until the other process has started its own lookup, so that without the
    # lock both would build.
    deadline = time.monotonic() + 60
    while not (Path(root).parent / other).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    return bytes(range(256)) * 4096
doc = {"graph": "step", "race": 1}
cache_key(doc)  # imports the tools now, so the lookup below follows the marker at once
(Path(root).parent / me).touch()
data = ExportCache(root).get_or_build(doc, build)
print(len(data))
"""


def test_two_processes_at_once_build_one_entry(tmp_path):
    root, log = tmp_path / "cache", tmp_path / "builds.log"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root), me, other, str(log)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me, other in (("p1", "p2"), ("p2", "p1"))
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert [o[0].strip() for o in outs] == [str(256 * 4096)] * 2
    assert len(log.read_text().split()) == 1  # one built, the other waited and read its entry
    check = ExportCache(root)
    assert check.get_or_build({"graph": "step", "race": 1}, lambda: b"") == bytes(range(256)) * 4096
    assert check.hits == 1
