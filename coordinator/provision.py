"""Provisioning: a fleet's identities, made once in the coordinator's state (NVIDIA FLARE's startup kits).

`Provisioner.init` makes the fleet's keys: the coordinator's Ed25519 signing key (the one rollouts
already use, `<state>/keys`), a fleet CA, a broker server certificate and the coordinator's broker
login. `add` makes one device's startup kit (its own Ed25519 key pair, broker login, optional TLS
client certificate, the coordinator's public key, the CA and a ready `agent.yaml`) and enrols the
device's public key in the registry (`enrolment.py`). `revoke` marks a device revoked and rewrites
the broker files it made before, so its login disappears at the broker's next reload. `broker` writes
the broker's config (mosquitto or amqtt) from the registry.

State layout (under the coordinator's `--state`):
    keys/coordinator_ed25519.pem     coordinator signing key (0600), shared with rollouts
    enrolment.sqlite                 the registry: devices, public keys, groups, login hashes
    provision/fleet.json             fleet name, broker URL, bundle, hosts, broker outputs written
    provision/ca.crt, ca.key         the fleet CA (key 0600)
    provision/server.crt, server.key the broker's certificate
    provision/coordinator.password   the coordinator's broker password (0600; `serve --password-file`)
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from fedclip.coordinator.enrolment import Device, Enrolment
from fedclip.coordinator.pki import CertificateAuthority, make_ca
from fedclip.coordinator.rollout import KEY_DIR
from fedclip.coordinator.store import DB_NAME as STORE_DB
from fedclip.coordinator.store import Store
from fedclip.sdk.broker_acl import COORDINATOR_USER, Login, mosquitto_hash, new_password
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.fsutil import atomic_write, remove
from fedclip.sdk.ids import check_id
from fedclip.sdk.mqtt_address import BrokerAddress
from fedclip.sdk.signing import (
    PUBLIC_KEY_NAME,
    ensure_keypair,
    generate_key,
    save_private_key,
    save_public_key,
)

PROVISION_DIR = "provision"
COORDINATOR_PASSWORD = "coordinator.password"
DEVICE_KEY = "device_ed25519.pem"
DEVICE_PUBLIC_KEY = "device_ed25519.pub.pem"
KIT_PASSWORD = "broker.password"


@dataclass
class FleetSettings:
    """`provision/fleet.json`: what every kit and broker config of the fleet is made from."""

    fleet: str
    broker: str  # the URL devices use
    hosts: list[str]  # names and addresses on the broker's certificate
    bundle: str = "bundle"  # what a kit's agent.yaml points `bundle` at (folder or URL)
    created_at: float = 0.0
    # Broker configs written so far ({kind, out, options}); revoke rewrites each.
    broker_outputs: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Kit:
    agent: str
    path: Path  # the folder or the tarball
    files: tuple[str, ...]


class Provisioner:
    """The provisioning of one coordinator state dir; `init` first, then `open`."""

    def __init__(self, state: Path, settings: FleetSettings, registry: Enrolment):
        self.state = state
        self.settings = settings
        self.registry = registry

    # ---- paths ---------------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return self.state / PROVISION_DIR

    @property
    def coordinator_password_file(self) -> Path:
        return self.dir / COORDINATOR_PASSWORD

    @property
    def coordinator_public_key(self) -> Path:
        return self.state / KEY_DIR / PUBLIC_KEY_NAME

    def ca(self) -> CertificateAuthority:
        return CertificateAuthority(self.dir / "ca.crt", self.dir / "ca.key")

    # ---- init / open ---------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        state: str | Path,
        fleet: str,
        *,
        broker: str = "mqtt://127.0.0.1:1883",
        hosts: list[str] | None = None,
        bundle: str = "bundle",
    ) -> Provisioner:
        """Make what is missing; keeps existing keys, so running it again changes nothing but
        the settings given (and reissues the broker certificate for new hosts)."""
        state = Path(state)
        check_id(fleet, "--fleet")
        addr = BrokerAddress.parse(broker)
        hosts = list(dict.fromkeys(hosts or [addr.host, "127.0.0.1", "localhost"]))
        registry = Enrolment.create(state, fleet)
        ensure_keypair(state / KEY_DIR)
        pdir = state / PROVISION_DIR
        if not (pdir / "ca.crt").is_file():
            make_ca(fleet).write(pdir / "ca.crt", pdir / "ca.key")
        old = _read_settings(pdir)
        settings = FleetSettings(fleet, broker, hosts, bundle, old.created_at if old else time.time())
        if old is not None:
            settings.broker_outputs = old.broker_outputs
        self = cls(state, settings, registry)
        if old is None or old.hosts != hosts or not (pdir / "server.crt").is_file():
            self.ca().server(hosts).write(pdir / "server.crt", pdir / "server.key")
        if not self.coordinator_password_file.is_file() or registry.coordinator_login() is None:
            password = new_password()
            registry.set_coordinator_login(_login(COORDINATOR_USER, password, agent=None))
            atomic_write(self.coordinator_password_file, password.encode() + b"\n", mode=0o600)
        self._save_settings()
        self.write_brokers()  # a new coordinator login or broker certificate reaches the broker files
        return self

    @classmethod
    def open(cls, state: str | Path) -> Provisioner:
        state = Path(state)
        settings = _read_settings(state / PROVISION_DIR)
        if settings is None:
            raise ConfigError(f"{state}: the fleet is not provisioned; run `fedclip-coord provision init`")
        return cls(state, settings, Enrolment.load(state))

    def _save_settings(self) -> None:
        data = json.dumps(asdict(self.settings), indent=1, sort_keys=True).encode()
        atomic_write(self.dir / "fleet.json", data, mode=0o644)

    # ---- devices -------------------------------------------------------------------------------
    def add(
        self,
        agent_id: str,
        *,
        groups: tuple[str, ...] = (),
        tls: bool = False,
        out: Path | None = None,
        tar: Path | None = None,
        broker: str | None = None,
        bundle: str | None = None,
        force: bool = False,
        rewrite_brokers: bool = True,
    ) -> Kit:
        """Make `agent_id`'s startup kit (a folder `out` or a tarball `tar`) and enrol its public key.

        An id enrolled before (revoked or not) is re-issued only with `force`: a new key pair and
        login replace the old ones, so the old kit stops working (rotation). The broker files written
        before are rewritten with the new login, unless `rewrite_brokers` is False (a batch of adds
        calls `write_brokers` once at the end: each rewrite costs time in the fleet's size)."""
        check_id(agent_id, "agent id")
        for g in groups:
            check_id(g, "--group")
        if (out is None) == (tar is None):
            raise ConfigError("provision add: give --out DIR or --tar FILE")
        target = Path(out if out is not None else tar)  # type: ignore[arg-type]  # one of them is given (checked above)
        if target.exists() and not force:
            raise ConfigError(f"provision add: {target} exists (--force replaces it)")
        old = self.registry.device(agent_id)
        if old is not None and not force:
            state = "revoked" if old.revoked else "enrolled"
            raise ConfigError(f"provision add: {agent_id} is already {state} (--force issues a new kit)")
        url = broker or self.settings.broker
        addr = BrokerAddress.parse(url)
        if tls and not addr.tls:
            raise ConfigError(f"provision add --tls: the broker URL {url} is not mqtts://")

        key = generate_key()
        password = new_password()
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built next to the target and moved in at the end: a kit is never seen half-written.
        with tempfile.TemporaryDirectory(prefix=".kit-", dir=target.parent) as tmp:
            kit = Path(tmp) / agent_id
            kit.mkdir(mode=0o700)
            save_private_key(key, kit / DEVICE_KEY)
            save_public_key(key, kit / DEVICE_PUBLIC_KEY)
            atomic_write(kit / KIT_PASSWORD, password.encode() + b"\n", mode=0o600)
            shutil.copyfile(self.coordinator_public_key, kit / PUBLIC_KEY_NAME)
            atomic_write(kit / "ca.crt", (self.dir / "ca.crt").read_bytes(), mode=0o644)
            serial = None
            if tls:
                pair = self.ca().client(agent_id)
                pair.write(kit / "client.crt", kit / "client.key")
                serial = _serial(pair.cert_pem)
            config = self._agent_yaml(agent_id, url, addr.tls, tls, groups, bundle or self.settings.bundle)
            atomic_write(kit / "agent.yaml", config.encode(), mode=0o644)
            files = tuple(sorted(p.name for p in kit.iterdir()))
            remove(target)
            if tar is not None:
                _write_tar(kit, target)
            else:
                kit.rename(target)
        raw = key.public_key().public_bytes_raw()
        login = _login(agent_id, password, agent=agent_id)
        self.registry.enrol(Device(agent_id, raw, tuple(groups), login.mosquitto, serial, time.time()))
        if old is not None and (self.state / STORE_DB).is_file():
            # A new key: the data statistics held under the old one are not trusted to describe this
            # device any more; the next task asks for them again.
            with Store(self.state) as store:
                store.forget_stats(agent_id)
        if rewrite_brokers:
            self.write_brokers()  # the new login works, and a re-issued kit's old one stops
        return Kit(agent_id, target, files)

    def _agent_yaml(
        self,
        agent_id: str,
        url: str,
        server_tls: bool,
        client_tls: bool,
        groups: tuple[str, ...],
        bundle: str,
    ) -> str:
        # Paths are relative: AgentConfig resolves them against agent.yaml's folder, so the kit
        # works wherever it is unpacked.
        cfg: dict = {
            "broker": url,
            "fleet": self.settings.fleet,
            "id": agent_id,
            "bundle": bundle,
            "data": "data",
            "state": "state",
            "username": agent_id,
            "password_file": KIT_PASSWORD,
            "coordinator_key": PUBLIC_KEY_NAME,
            "device_key": DEVICE_KEY,  # signs the agent's status, updates and acks
        }
        if server_tls:
            cfg["ca_file"] = "ca.crt"
        if client_tls:
            cfg["cert_file"], cfg["key_file"] = "client.crt", "client.key"
        if groups:
            cfg["groups"] = list(groups)
        head = (
            f"# fedclip startup kit for {agent_id} (fleet {self.settings.fleet}).\n"
            "# Private: device_ed25519.pem, broker.password and client.key are this device's secrets.\n"
            "# Set data: to the device's dataset folder; start with `fedclip-agent start -c agent.yaml`.\n"
        )
        return head + yaml.safe_dump(cfg, sort_keys=False)

    def revoke(self, agent_id: str, reason: str = "") -> tuple[Device, list[Path]]:
        """Refuse `agent_id` from now on; rewrite the broker files so its login is gone.
        Returns the record and the broker files rewritten (reload the broker to apply them)."""
        dev = self.registry.revoke(agent_id, reason)
        return dev, self.write_brokers()

    # ---- broker configs ------------------------------------------------------------------------
    def embedded_broker(self, port: int | None = None):
        """The embedded amqtt broker with the fleet's logins and ACL; its `url` carries the
        coordinator's login. After a revoke: `broker.reload(self.registry.broker_acl())`."""
        from fedclip.sdk.broker_embedded import EmbeddedBroker

        password = self.coordinator_password_file.read_text().strip()
        return EmbeddedBroker(port, COORDINATOR_USER, password, acl=self.registry.broker_acl())

    def write_broker(self, kind: str, out: Path, **options) -> list[Path]:
        from fedclip.coordinator.broker_files import write_broker_files

        files = write_broker_files(self, kind, Path(out), **options)
        entry = {"kind": kind, "out": str(Path(out).resolve()), "options": options}
        self.settings.broker_outputs = [
            e for e in self.settings.broker_outputs if (e["kind"], e["out"]) != (kind, entry["out"])
        ] + [entry]
        self._save_settings()
        return files

    def write_brokers(self) -> list[Path]:
        """Rewrite every broker config written before (after a revoke or a re-issued kit)."""
        from fedclip.coordinator.broker_files import write_broker_files

        files: list[Path] = []
        for e in self.settings.broker_outputs:
            files += write_broker_files(self, e["kind"], Path(e["out"]), **e["options"])
        return files


def _login(username: str, password: str, agent: str | None) -> Login:
    return Login(username, mosquitto_hash(password), agent=agent)


def _read_settings(pdir: Path) -> FleetSettings | None:
    path = pdir / "fleet.json"
    if not path.is_file():
        return None
    try:
        return FleetSettings(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable fleet settings ({e})") from None


def _serial(cert_pem: bytes) -> str:
    from cryptography import x509

    return format(x509.load_pem_x509_certificate(cert_pem).serial_number, "x")


def _write_tar(kit: Path, target: Path) -> None:
    # The tarball holds the private key: 0600 from creation, members keep their modes.
    tmp = target.with_name(f".{target.name}.tmp")
    remove(tmp)
    tmp.touch(mode=0o600)
    with tarfile.open(tmp, "w:gz") as tf:
        tf.add(kit, arcname=kit.name)
    tmp.replace(target)


__all__ = ["FleetSettings", "Kit", "Provisioner"]
