"""One-time import of the rollout state older agents kept apart from the ledger.

Before the ledger was the one history, the rollout client kept `<state>/rollout/rollout.json` (its
own history of installed versions, the pin, rolled-back rollouts, sent acks, the newest adapter time)
and copies of its adapters in `<state>/rollout/adapters/`, while the ledger recorded the same
installs with rollout id 0. On the first start of a newer agent:

- the pin, rolled-back rollouts, acks and adapter time move into the rollout memory (so a pinned
  device stays pinned and a rolled-back rollout's retained adapter is still never taken);
- ledger entries the old history still held get their rollout id; `rollout` entries it no longer
  held (rolled back, or beyond its last three) are dropped, so a rollback never returns to them;
- then `<state>/rollout/` is removed (its adapters were copies of the ledger's).

The memory and ledger are saved before the old folder goes, so a crash midway repeats an import that
changes nothing the second time. An unreadable `rollout.json` is logged and removed: the ledger
alone still orders rollbacks.
"""

from __future__ import annotations

import json
import logging
import shutil

from fedclip.device_agent.rollout_memory import RolloutMemory
from fedclip.device_agent.state import AgentState

log = logging.getLogger(__name__)

LEGACY_DIR = "rollout"
LEGACY_FILE = "rollout.json"


def migrate(state: AgentState, memory: RolloutMemory) -> bool:
    """Import `<state>/rollout/rollout.json` if there is one; True when it was there."""
    folder = state.root / LEGACY_DIR
    path = folder / LEGACY_FILE
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not an object")
        _import(state, memory, old)
        log.info("%s: rollout state moved into the adapter ledger", path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.error("%s unreadable (%s); the adapter ledger alone orders rollbacks", path, e)
    shutil.rmtree(folder, ignore_errors=True)
    return True


def _import(state: AgentState, memory: RolloutMemory, old: dict) -> None:
    memory.pinned = memory.pinned or old.get("pinned") or None
    memory.rolled_back = sorted(set(memory.rolled_back) | {int(r) for r in old.get("rolled_back", [])})
    memory.acks = {**{str(k): v for k, v in dict(old.get("acks", {})).items()}, **memory.acks}
    memory.last_sent_at = max(memory.last_sent_at, float(old.get("last_sent_at", 0.0)))
    memory.save()
    history = {str(h["version"]): int(h.get("rollout", 0)) for h in old.get("history", [])}
    for version, rollout in history.items():
        if rollout:
            state.set_adapter_rollout(version, rollout)
    stale = [e.version for e in state.ledger().entries if e.source == "rollout" and e.version not in history]
    state.retire_adapters(stale, forget=True)
