"""The agent's adapter ledger, read-only: every adapter a device kept, where it came from, and which
one its inference uses now. One home for the format, so the agent that writes it (`AgentState`), the
application that follows it (`Classifier`), `fedclip-agent status` and the demo all read it alike.

The ledger is the `adapters` map and `current_adapter` of `<state>/state.json` (replaced atomically
by the agent, so a reader sees the old or the new ledger, never half of one). Sources:
- `task`: the full trainable set a round started from (the fleet's model after the round before),
  kept for the record and never used for inference: only signed rollouts change what a device answers;
- `rollout`: installed for inference by a signed rollout (`rollout` names it);
- `adapter`: installed by an unsigned push (closed test setups only).

An entry may carry this device's `personal` copy (`device_agent.personal`: the entry's adapter tuned
on the device's own images, held near it): while the entry is in use, inference serves the copy.
It may also carry a `fallback`: the fleet's global adapter a rollout delivered beside a personalized
one (`rollout start --fallback`), where an open-set gate sends the images that do not look like the
device's own (`device_agent.open_set`); it goes wherever its entry goes (rollback, pruning).

The ledger is also the rollout history: a rolled-back rollout's entry keeps its `rollout` id and gets
`rolled_back_at` (never used again), and a rollback returns inference to `Ledger.previous(...)`,
the adapter that was in use before. Entries are ordered by `installed_at`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedclip.sdk.errors import StateError

STATE_FILE = "state.json"
STATE_FORMAT = 1
SOURCES = ("task", "rollout", "adapter")
SERVING = ("rollout", "adapter")  # the sources that may reach inference (a task's adapter never does)
PERSONAL = "+personal"  # inference's name for an entry's personal copy: "<version>+personal"


def read_record(root: str | Path) -> dict[str, Any]:
    """The whole state record of an agent state dir, read-only; StateError with one line if none."""
    path = Path(root) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StateError(f"{root}: not an agent state dir (no {STATE_FILE})") from None
    except OSError as e:
        raise StateError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError:
        raise StateError(f"{path}: not valid JSON (was it edited by hand?)") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise StateError(
            f"{path}: state format {data.get('format') if isinstance(data, dict) else None!r} "
            f"is not supported (expected {STATE_FORMAT})"
        )
    return data


@dataclass(frozen=True)
class LedgerEntry:
    version: str
    file: Path  # absolute
    source: str  # one of SOURCES
    round_id: int  # the round it belongs to (-1: none)
    rollout: int = 0  # the rollout that installed it (0: none)
    installed_at: float = 0.0
    rolled_back_at: float = 0.0  # when its rollout was rolled back on this device (0: never)
    personal: Path | None = None  # this device's tuned copy of it (absolute), if one was made
    fallback: Path | None = None  # the fleet's adapter delivered with it (absolute), if one was
    fallback_version: str = ""  # that adapter's version ("": none)

    @property
    def served(self) -> tuple[str, Path]:
        """(the name inference reports, the file it loads): the personal copy when it is there."""
        if self.personal is not None and self.personal.is_file():
            return self.version + PERSONAL, self.personal
        return self.version, self.file

    @property
    def fallback_kept(self) -> tuple[str, Path] | None:
        """(version, file) of its fallback where the file is there: what inference's open-set gate
        uses, the agent's status and `fedclip-agent status` name; None: none."""
        if self.fallback is not None and self.fallback.is_file():
            return self.fallback_version, self.fallback
        return None

    @property
    def usable(self) -> bool:
        """Inference may go back to it: kept for inference, never rolled back, its file there."""
        return self.source in SERVING and not self.rolled_back_at and self.file.is_file()


