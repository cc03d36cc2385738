"""The rollout history of one device, kept in its adapter ledger (`sdk.ledger`, written by
`AgentState`): installing a rollout's adapter for inference under its rollout id, rolling a rollout
back to the adapter that was in use before it, and keeping the ledger's rollout entries bounded.

A rollback never deletes the history: the rolled-back entry keeps its rollout id and gets
`rolled_back_at`, and inference returns to `Ledger.previous`, the newest usable
adapter installed before it (a rollout's, or the agent's own from before any rollout); with none,
to the bundle's own adapter.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedclip.device_agent.state import AgentState
from fedclip.sdk.adapters import AdapterMeta

KEEP_VERSIONS = 3  # rollout adapters kept with their files: current + two to roll back to


def install(
    state: AgentState,
    tensors: Mapping[str, np.ndarray],
    meta: AdapterMeta,
    rollout: int,
    fallback: tuple[Mapping[str, np.ndarray], AdapterMeta] | None = None,
) -> None:
    """Keep `meta.version` in the ledger as installed by `rollout` (with the `fallback` its push
    carried) and switch inference to it."""
    state.install_adapter(
        meta.version, tensors, meta, source="rollout", rnd=meta.round, rollout=rollout, fallback=fallback
    )
    _prune(state)


def roll_back(state: AgentState, rollout: int, pinned: str | None) -> tuple[str, str | None] | None:
    """Undo `rollout` on this device: its entries are marked rolled back, and when inference uses its
    adapter (and the device is not pinned to it) inference goes back to the one before. Returns
    (from, to) when inference switched, None when it stays where it is."""
    ledger = state.ledger()
    current = ledger.entry(ledger.current)
    switched = None
    if current is not None and current.rollout == rollout and current.version != pinned:
        before = ledger.previous(current.version)
        target = before.version if before is not None else None
        state.set_current_adapter(target)
        switched = (current.version, target)
    # a pinned device stays on its version whatever happens to the rollout that brought it
    state.retire_adapters(e.version for e in ledger.of_rollout(rollout) if e.version != pinned)
    return switched


def _prune(state: AgentState) -> None:
    """Drop rollout entries, and their files, beyond the newest KEEP_VERSIONS usable ones and
    KEEP_VERSIONS rolled-back ones (the one in use always stays)."""
    ledger = state.ledger()
    older = [e for e in reversed(ledger.entries) if e.source == "rollout" and e.version != ledger.current]
    live = [e.version for e in older if not e.rolled_back_at]
    gone = [e.version for e in older if e.rolled_back_at]
    drop = live[KEEP_VERSIONS - 1 :] + gone[KEEP_VERSIONS:]
    if drop:
        state.retire_adapters(drop, forget=True)
