"""`fedclip-coord serve` settings: one frozen dataclass, from YAML and/or flags (flags win)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from fedclip.coordinator.strategies.base import StrategyOptions
from fedclip.sdk.config import from_mapping, from_yaml
from fedclip.sdk.errors import ConfigError, WireError
from fedclip.sdk.ids import check_id
from fedclip.sdk.label_prior import AUTO, resolve
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.messages import Hyperparameters


def read_secret(path: Path, what: str) -> str:
    """The first line of a secret file; refused when others may read it (chmod 600 fixes it)."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path} ({e.strerror or e})") from None
    if mode & 0o007:
        raise ConfigError(f"{what}: {path} is readable by every user; chmod 600 it")
    secret = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise ConfigError(f"{what}: {path} is empty")
    return secret


@dataclass(frozen=True)
class CoordConfig:
    broker: str
    fleet: str
    bundle: Path
    state: Path
    strategy: str = "fedavg"
    rounds: int = 1  # aggregated rounds to run; failed rounds do not count
    clients_per_round: int = 0  # K; 0 = every compatible online agent
    selection: Literal["random", "all", "fair"] = "random"  # fair: least recently selected first
    seed: int = 0
    # Selection at scale (see coordinator.selection and docs/scale.md); the defaults change nothing.
    group_by: str = ""  # share K among agents' groups: first group label with this prefix ("" = off)
    group_quota: Literal["proportional", "equal"] = "proportional"
    max_status_age: float = 0.0  # s; an agent not heard from for longer is not selected (0 = off)
    max_missed: int = 0  # an agent that left this many tasks in a row unanswered waits (0 = off)
    min_updates: int = 1  # quorum Q: updates needed to aggregate, and online agents needed to start
    round_timeout: float = 600.0  # seconds; the deadline is extended once by as much below quorum
    # training defaults live once, in the task message's class
    local_epochs: int = Hyperparameters.epochs
    lr: float = Hyperparameters.lr
    batch_size: int = Hyperparameters.batch_size
    max_steps: int = 0  # 0 = no limit
    # Agents start each round's AdamW afresh (moments and step count). Kept, the moments of an agent's
    # last round point back toward its own last adapter, not the round's start: through the real
    # path that cost fleet-lora 3 to 4.5 points of own accuracy (benchmarks/results/fmnist_fl.md,
    # session 15). False keeps them (the behaviour before).
    reset_optimizer: bool = True
    # "balanced-softmax": agents train CE(logits + log prior) and add their prior back at inference
    # (docs/aggregation.md); needs a classify bundle of manifest format 2. "auto": balanced softmax
    # where the bundle can train it, else ce (`sdk.label_prior.resolve`, when the server starts)
    loss: Literal["auto", "ce", "balanced-softmax"] = AUTO
    noise_std: float = 0.0  # noise the agents add to their shared statistics
    lam: float = 0.5
    tau: float = 0.1
    trim_fraction: float = 0.1
    neighbours: int = 32  # ce-lora: each agent's weights over its k nearest agents; 0 = all agents
    # Data statistics (ce-lora) travel once per agent and data; N > 0 asks for them again when the
    # held ones are N or more rounds old. 0: only when the agent's data digest changes.
    stats_refresh_rounds: int = 0
    max_update_norm: float = 0.0  # L2 bound on (update - start) over all tensors; 0 = no bound
    # Robust aggregation, on by default: from 3 updates on, an update's sample count is capped at this
    # factor times the round's median and its delta clipped to this factor times the median norm; 0: off
    robust_factor: float = 10.0
    norm_action: Literal["clip", "reject"] = "reject"
    max_payload_mb: float = 64.0
    client_id: str = ""  # default: fedclip-coord-<fleet>
    username: str | None = None
    password: str | None = None
    password_file: str | None = None  # keeps the broker password out of the YAML, the URL and `ps`
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    publish_timeout: float = 30.0
    # Group commit of updates: a batch is flushed (one fsync wave, one transaction) and acknowledged
    # at this many messages, or when its first has waited `intake_wait` s, or when none are queued.
    intake_batch: int = 256
    intake_wait: float = 0.2
    # Processes that decode updates, check their signatures and store them ahead of the round loop
    # (coordinator/intake_decode.py; 0: all in the loop; unset: one per CPU up to 4, none on one
    # CPU). They start with the first batch of 16+ updates.
    intake_workers: int | None = None
    http: bool = True  # serve the bundle (and large adapters) over HTTP next to MQTT
    http_host: str = "127.0.0.1"  # a fleet usually reaches it through a VPN or a reverse proxy
    http_port: int = 0  # 0: a free port (logged, and in the coordinator's retained status)
    # The operator's endpoint (`/metrics` and the read-only dashboard): off unless a port is given.
    ops_port: int | None = None  # 0: a free port (logged)
    ops_host: str = "127.0.0.1"
    ops_auth_file: str | None = None  # "user:password" on its first line: basic auth on every route

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet")
        if self.client_id:
            check_id(self.client_id, "client_id")
        for name in ("rounds", "min_updates", "local_epochs", "batch_size", "intake_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        try:  # the bounds every agent applies to a task: refuse here, not when the first task is built
            self._hyperparameters("ce" if self.loss == AUTO else self.loss)
        except WireError as e:
            raise ConfigError(str(e).replace("hyperparameters: hyperparameters: body field ", "")) from None
        if self.intake_workers is not None and not 0 <= self.intake_workers <= 64:
            raise ConfigError(f"intake_workers: must be in [0, 64], got {self.intake_workers}")
        for name in ("round_timeout", "lr", "max_payload_mb", "publish_timeout", "intake_wait"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("http_port", "ops_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"{name}: must be 0..65535, got {port}")
        for name in (
            "max_steps",
            "noise_std",
            "max_update_norm",
            "robust_factor",
            "clients_per_round",
            "stats_refresh_rounds",
            "max_status_age",
            "max_missed",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.password is not None and self.password_file is not None:
            raise ConfigError("password, password_file: give one, not both")
        if self.clients_per_round and self.clients_per_round < self.min_updates:
            raise ConfigError(
                f"clients_per_round: {self.clients_per_round} is below min_updates {self.min_updates}; "
                "no round could ever reach its quorum"
            )
        from fedclip.coordinator import strategies

        strategies.get(self.strategy)  # unknown names fail here, naming the known ones
        self.strategy_options()

    def with_secret(self) -> CoordConfig:
        """This config with `password` read from `password_file`, which must not be world-readable."""
        if self.password_file is None:
            return self
        return replace(
            self, password=read_secret(Path(self.password_file), "password_file"), password_file=None
        )

    @property
    def mqtt_client_id(self) -> str:
        return self.client_id or f"fedclip-coord-{self.fleet}"

    @property
    def max_payload_bytes(self) -> int:
        return int(self.max_payload_mb * 1024 * 1024)

    def hyperparameters(self) -> Hyperparameters:
        """A task's hyperparameters; `loss: auto` must have been resolved against the bundle first
        (`with_loss_for`): a task never says auto."""
        if self.loss == AUTO:
            raise ConfigError("loss: auto is resolved against the bundle when the server starts")
        return self._hyperparameters(self.loss)

    def _hyperparameters(self, loss: str) -> Hyperparameters:
        return Hyperparameters(self.local_epochs, self.lr, self.batch_size, self.max_steps or None, loss=loss)

    def with_loss_for(self, manifest: Manifest) -> CoordConfig:
        """This config with `loss: auto` resolved for `manifest`'s bundle (`sdk.label_prior.resolve`)."""
        balanced = resolve(self.loss, manifest) == "balanced-softmax"  # resolve never gives auto back
        return replace(self, loss="balanced-softmax" if balanced else "ce")

    def strategy_options(self) -> StrategyOptions:
        return StrategyOptions(
            self.clients_per_round,
            # "fair" is the coordinator's own selector (coordinator.selection); the strategy's
            # `select` only ever runs for random and all
            "random" if self.selection == "fair" else self.selection,
            self.seed,
            self.lam,
            self.tau,
            self.trim_fraction,
            self.neighbours,
        )

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any]) -> CoordConfig:
        """From `path` (YAML) with `overrides` (flags that were given) on top, or from flags alone."""
        if path is not None:
            return from_yaml(cls, path, overrides)
        return from_mapping(cls, {k: v for k, v in overrides.items() if v is not None}, where="flags")
