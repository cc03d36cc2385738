"""What every room of the round loop works on: the settings, the bundle, the store, the registry,
the strategy, the metrics log, the signing key and the trust of one coordinator, as one record."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.metrics import MetricsLog
from fedclip.coordinator.registry import Registry
from fedclip.coordinator.store import Store
from fedclip.coordinator.strategies.base import Strategy
from fedclip.coordinator.trust import Trust
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.signing import Ed25519PrivateKey


@dataclass(frozen=True)
class RoundContext:
    cfg: CoordConfig
    manifest: Manifest
    store: Store
    registry: Registry
    strategy: Strategy
    metrics: MetricsLog
    key: Ed25519PrivateKey | None = None  # signs tasks and the coordinator's status
    trust: Trust = field(default_factory=lambda: Trust(None))  # whose messages count
