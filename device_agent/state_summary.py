"""What `fedclip-agent status` shows of a state dir: identity, rounds, and the adapter in use.

Read-only: it reads the record (`sdk.ledger.read_record`) and never takes the running agent's lock, so
it works while the agent runs. The adapter in use comes from the ledger, the agent's one history of
installs, so the status names where it came from (a round, a rollout, a pin) and not only its version.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedclip.device_agent.personal import paused_tuning
from fedclip.device_agent.state_rounds import BUILT, DONE
from fedclip.sdk.ledger import Ledger, read_record


def summarize(state_dir: str | Path) -> dict[str, Any]:
    """The status of the agent whose state dir is `state_dir` (StateError when there is none)."""
    root = Path(state_dir)
    return summarize_record(root, read_record(root))


def summarize_record(root: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """`summarize` of a state record already read (the metrics collector reads it itself)."""
    rounds = record.get("rounds", {})
    done = [r for r, e in rounds.items() if e.get("status") == DONE]
    last = max((int(r) for r in rounds), default=-1)
    prog = record.get("in_progress")
    in_use = Ledger.from_record(root, dict(record)).in_use()
    return {
        "agent_id": record.get("agent_id"),
        "fleet": record.get("fleet"),
        "bundle_id": record.get("bundle_id"),
        "adapter_version": record.get("current_adapter"),
        # None while the bundle's own adapter serves (nothing installed yet, or rolled back to it)
        "adapter_source": in_use.source if in_use else None,
        "adapter_round": in_use.round_id if in_use and in_use.round_id >= 0 else None,
        "adapter_rollout": in_use.rollout if in_use and in_use.rollout else None,
        # what inference serves: the adapter, or its copy tuned on this device (`<version>+personal`)
        "serving": in_use.served[0] if in_use else None,
        # the fleet's adapter delivered with it, where an open-set gate sends unfamiliar images
        "open_set_fallback": kept[0] if in_use and (kept := in_use.fallback_kept) else None,
        # a personal tuning paused for a message or a stop: {adapter, epoch it resumes in, epochs}
        "personal_tuning": paused_tuning(root),
        "pinned": (record.get("rollout") or {}).get("pinned") or None,
        "last_round": last,
        "rounds_done": len(done),
        "pending_updates": sorted(int(r) for r, e in rounds.items() if e.get("status") == BUILT),
        "in_progress": prog["round"] if prog else None,
        "last_metrics": rounds[str(last)].get("metrics", {}) if last >= 0 else {},
    }
