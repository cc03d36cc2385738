"""Aggregation strategies: an explicit registry (`register` refuses duplicates), one file each."""

from __future__ import annotations

from fedclip.coordinator.strategies.base import (
    AdapterBook,
    AdapterRef,
    AggregateResult,
    Strategy,
    StrategyOptions,
    TaskPlan,
    Update,
)
from fedclip.sdk.errors import ConfigError

_REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str, cls: type[Strategy]) -> type[Strategy]:
    if name in _REGISTRY:
        raise ValueError(f"strategy {name!r} is already registered")
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"{cls!r} is not a Strategy subclass")
    _REGISTRY[name] = cls
    return cls


def get(name: str) -> type[Strategy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"strategy: unknown strategy {name!r} (known: {', '.join(names())})") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, options: StrategyOptions | None = None) -> Strategy:
    return get(name)(options)


def _register_builtins() -> None:
    from fedclip.coordinator.strategies.ce_lora import CeLora
    from fedclip.coordinator.strategies.fedavg import FedAvg
    from fedclip.coordinator.strategies.fleet_core import FleetCore
    from fedclip.coordinator.strategies.fleet_lora import FleetLora
    from fedclip.coordinator.strategies.trimmed_mean import TrimmedMean

    for cls in (FedAvg, TrimmedMean, CeLora, FleetCore, FleetLora):
        register(cls.name, cls)


_register_builtins()

__all__ = [
    "AdapterBook",
    "AdapterRef",
    "AggregateResult",
    "Strategy",
    "StrategyOptions",
    "TaskPlan",
    "Update",
    "create",
    "get",
    "names",
    "register",
]
