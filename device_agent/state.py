"""The agent's crash-safe state dir.

Layout (every file is written atomically: temp file + fsync + os.replace + fsync of the folder, so a
`kill -9` at any moment leaves either the old or the new version, never half of one):

    state.json                 identity, the adapter ledger (`sdk.ledger`), rounds and their status,
                               round in progress, what the rollout client remembers (`rollout`)
    state.lock                 flock held by the running agent (released by the kernel on kill -9)
    adapters/<version>.safetensors   adapters installed for inference (full trainable set)
    adapters/<version>.personal.safetensors   its copy tuned on the device (`device_agent.personal`)
    adapters/<version>.fallback.safetensors   the fleet's adapter its rollout delivered beside it
                               (`rollout start --fallback`; where the open-set gate sends images)
    personal-trainer.ckpt      the trainer while personal tuning runs (removed after; a crash leaves it)
    personal-work.ckpt, .json  a personal tuning paused for a message or a stop, resumed from there
    trainer/ckpt-<round>       ORT checkpoint (weights + optimizer) at the end of the last round
    rounds/<round>/task.bin    the task that started the round, to resume it after a restart
    rounds/<round>/ckpt-<e>    in-progress checkpoint after epoch e
    rounds/<round>/update.bin  the exact update blob of the round

The update blob is the source of truth for "this round was built": once `update.bin` exists the
round is never trained again and only those bytes are ever published, so one round never yields two
different updates, whatever the timing of a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

# the round lifecycle's half of this class (`state_rounds`: rounds, updates, their BUILT / DONE statuses)
from fedclip.device_agent.state_rounds import RoundsState
from fedclip.sdk.adapters import AdapterMeta, adapter_bytes
from fedclip.sdk.errors import ConfigError, StateError
from fedclip.sdk.fsutil import atomic_write, remove
from fedclip.sdk.ids import ID_PATTERN

# the ledger's file and format are the sdk's (`sdk.ledger`): its readers and this writer agree
from fedclip.sdk.ledger import SERVING, STATE_FILE, STATE_FORMAT, Ledger, read_record

log = logging.getLogger(__name__)


LOCK_FILE = "state.lock"
# files a ledger entry may carry beside its adapter, `adapters/<version>.<side>.safetensors`
SIDES = ("personal", "fallback")


def _empty_record(agent_id: str, fleet: str, bundle_id: str) -> dict[str, Any]:
    return {
        "format": STATE_FORMAT,
        "agent_id": agent_id,
        "fleet": fleet,
        "bundle_id": bundle_id,
        "current_adapter": None,
        "adapters": {},
        "rounds": {},
        "in_progress": None,
        "trainer_checkpoint": None,
    }


def current_adapter_path(root: str | Path) -> Path | None:
    """The adapter file inference uses: the in-use entry's personal copy when it has one
    (`device_agent.personal`), as `Classifier.from_state` serves it."""
    used = Ledger.read(root).in_use()
    return used.served[1] if used is not None else None


class AgentState(RoundsState):
    """One agent's state dir, held under an exclusive lock while the agent runs: identity, the adapter
    ledger and what the rollout client remembers here; rounds in `RoundsState`."""

    def __init__(self, root: str | Path, *, agent_id: str, fleet: str, bundle_id: str):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.root / LOCK_FILE, "a+")  # noqa: SIM115 - held for the process lifetime
        except OSError as e:
            raise StateError(f"{self.root}: cannot create the state dir ({e.strerror or e})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise StateError(f"{self.root}: state dir is in use by another running agent") from None
        if (self.root / STATE_FILE).exists():
            self.record = read_record(self.root)
            if self.record.get("agent_id") != agent_id or self.record.get("fleet") != fleet:
                self.close()
                raise ConfigError(
                    f"state: {self.root} belongs to agent {self.record.get('agent_id')!r} of fleet "
                    f"{self.record.get('fleet')!r}, not {agent_id!r} of {fleet!r}; use another --state dir"
                )
            if self.record.get("bundle_id") != bundle_id:
                # Adapters and checkpoints of another bundle do not fit this one; the history stays.
                log.warning(
                    "state: bundle changed from %s to %s; dropping adapters and checkpoints",
                    self.record.get("bundle_id"),
                    bundle_id,
                )
                self.record.update(
                    bundle_id=bundle_id, current_adapter=None, in_progress=None, trainer_checkpoint=None
                )
                # out of the ledger too, so no rollback returns to an adapter of another bundle
                self.retire_adapters(list(self.record["adapters"]), forget=True)
        else:
            self.record = _empty_record(agent_id, fleet, bundle_id)
            self._save()
        self._sweep_temp_files()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    # ---- persistence ---------------------------------------------------------------------------
    def _save(self) -> None:
        self._write(STATE_FILE, json.dumps(self.record, sort_keys=True, indent=1, allow_nan=False).encode())

    def _write(self, rel: str, data: bytes) -> None:
        self._produce(rel, lambda path: atomic_write(path, data))

    def _produce(self, rel: str, write: Callable[[Path], object]) -> str:
        """Run one atomic write of `rel`; a full or read-only disk becomes a one-line StateError."""
        try:
            write(self.root / rel)
        except OSError as e:
            raise StateError(f"{self.root}: cannot write {rel} ({e.strerror or e})") from None
        return rel

    def _sweep_temp_files(self) -> None:
        """Temp files of writes a crash interrupted; they are never referenced."""
        for tmp in self.root.rglob(".*.tmp"):
            remove(tmp)

    # ---- views ---------------------------------------------------------------------------------
    @property
    def current_adapter(self) -> str | None:
        return self.record["current_adapter"]

    def current_adapter_path(self) -> Path | None:
        used = self.ledger().in_use()
        return used.file if used is not None else None

    # ---- adapters ------------------------------------------------------------------------------
    def install_adapter(
        self,
        version: str,
        tensors: Mapping[str, np.ndarray],
        meta: AdapterMeta,
        *,
        source: str,
        rnd: int = -1,
        use: bool = True,
        rollout: int = 0,
        fallback: tuple[Mapping[str, np.ndarray], AdapterMeta] | None = None,
    ) -> Path:
        """Keep an adapter in the ledger (`sdk.ledger`) and, with `use`, make it the one inference uses;
        with its `fallback` (tensors, meta) beside it. Idempotent for a version already there: its
        personal copy and fallback stay with it (they belong to the version, not to how it came)."""
        if not ID_PATTERN.match(version or ""):
            raise StateError(f"adapter version {version!r} is not a valid id")
        rel = f"adapters/{version}.safetensors"
        prior = self.label_prior()
        if prior:  # a balanced-softmax fleet's adapter: inference adds this prior back
            meta = replace(meta, label_prior=prior)
        old = self.record["adapters"].get(version)
        if old is None or not (self.root / rel).is_file():
            self._write(rel, adapter_bytes(tensors, meta))
        if old is not None and source == "task" and old.get("source") in SERVING:
            # A task that starts from an adapter a rollout already installed here (a fleet's next round
            # starts from its last one): that entry, its rollout id and its side files stay as they are.
            return self.root / rel
        # strictly increasing, so the ledger's order (and a rollback's target) never rests on a tie
        latest = max((e.get("installed_at", 0.0) for e in self.record["adapters"].values()), default=0.0)
        entry: dict[str, Any] = {
            "file": rel,
            "source": source,
            "round": rnd,
            "rollout": rollout,
            "installed_at": max(time.time(), latest + 1e-6),
        }
        entry.update({k: v for k, v in (old or {}).items() if k in SIDES})
        if fallback is not None:
            fb_tensors, fb_meta = fallback
            entry["fallback"] = self._side_file(
                version, "fallback", fb_tensors, fb_meta, {"version": fb_meta.version}
            )
        self.record["adapters"][version] = entry
        if use:
            self.record["current_adapter"] = version
        self._save()
        return self.root / rel

    def keep_fallback(self, version: str, tensors: Mapping[str, np.ndarray], meta: AdapterMeta) -> Path:
        """Keep the fleet's adapter `meta.version` beside ledger entry `version` as its fallback (a
        `--fallback` rollout of a version this device has already): where its open-set gate sends
        unfamiliar images while `version` is in use."""
        return self._keep_side(version, "fallback", tensors, meta, {"version": meta.version})

    def keep_personal(
        self, version: str, tensors: Mapping[str, np.ndarray], meta: AdapterMeta, metrics: Mapping[str, float]
    ) -> Path:
        """Keep this device's personal copy of ledger entry `version` (`device_agent.personal`) beside
        it: inference serves the copy while `version` is in use."""
        return self._keep_side(version, "personal", tensors, meta, {k: float(v) for k, v in metrics.items()})

    def _keep_side(
        self, version: str, side: str, tensors: Mapping[str, np.ndarray], meta: AdapterMeta, fields: Mapping
    ) -> Path:
        entry = self.record["adapters"].get(version)
        if entry is None:
            raise StateError(f"adapter {version!r} is not in the ledger")
        entry[side] = self._side_file(version, side, tensors, meta, fields)
        self._save()
        return self.root / entry[side]["file"]

    def _side_file(
        self, version: str, side: str, tensors: Mapping[str, np.ndarray], meta: AdapterMeta, fields: Mapping
    ) -> dict[str, Any]:
        """`adapters/<version>.<side>.safetensors` written, and its record (`{"file", **fields}`) to
        put on the entry after it: the record never names a missing file."""
        rel = f"adapters/{version}.{side}.safetensors"
        self._write(rel, adapter_bytes(tensors, meta))
        return {"file": rel, **fields}

    def personal_metrics(self) -> dict[str, float]:
        """The held-out metrics of the personal copy inference serves now (empty: none)."""
        entry = self.record["adapters"].get(self.record["current_adapter"] or "", {})
        personal = entry.get("personal")
        if not isinstance(personal, dict) or not (self.root / str(personal.get("file", ""))).is_file():
            return {}
        return {k: float(v) for k, v in personal.items() if k != "file"}

    def fallback_version(self) -> str:
        """The version of the fleet's adapter kept beside the adapter in use, where its file is there
        (what `sdk.ledger.installed` serves the open-set gate's images with); "": none."""
        ledger = self.ledger()
        entry = ledger.entry(ledger.current)
        kept = entry.fallback_kept if entry is not None else None
        return kept[0] if kept else ""

    def scratch_path(self, name: str) -> Path:
        """A file of the state dir for one operation's own use (its caller removes it)."""
        return self.root / name

    def ledger(self) -> Ledger:
        """The ledger as this writer holds it (what `Ledger.read` of the state dir returns)."""
        return Ledger.from_record(self.root, self.record)

    def retire_adapters(self, versions: Iterable[str], *, forget: bool = False) -> None:
        """Rolled back (default): the entries get `rolled_back_at` and stay, files included, so an
        inference process that read the ledger a moment before still finds the file. `forget`: the
        entries and their files go. The adapter inference uses is never touched."""
        current, now = self.record["current_adapter"], time.time()
        adapters = self.record["adapters"]
        gone = [(v, adapters[v]) for v in versions if v in adapters and v != current]
        for version, entry in gone:
            if forget:
                del adapters[version]
            else:
                entry["rolled_back_at"] = now
        self._save()  # the record first, then the files: it never names a file that is gone
        for _, entry in gone if forget else ():
            remove(self.root / entry["file"])
            for side in SIDES:  # its personal copy and its fallback go with it
                if isinstance(entry.get(side), dict):
                    remove(self.root / entry[side]["file"])

    def set_adapter_rollout(self, version: str, rollout: int) -> None:
        """Name the rollout that installed `version` (for state dirs that recorded it as 0)."""
        entry = self.record["adapters"].get(version)
        if entry is not None and entry.get("rollout") != rollout:
            entry["rollout"] = rollout
            self._save()

    def rollout_memory(self) -> dict[str, Any]:
        """A copy of the `rollout` section (`device_agent.rollout_memory`: pins, rolled-back rollouts,
        kept acks)."""
        return json.loads(json.dumps(self.record.get("rollout") or {}))

    def save_rollout_memory(self, memory: Mapping[str, Any]) -> None:
        self.record["rollout"] = dict(memory)
        self._save()

    def label_prior(self) -> tuple[float, ...]:
        """The label histogram this device's balanced-softmax training used (empty: it trains plain CE)."""
        return tuple(float(c) for c in self.record.get("label_prior") or ())

    def set_label_prior(self, counts: Iterable[float]) -> None:
        """Record the fleet's loss as this device trains it: its histogram under balanced softmax,
        nothing under CE. Every adapter kept from then on carries it (`install_adapter`)."""
        counts = [float(c) for c in counts]
        if (self.record.get("label_prior") or []) != counts:
            self.record["label_prior"] = counts
            self._save()

    def set_current_adapter(self, version: str | None) -> None:
        """Switch inference to an adapter already kept here, or to the bundle's own (None)."""
        if version is not None and version not in self.record["adapters"]:
            raise StateError(f"adapter {version!r} is not installed in {self.root}")
        if self.record["current_adapter"] != version:
            self.record["current_adapter"] = version
            self._save()
