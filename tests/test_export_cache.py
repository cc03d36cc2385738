"""The export cache of traced step graphs: a cached export writes the bytes a fresh one writes, a
damaged entry is found by its sha256 and rebuilt, concurrent exports share one entry, and the cache
keeps to its size cap by evicting the least recently used entries nobody holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedclip.exporters.export_cache import GRAPH, ExportCache, cache_key, parse_size
from fedclip.sdk.errors import ExportError

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


# ---- the size cap: least-recently-used entries go, held ones stay -------------------------------
def _age(cache: ExportCache, doc: dict, seconds_ago: float) -> None:
    """Set an entry's last use (what a hit renews) into the past: a clock-free LRU order."""
    entry = cache.entry_dir(cache_key(doc)) / "entry.json"
    t = time.time() - seconds_ago
    os.utime(entry, (t, t))


def _present(cache: ExportCache, *docs: dict) -> list[bool]:
    return [cache.entry_dir(cache_key(d)).is_dir() for d in docs]


def test_least_recently_used_entries_are_evicted_beyond_the_cap(tmp_path):
    a, b, c = ({"graph": "step", "n": i} for i in range(3))
    unlimited = ExportCache(tmp_path, max_bytes=1 << 40)
    for doc in (a, b):
        unlimited.get_or_build(doc, _payload)
    _age(unlimited, a, 200)
    _age(unlimited, b, 100)  # a is older, but the hit below makes it the newest
    entry_size = unlimited.entries()[0][1]
    cache = ExportCache(tmp_path, max_bytes=2 * entry_size + entry_size // 2)
    assert cache.get_or_build(a, lambda: b"never built") == _payload()
    assert cache.evicted == 0
    cache.get_or_build(c, _payload)  # three entries > the cap: b, the least recently used, goes
    assert cache.evicted == 1
    assert _present(cache, a, b, c) == [True, False, True]
    assert sum(size for _, size, _ in cache.entries()) <= cache.max_bytes
    leftovers = [p.name for p in tmp_path.rglob("*") if "trash" in p.name or p.name.startswith(".tmp")]
    assert not leftovers
    again = ExportCache(tmp_path, max_bytes=cache.max_bytes)
    again.get_or_build(b, _payload)  # an evicted entry is simply built again
    assert (again.hits, again.misses, again.evicted) == (0, 1, 1)


def test_the_entry_just_written_stays_even_over_the_cap(tmp_path):
    cache = ExportCache(tmp_path, max_bytes=0)
    docs = [{"graph": "step", "n": i} for i in range(2)]
    for doc in docs:
        cache.get_or_build(doc, _payload)
    assert _present(cache, *docs) == [False, True]
    assert cache.evicted == 1


_HOLDER = r"""
import sys
from pathlib import Path
from fedclip.exporters.export_cache import _locked
with _locked(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_an_entry_another_process_holds_is_not_evicted(tmp_path):
    held, free, new = ({"graph": "step", "n": i} for i in range(3))
    cache = ExportCache(tmp_path, max_bytes=1 << 40)
    for doc in (held, free):
        cache.get_or_build(doc, _payload)
    _age(cache, held, 200)  # the least recently used: first to go, were it not held
    _age(cache, free, 100)
    lock = cache.entry_dir(cache_key(held)).with_name(f".{cache_key(held)}.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        cache.max_bytes = 0
        cache.get_or_build(new, _payload)
        assert _present(cache, held, free, new) == [True, False, True]
    finally:
        holder.communicate("go\n", timeout=60)
    assert holder.returncode == 0
    assert cache.prune() == 2  # released: now it goes too (no entry is being written to keep)
    assert _present(cache, held, new) == [False, False]


@pytest.mark.parametrize(
    "text, size",
    [("0", 0), ("1500", 1500), ("2G", 2 << 30), ("500M", 500 << 20), ("1.5k", 1536), ("3 GiB", 3 << 30)],
)
def test_sizes_read_as_binary_units(text, size):
    assert parse_size(text) == size


def test_the_cap_comes_from_the_environment(tmp_path, monkeypatch):
    assert ExportCache(tmp_path).max_bytes == 2 << 30
    monkeypatch.setenv("FEDCLIP_EXPORT_CACHE_MAX", "64M")
    assert ExportCache(tmp_path).max_bytes == 64 << 20
    monkeypatch.setenv("FEDCLIP_EXPORT_CACHE_MAX", "lots")
    with pytest.raises(ExportError, match="FEDCLIP_EXPORT_CACHE_MAX"):
        ExportCache(tmp_path)
