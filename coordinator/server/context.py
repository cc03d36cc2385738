"""What every room of the round loop works on: the settings, the bundle, the store, the registry,
the strategy and the metrics log of one coordinator, handed around as one record."""

from __future__ import annotations

from dataclasses import dataclass

from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.metrics import MetricsLog
from fedclip.coordinator.registry import Registry
from fedclip.coordinator.store import Store
from fedclip.coordinator.strategies.base import Strategy
from fedclip.sdk.manifest import Manifest


@dataclass(frozen=True)
class RoundContext:
    cfg: CoordConfig
    manifest: Manifest
    store: Store
    registry: Registry
    strategy: Strategy
    metrics: MetricsLog
