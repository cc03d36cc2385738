"""Provisioned simulated fleets: startup kits made once with `Provisioner` and reused between runs.

A run of `fleet_sim.py` or `bench_intake.py` puts the coordinator in a provisioned state dir (the
fleet's enrolment registry, the coordinator's signing key and broker login) and mosquitto on the
config `provision broker` writes (every agent's own login, the topic ACL); each simulated agent
signs its statuses and updates with the key of its kit and logs in with the kit's password, exactly
as `fedclip-agent start -c <kit>/agent.yaml` would. Making a kit costs ~0.1 s (a key pair, files
written durably, a registry row), so the kits of a fleet are made once in a cache folder (`--kits`)
and a run copies the provisioned state from there.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from fedclip.coordinator.enrolment import DB_NAME as ENROLMENT_DB
from fedclip.coordinator.provision import (
    COORDINATOR_PASSWORD,
    COORDINATOR_USER,
    DEVICE_KEY,
    KIT_PASSWORD,
    PROVISION_DIR,
    Provisioner,
)
from fedclip.coordinator.rollout import KEY_DIR
from fedclip.coordinator.store import DB_NAME as STORE_DB
from fedclip.sdk.broker_mosquitto import MosquittoBroker
from fedclip.sdk.broker_ports import free_port
from fedclip.sdk.signing import Ed25519PrivateKey, load_private_key

# What of a provisioned state dir a run copies: the registry, the keys, the CA and settings.
_STATE_PARTS = (ENROLMENT_DB, KEY_DIR, PROVISION_DIR)


@dataclass
class Credentials:
    """Each simulated agent's signing key and broker password, from its kit."""

    keys: dict[str, Ed25519PrivateKey]
    passwords: dict[str, str]


def provision(cache: Path, fleet: str, ids: list[str], say=print) -> Path:
    """Kits for `ids` under `cache/kits` and the provisioned state in `cache/state` (made for
    the ids missing so far); returns `cache`."""
    state = cache / "state"
    prov = Provisioner.open(state) if (state / PROVISION_DIR).is_dir() else Provisioner.init(state, fleet)
    if prov.settings.fleet != fleet:
        raise SystemExit(f"{cache}: kits of fleet {prov.settings.fleet!r}, not {fleet!r}")
    have = set(prov.registry.enrolled())
    todo = [a for a in ids if a not in have]
    for k, agent in enumerate(todo, 1):
        prov.add(agent, out=cache / "kits" / agent, force=True, rewrite_brokers=False)
        if k % 500 == 0 or k == len(todo):
            say(f"  provisioned {k} of {len(todo)} kits")
    prov.registry.close()
    return cache


def install(cache: Path, state: Path) -> None:
    """Copy the provisioned state of `cache` into a fresh coordinator state dir `state`."""
    if (state / STORE_DB).exists():
        raise SystemExit(f"{state}: not a fresh state dir")
    state.mkdir(parents=True, exist_ok=True)
    for part in _STATE_PARTS:
        src = cache / "state" / part
        if src.is_dir():
            shutil.copytree(src, state / part)
        else:
            shutil.copy2(src, state / part)


def credentials(cache: Path, ids: list[str]) -> Credentials:
    kits = cache / "kits"
    return Credentials(
        {a: load_private_key(kits / a / DEVICE_KEY) for a in ids},
        {a: (kits / a / KIT_PASSWORD).read_text().strip() for a in ids},
    )


def broker(state: Path, work: Path, extra: str = "") -> MosquittoBroker:
    """A mosquitto (not started) on the fleet's generated config: logins and ACL from the registry
    in `state`; `extra` lines go into its main config."""
    port = free_port()
    prov = Provisioner.open(state)
    prov.write_broker("mosquitto", work / "broker", port=port)
    prov.registry.close()
    b = MosquittoBroker(port=port, include_dir=work / "broker" / "conf.d")
    conf = b.dir / "mosquitto.conf"
    conf.write_text(extra + conf.read_text())  # before include_dir, which mosquitto reads last
    return b


def coordinator_login(state: Path) -> dict[str, str]:
    """`username` and `password_file` settings of the coordinator's broker login."""
    return {"username": COORDINATOR_USER, "password_file": str(state / PROVISION_DIR / COORDINATOR_PASSWORD)}
