"""Content-addressed cache of traced step graphs: an export of a shape seen before skips tracing.

A step graph depends on the architecture, the adapter spec, the task's shapes (label count and
prompt length, not the label texts), the exporter's own code and the tool versions; not on the
weight values. An entry holds the graph with its weights left out (`graph_template.strip_weights`);
every export, hit or miss, fills in the weights of the model at hand, so a cached export writes the
same bytes as an uncached one.

Layout: `<root>/step-v2/<key[:2]>/<key>/{graph.onnx, entry.json}`; entry.json (the key's inputs,
the graph's sha256 and size) is written last and the folder is renamed into place, so a reader sees
a whole entry or none. A per-key `flock` makes a second export of the same key wait for the first
and read its entry. An entry that fails its sha256 (truncated, edited, half-deleted) is removed and
rebuilt.

Size cap: after storing an entry the cache evicts least-recently-used entries (entry.json's mtime,
renewed on every hit) until it holds at most `max_bytes` (default 2 GiB, $FEDCLIP_EXPORT_CACHE_MAX).
An entry is evicted only under its own lock, taken without waiting: an entry another process is
reading or building is skipped. Lock files (empty) stay: removing one while a process waits on it
would let a third process lock a new file of the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path

from fedclip.sdk.errors import ExportError
from fedclip.sdk.fsutil import fsync_dir, remove

log = logging.getLogger(__name__)

# v2: graphs traced by one fake-mode make_fx (step_fx), no torch.export.
LAYOUT = "step-v2"
LAYOUT_GLOB = "step-v*"  # entries of every layout count toward the size cap
GRAPH, ENTRY = "graph.onnx", "entry.json"
ENV = "FEDCLIP_EXPORT_CACHE_DIR"
MAX_ENV = "FEDCLIP_EXPORT_CACHE_MAX"
DEFAULT_MAX_BYTES = 2 << 30
TOOLS = (
    "torch",
    "onnx",
    "onnxscript",
    "onnx-ir",
    "open_clip_torch",
    "onnxruntime",
    "onnxruntime-training",
    "onnxruntime-training-cpu",
)


def default_cache_dir() -> Path:
    """$FEDCLIP_EXPORT_CACHE_DIR, else `export` next to $FEDCLIP_CACHE_DIR, else ~/.cache/fedclip/export.

    $FEDCLIP_CACHE_DIR names the agents' embedding cache folder (default ~/.cache/fedclip/embeddings),
    so the export cache sits next to it.
    """
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    shared = os.environ.get("FEDCLIP_CACHE_DIR")
    if shared:
        return Path(shared).parent / "export"
    return Path.home() / ".cache" / "fedclip" / "export"


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(text: str, what: str = "--cache-max-size") -> int:
    """Bytes from `text`: a number, optionally with K, M, G or T (binary: 2G is 2 GiB)."""
    m = _SIZE.fullmatch(str(text).strip())
    if not m:
        raise ExportError(f"{what}: {text!r} is not a size (bytes, or a number with K, M, G or T, e.g. 2G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def default_max_bytes() -> int:
    """$FEDCLIP_EXPORT_CACHE_MAX, else 2 GiB."""
    env = os.environ.get(MAX_ENV)
    return parse_size(env, f"${MAX_ENV}") if env else DEFAULT_MAX_BYTES


@functools.lru_cache(maxsize=1)
def code_and_tools() -> dict[str, str]:
    """What else a traced graph depends on: the exporter's own source and the tracing tools' versions
    (from the installed metadata: importing onnxscript just for its version costs seconds)."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*here.glob("*.py"), *here.glob("model_configs/*.json")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    tools = {"exporters": digest.hexdigest()}
    for dist in TOOLS:
        with contextlib.suppress(PackageNotFoundError):
            tools[dist] = pkg_version(dist)
    return tools


def cache_key(doc: dict) -> str:
    text = json.dumps(
        {"layout": LAYOUT, "key": doc, "tools": code_and_tools()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[None]:
    """`path`'s flock; with `wait=False` an OSError (BlockingIOError) when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _lock_of(where: Path) -> Path:
    return where.with_name(f".{where.name}.lock")


@dataclass
class ExportCache:
    """The cache under `root`, at most `max_bytes` (None: `default_max_bytes()`); counts what this
    process found (`hits`), built (`misses`), threw away as corrupt (`rebuilt`) and evicted."""

    root: Path
    max_bytes: int | None = None
    hits: int = 0
    misses: int = 0
    rebuilt: int = 0
    evicted: int = 0

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()
        if self.max_bytes is None:
            self.max_bytes = default_max_bytes()

    def entry_dir(self, key: str) -> Path:
        return self.root / LAYOUT / key[:2] / key

    def get_or_build(self, doc: dict, build: Callable[[], bytes]) -> bytes:
        """The cached bytes for `doc`'s key, or `build()`'s, stored under that key first."""
        key = cache_key(doc)
        where = self.entry_dir(key)
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(_locked(_lock_of(where)))
            except OSError as e:  # an unwritable cache folder must not fail the export
                log.warning("export cache: cannot use %s (%s)", self.root, e.strerror or e)
                return build()
            data = self._read(where)
            if data is not None:
                self.hits += 1
                with contextlib.suppress(OSError):  # last use, for eviction; a read-only cache still serves
                    os.utime(where / ENTRY)
                return data
            data = build()
            self._write(where, data, doc)
            self.misses += 1
            self.prune(keep=key)
            return data

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every whole entry, least recently used first."""
        out = []
        for entry in self.root.glob(f"{LAYOUT_GLOB}/??/*/{ENTRY}"):
            where = entry.parent
            if where.name.startswith("."):  # a temp or trash folder, not an entry
                continue
            with contextlib.suppress(OSError):  # evicted meanwhile by another process
                used = entry.stat().st_mtime
                out.append((used, sum(p.stat().st_size for p in where.iterdir()), where))
        return sorted(out)

    def prune(self, keep: str | None = None) -> int:
        """Evict least-recently-used entries (never `keep`, never one another process holds) until
        the cache holds at most `max_bytes`; returns how many were evicted."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        evicted = 0
        for _, size, where in entries:
            if total <= (self.max_bytes or 0):
                break
            if where.name == keep:
                continue
            try:
                with _locked(_lock_of(where), wait=False):
                    if not where.exists():  # evicted by another process meanwhile
                        continue
                    self._discard(where)
            except OSError:  # held by a process reading or building it, or gone already
                continue
            total -= size
            evicted += 1
        self.evicted += evicted
        return evicted

    def _read(self, where: Path) -> bytes | None:
        if not where.exists():
            return None
        try:
            entry = json.loads((where / ENTRY).read_text())
            data = (where / GRAPH).read_bytes()
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ValueError("sha256 mismatch")
            return data
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning(
                "export cache: entry %s is damaged (%s); rebuilding it",
                where.name[:12],
                e,
            )
            self._discard(where)
            self.rebuilt += 1
            return None

    def _discard(self, where: Path) -> None:
        # Renamed away first: a half-removed folder must never look like an entry.
        trash = where.with_name(f".{where.name}.trash-{os.getpid()}")
        with contextlib.suppress(OSError):
            os.replace(where, trash)
        remove(trash)
        remove(where)

    def _write(self, where: Path, data: bytes, doc: dict) -> None:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{where.name}.", dir=where.parent))
        try:
            entry = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "key": doc,
            }
            for name, content in (
                (GRAPH, data),
                (ENTRY, json.dumps(entry, sort_keys=True, default=str).encode()),
            ):
                with open(tmp / name, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, where)
            fsync_dir(where.parent)
        except OSError as e:  # a full or read-only cache must not fail the export
            log.warning(
                "export cache: cannot store an entry in %s (%s)",
                self.root,
                e.strerror or e,
            )
            remove(tmp)
