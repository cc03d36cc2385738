"""`AgentConfig`: what `fedclip-agent start` needs, from `agent.yaml` and/or flags (flags win)."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedclip.device_agent.personal import PersonalTuning
from fedclip.device_agent.policy import TaskPolicy
from fedclip.sdk.config import from_mapping, from_yaml
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.ids import check_id
from fedclip.sdk.mqtt_address import parse_broker_urls
from fedclip.sdk.signing import Ed25519PrivateKey, Ed25519PublicKey, load_private_key, load_public_key
from fedclip.sdk.wire import DEFAULT_MAX_PAYLOAD

BUNDLE_URL_SCHEMES = ("http://", "https://", "file://")


@functools.lru_cache(maxsize=4)
def _load_device_key(path: Path) -> Ed25519PrivateKey:
    return load_private_key(path)


@functools.lru_cache(maxsize=4)
def _load_public_key(path: Path) -> Ed25519PublicKey:
    return load_public_key(path)


@dataclass(frozen=True)
class AgentConfig:
    broker: str  # mqtt://host:port or mqtts://host:port; a cluster: URLs comma-separated (failover)
    fleet: str
    id: str  # agent id; also the fixed MQTT client id
    bundle: str | Path  # a bundle folder, or an http(s):// / file:// URL fetched into <state>/bundles
    data: Path
    state: Path
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None  # keeps the secret out of agent.yaml and `ps`
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # The coordinator's Ed25519 public key: adapters pushed for inference must be signed with it
    # (signed rollouts, rollback and pin). Without it, the agent ignores agents/<id>/adapter, so whoever
    # can publish on the broker cannot push an adapter to the fleet.
    coordinator_key: Path | None = None
    # Closed test setups only: without coordinator_key, install unsigned adapters pushed on
    # agents/<id>/adapter (validated against the bundle).
    accept_unsigned_adapters: bool = False
    # This device's own Ed25519 private key (from its provisioning kit): it signs the agent's status,
    # updates and acks, and a provisioned coordinator counts nothing unsigned.
    device_key: Path | None = None
    # The device's own limits on what a task may ask (device_agent.policy.TaskPolicy)
    policy: TaskPolicy = TaskPolicy()
    # Personal tuning (device_agent.personal): inference serves the fleet's adapter tuned on this
    # device's images and held near it (`personal: {mu: 1.5}`); off by default (mu 0)
    personal: PersonalTuning = PersonalTuning()
    keepalive: int = 30
    # The retained status goes out again 5, 10, 20, ... s after each connect, then every this many
    # seconds: a status a broker lost (or a coordinator missed) heals by itself. 0: only on change.
    status_interval: float = 300.0
    groups: tuple[str, ...] = ()  # reported in the status so the coordinator can select by group
    # auto: CUDA where the installed onnxruntime has it, else the CPU (ort_loader.choose_providers)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Training backend: step (the bundle's portable step graph, any onnxruntime), ort-training (ONNX
    # Runtime's training API), auto (ort-training when installed and the bundle has its artifacts).
    backend: Literal["auto", "step", "ort-training"] = "auto"
    threads: int = 0  # ORT intra-op threads; 0 = ORT's default
    holdout: float = 0.2  # share of the local data kept for before/after evaluation
    eval_batch_size: int = 64
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    connect_timeout: float = 10.0  # per attempt; attempts repeat with backoff until stopped
    publish_timeout: float = 30.0
    progress: bool = False  # rich progress bars while training (off for services)

    def __post_init__(self) -> None:
        if not self.bundle_url:  # a folder: a Path, so it is resolved relative to agent.yaml
            object.__setattr__(self, "bundle", Path(self.bundle))
        check_id(self.fleet, "fleet")
        check_id(self.id, "id")
        parse_broker_urls(self.broker)  # one URL, or the nodes of a cluster, comma-separated
        for g in self.groups:
            check_id(g, "groups")
        if self.keepalive < 5:
            raise ConfigError(f"keepalive: must be >= 5 seconds, got {self.keepalive}")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"holdout: must be between 0 and 1, got {self.holdout}")
        if not 0 <= self.status_interval < math.inf:  # NaN fails too
            raise ConfigError(f"status_interval: must be >= 0 seconds and finite, got {self.status_interval}")
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0, got {self.threads}")
        if self.eval_batch_size <= 0:
            raise ConfigError(f"eval_batch_size: must be > 0, got {self.eval_batch_size}")
        if self.max_payload_bytes < 1024:
            raise ConfigError(f"max_payload_bytes: must be >= 1024, got {self.max_payload_bytes}")
        if self.connect_timeout <= 0 or self.publish_timeout <= 0:
            raise ConfigError("connect_timeout, publish_timeout: must be > 0")
        if self.password is not None and self.password_file is not None:
            raise ConfigError("password, password_file: give one, not both")
        if self.personal.enabled and self.backend == "ort-training":
            raise ConfigError(
                "personal.mu: personal tuning needs the step backend (ORT's training artifacts fix the "
                "loss at export); use backend: step or auto"
            )

    @property
    def training_backend(self) -> Literal["auto", "step", "ort-training"]:
        """The backend the agent trains with: `backend`, except that personal tuning turns auto into
        step (only the step graph has the proximal term)."""
        return "step" if self.personal.enabled and self.backend == "auto" else self.backend

    def signing_key(self) -> Ed25519PrivateKey | None:
        """The device key (read once per path), or None when the agent has none."""
        return _load_device_key(self.device_key) if self.device_key is not None else None

    def coordinator_public_key(self) -> Ed25519PublicKey | None:
        """The coordinator's public key (read once per path), or None when none is configured."""
        return _load_public_key(self.coordinator_key) if self.coordinator_key is not None else None

    @property
    def bundle_url(self) -> str | None:
        """`bundle` when it names a bundle to download rather than a local folder."""
        value = str(self.bundle) if isinstance(self.bundle, str) else ""
        return value if value.startswith(BUNDLE_URL_SCHEMES) else None

    def secret(self) -> str | None:
        """The broker password, read from `password_file` when given."""
        if self.password_file is None:
            return self.password
        try:
            return self.password_file.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"password_file: cannot read {self.password_file} ({e.strerror or e})"
            ) from None

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any]) -> AgentConfig:
        """From `path` (YAML) with `overrides` (flags that were given) on top; flags alone without a file."""
        given = {k: v for k, v in overrides.items() if v is not None and v != ()}
        if path is not None:
            cfg = from_yaml(cls, path, given)
            where = Path(path).parent
        else:
            try:
                cfg = from_mapping(cls, given, where="flags")
            except ConfigError as e:  # name the flag, not the dataclass field
                raise ConfigError(str(e).replace("flags.", "--", 1)) from None
            where = None
        return cfg._relative_to(where, skip=set(given)) if where is not None else cfg

    def _relative_to(self, base: Path, skip: set[str]) -> AgentConfig:
        """Paths in agent.yaml are relative to the file, so a config moves with its folder; flags are
        relative to the working directory."""
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in skip and isinstance(value, Path) and not value.is_absolute():
                changes[f.name] = base / value
        return dataclasses.replace(self, **changes)