@dataclass(frozen=True)
class Ledger:
    bundle_id: str
    current: str | None  # the version inference uses (None: the bundle's own adapter)
    entries: tuple[LedgerEntry, ...]  # oldest first

    @classmethod
    def read(cls, state_dir: str | Path) -> Ledger:
        """The ledger of an agent state dir; StateError with one line when there is none."""
        root = Path(state_dir)
        return cls.from_record(root, read_record(root))

    @classmethod
    def from_record(cls, root: Path, record: dict[str, Any]) -> Ledger:
        """The ledger of a state record already read (the writer, `AgentState`, holds one)."""
        entries = [
            LedgerEntry(
                version=version,
                file=root / e["file"],
                source=str(e.get("source", "")),
                round_id=int(e.get("round", -1)),
                rollout=int(e.get("rollout", 0) or 0),
                installed_at=float(e.get("installed_at", 0.0)),
                rolled_back_at=float(e.get("rolled_back_at", 0.0)),
                personal=_side_file(root, e.get("personal")),
                fallback=_side_file(root, e.get("fallback")),
                fallback_version=_side_version(e.get("fallback")),
            )
            for version, e in record.get("adapters", {}).items()
        ]
        entries.sort(key=lambda e: e.installed_at)
        return cls(str(record.get("bundle_id") or ""), record.get("current_adapter"), tuple(entries))

    def entry(self, version: str | None) -> LedgerEntry | None:
        return next((e for e in self.entries if e.version == version), None) if version else None

    def in_use(self) -> LedgerEntry | None:
        """The entry inference uses now, if its file is there."""
        e = self.entry(self.current)
        return e if e is not None and e.file.is_file() else None

    def of_rollout(self, rollout: int) -> tuple[LedgerEntry, ...]:
        """The entries rollout `rollout` installed (normally one; none for 0)."""
        return tuple(e for e in self.entries if rollout and e.rollout == rollout)

    def previous(self, version: str | None) -> LedgerEntry | None:
        """What inference used before `version`: the newest usable entry installed before it (None:
        the bundle's own adapter). Rollbacks go there; rolled-back entries are skipped."""
        this = self.entry(version)
        if this is None:
            return None
        before = [e for e in self.entries if e.installed_at < this.installed_at and e.usable]
        return before[-1] if before else None

    def after_rounds(self, rollout_round: int | None = None) -> dict[int, Path]:
        """round r -> the adapter file this device had after round r: a task's starting adapter of
        round r + 1 is the fleet's model after round r; a rollout of `rollout_round`'s version is the
        model after that round (unless it was rolled back). The latest entry of a round wins."""
        found: dict[int, Path] = {}
        for e in self.entries:  # oldest first: later entries overwrite
            if not e.file.is_file():
                continue
            if e.source == "task" and e.round_id >= 1:
                found[e.round_id - 1] = e.file
            elif e.source == "rollout" and rollout_round is not None and not e.rolled_back_at:
                found[rollout_round] = e.file
        return dict(sorted(found.items()))


@dataclass(frozen=True)
class Installed:
    """What an agent serves inference with, from one read of its ledger."""

    bundle_id: str
    version: str | None  # None: the bundle's own adapter; `<version>+personal`: the tuned copy
    file: Path | None
    fallback: Path | None = None  # where an open-set gate sends unfamiliar images (None: the base)


def installed(state_dir: str | Path) -> Installed:
    """Read-only, and the only place the `Classifier` learns what to serve from: the agent's ledger,
    whose in-use entry only signed rollouts (and `--adapter` installs) change; with personal tuning on
    (`device_agent.personal`), that entry's copy tuned on the device, as `<version>+personal`; with
    the entry's fallback when its rollout delivered one and the file is there."""
    ledger = Ledger.read(state_dir)
    entry = ledger.entry(ledger.current)
    if entry is None:
        return Installed(ledger.bundle_id, None, None)
    version, file = entry.served
    kept = entry.fallback_kept
    return Installed(ledger.bundle_id, version, file, kept[1] if kept else None)


def installed_adapter(state_dir: str | Path) -> tuple[str, str | None, Path | None]:
    """(bundle id, adapter version or None, its file or None): `installed`, without the fallback."""
    now = installed(state_dir)
    return now.bundle_id, now.version, now.file


def state_stamp(state_dir: Path) -> tuple[int, int] | None:
    """Changes whenever the agent replaces its state file: what the `Classifier`'s watcher polls
    before it reads the ledger again."""
    return file_stamp(state_dir / STATE_FILE)


def file_stamp(path: Path | None) -> tuple[int, int] | None:
    """Changes whenever the agent replaces the file (atomic replace: a new inode); None: no file."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _side_version(side: Any) -> str:
    return str(side.get("version") or "") if isinstance(side, dict) else ""


def _side_file(root: Path, side: Any) -> Path | None:
    """An entry's `personal` or `fallback` file: `{"file": <relative path>, ...}`."""
    if isinstance(side, dict) and isinstance(side.get("file"), str):
        return root / side["file"]
    return None
