"""Content-addressed cache of traced step graphs: an export of a shape seen before skips tracing.

A step graph depends on the architecture, the adapter spec, the task's shapes (label count and
prompt length, not the label texts), the exporter's own code and the tool versions; not on the
weight values. An entry holds the graph with its weights left out (`graph_template.strip_weights`);
every export, hit or miss, fills in the weights of the model at hand, so a cached export writes the
same bytes as an uncached one.

Layout: `<root>/step-v1/<key[:2]>/<key>/{graph.onnx, entry.json}`; entry.json (the key's inputs,
the graph's sha256 and size) is written last and the folder is renamed into place, so a reader sees
a whole entry or none. A per-key `flock` makes a second export of the same key wait for the first
and read its entry. An entry that fails its sha256 (truncated, edited, half-deleted) is removed and
rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path

from fedclip.sdk.fsutil import fsync_dir, remove

log = logging.getLogger(__name__)

LAYOUT = "step-v1"
GRAPH, ENTRY = "graph.onnx", "entry.json"
ENV = "FEDCLIP_EXPORT_CACHE_DIR"
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
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@dataclass
class ExportCache:
    """The cache under `root`; counts what this process found (`hits`), built (`misses`) and
    threw away as corrupt (`rebuilt`)."""

    root: Path
    hits: int = 0
    misses: int = 0
    rebuilt: int = 0

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()

    def entry_dir(self, key: str) -> Path:
        return self.root / LAYOUT / key[:2] / key

    def get_or_build(self, doc: dict, build: Callable[[], bytes]) -> bytes:
        """The cached bytes for `doc`'s key, or `build()`'s, stored under that key first."""
        key = cache_key(doc)
        where = self.entry_dir(key)
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(_locked(where.with_name(f".{key}.lock")))
            except OSError as e:  # an unwritable cache folder must not fail the export
                log.warning("export cache: cannot use %s (%s)", self.root, e.strerror or e)
                return build()
            data = self._read(where)
            if data is not None:
                self.hits += 1
                return data
            data = build()
            self._write(where, data, doc)
            self.misses += 1
            return data

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
