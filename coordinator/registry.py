"""The adapter registry: every adapter version (global and per-agent) with its lineage.

A version is a `fedclip.sdk.adapters` file stored as a content-addressed blob; its row records the
parent version, the round, the strategy and the round's metrics. Heads name the current version of
each scope: `global`, and `agent:<id>` for personalized strategies.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedclip.coordinator.store import Store, VersionRow
from fedclip.coordinator.strategies.base import AdapterRef, AggregateResult
from fedclip.sdk.adapters import (
    AdapterMeta,
    adapter_bytes,
    adapter_from_bytes,
    check_tensors,
    decode_tensors,
    save_adapter,
)
from fedclip.sdk.errors import AdapterError, ConfigError
from fedclip.sdk.manifest import Manifest

GLOBAL = "global"
CACHE_BYTES = 256 << 20  # adapter versions' tensors kept in memory (10,000 tri-LoRA cores: ~15 MB)
INITIAL_VERSION = "g-r0"


def global_version(round_id: int) -> str:
    return f"g-r{round_id}"


def agent_version(agent: str, round_id: int) -> str:
    return f"a-{agent}-r{round_id}"


class Registry:
    """Adapter versions over a `Store`; also the strategies' `AdapterBook`."""

    def __init__(self, store: Store, bundle_id: str, kind: str = ""):
        self.store = store
        self.bundle_id = bundle_id
        self.kind = kind
        # Versions never change, so their tensors are cached, least recently used out first, up to
        # CACHE_BYTES: a round's intake reads every selected agent's start version (its own one for
        # a personalized strategy), which was one database row and one blob per update when the
        # cache held 64 versions.
        self._cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0

    # ---- writing -------------------------------------------------------------------------------
    def _blob(self, tensors: Mapping[str, np.ndarray], meta: AdapterMeta) -> str:
        return self.store.blobs.put(adapter_bytes(tensors, meta))

    def ensure_initial(self, tensors: Mapping[str, np.ndarray], strategy: str) -> str:
        """Record the bundle's initial adapter as version `g-r0` once."""
        if self.store.head(GLOBAL) is None:
            meta = AdapterMeta(self.bundle_id, INITIAL_VERSION, "", 0, strategy, self.kind)
            row = VersionRow(
                INITIAL_VERSION, "", 0, strategy, GLOBAL, "", self._blob(tensors, meta), {}, time.time()
            )
            self.store.add_version(row, head=GLOBAL)
        return self.store.head(GLOBAL) or INITIAL_VERSION

    def commit_round(
        self,
        round_id: int,
        strategy: str,
        result: AggregateResult,
        parents: Mapping[str, str],
        metrics: Mapping[str, Mapping[str, float]],
        round_metrics: Mapping[str, float],
    ) -> str:
        """Store the round's adapters (blobs first), then versions + heads + round state in one commit.

        `parents`: agent -> version it started from; `metrics`: agent -> its metrics for the round.
        """
        now = time.time()
        gparent = self.store.head(GLOBAL) or ""
        gv = global_version(round_id)
        # (version, parent, scope, agent, tensors, metrics) of the global and each personal adapter
        items = [(gv, gparent, GLOBAL, "", result.global_tensors, dict(round_metrics))]
        heads = {GLOBAL: gv}
        for agent, tensors in sorted(result.per_agent.items()):
            v = agent_version(agent, round_id)
            items.append(
                (v, parents.get(agent, gparent), "agent", agent, tensors, dict(metrics.get(agent, {})))
            )
            heads[f"agent:{agent}"] = v
        # Blobs first, durable in batches (one wave of fsyncs per batch, not two per adapter).
        blobs = self.store.blobs.put_all(
            adapter_bytes(t, AdapterMeta(self.bundle_id, v, p, round_id, strategy, self.kind, a))
            for v, p, _, a, t, _ in items
        )
        rows = [
            VersionRow(v, p, round_id, strategy, scope, a, blob, m, now)
            for (v, p, scope, a, _, m), blob in zip(items, blobs, strict=True)
        ]
        flat = [(round_id, a, k, float(x)) for a, m in metrics.items() for k, x in m.items()]
        flat += [(round_id, "", k, float(x)) for k, x in round_metrics.items()]
        self.store.close_round_with(round_id, rows, heads, flat, gv)
        return gv

    # ---- reading (AdapterBook) -----------------------------------------------------------------
    def load(self, version: str) -> tuple[dict[str, np.ndarray], AdapterMeta]:
        row = self.store.version(version)
        if row is None:
            raise AdapterError(f"adapter version {version!r} is not in the registry")
        return adapter_from_bytes(self.store.blobs.get(row.blob), f"adapter {version}")

    def tensors(self, version: str) -> dict[str, np.ndarray]:
        if (hit := self._cache.get(version)) is not None:
            self._cache.move_to_end(version)
            return hit
        tensors = self.load(version)[0]
        self._cache[version] = tensors
        self._cached_bytes += sum(a.nbytes for a in tensors.values())
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= sum(a.nbytes for a in old.values())
        return tensors

    def global_adapter(self) -> AdapterRef:
        v = self.store.head(GLOBAL)
        if v is None:
            raise AdapterError("the registry has no global adapter yet")
        return AdapterRef(v, self.tensors(v))

    def agent_adapter(self, agent: str) -> AdapterRef | None:
        v = self.store.head(f"agent:{agent}")
        return AdapterRef(v, self.tensors(v)) if v else None

    def list(self, scope: str | None = None) -> list[VersionRow]:
        return self.store.versions(scope)

    def has(self, version: str) -> bool:
        return self.store.version(version) is not None

    def show(self, version: str) -> VersionRow:
        row = self.store.version(version)
        if row is None:
            raise AdapterError(f"adapter version {version!r} is not in the registry")
        return row

    def export(self, version: str, out: str | Path) -> Path:
        tensors, meta = self.load(version)
        return save_adapter(out, tensors, meta)


def load_initial_adapter(bundle_dir: str | Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The exchanged tensors' starting values, as exported.

    From the manifest's `initial_tensors` (step format) when they cover them, else from the bundle's
    `initial_adapter.safetensors` when it has one; otherwise from the inference
    graph, whose adapter tensors are initializers named like the torch parameters (internals.md).
    """
    bundle_dir = Path(bundle_dir)
    wanted = {t.name for t in manifest.exchanged}
    path = bundle_dir / "initial_adapter.safetensors"
    found: dict[str, np.ndarray] = {}
    if manifest.initial_tensors:
        # Step-format bundles list the trainable tensors' starting values: no onnx parsing needed
        # (unless an exchanged tensor is frozen, which only the inference graph holds).
        initial = bundle_dir / manifest.initial_tensors
        found, _ = decode_tensors(initial.read_bytes(), str(initial))
    if manifest.initial_tensors and wanted <= set(found):
        path = bundle_dir / manifest.initial_tensors
    elif path.is_file():
        found, _ = decode_tensors(path.read_bytes(), str(path))
    else:
        graph = manifest.graphs.get("inference")
        if graph is None:
            raise ConfigError(f"{bundle_dir}: no initial_adapter.safetensors, no inference graph")
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(bundle_dir / graph.file), load_external_data=True)
        found = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in wanted}
        path = bundle_dir / graph.file
    return check_tensors({k: v for k, v in found.items() if k in wanted}, manifest.exchanged, str(path))
