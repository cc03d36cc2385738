"""Who may log in to a fleet's broker and where each login may publish and subscribe.

One set of rules, rendered for each broker fedclip configures: mosquitto (`password_file` in its
PBKDF2-SHA512 `$7$` format and an `acl_file`) and the embedded amqtt (argon2 password file and its
`TopicAccessControlListPlugin` config). Provisioning writes both from the enrolment registry; the
embedded broker loads the amqtt form.

The rules (topics under `fedclip/<fleet>/`, `wire.Topics` names them):
- a device publishes only on its own `agents/<id>/{status,update,ack}`;
- a device reads only its own `agents/<id>/{task,adapter,command,pin}` and the fleet-wide
  `coordinator/status` and `rollout/#`;
- the coordinator login reads and writes everything under the fleet root, so only it can publish
  tasks, adapters and commands;
- anonymous clients get nothing (`allow_anonymous false`, no ACL lines).

Device logins are the agent ids; the coordinator's login contains a `.`, which no id may, so no
device can ever be enrolled under the coordinator's name.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from fedclip.sdk.errors import ConfigError
from fedclip.sdk.ids import check_id
from fedclip.sdk.wire import Topics

COORDINATOR_USER = "fedclip.coordinator"
DEVICE_PUBLISHES = ("status", "update", "ack")
DEVICE_READS = ("task", "adapter", "command", "pin")
# mosquitto_passwd's defaults (mosquitto >= 2.0): 12 bytes of salt, 101 rounds of PBKDF2-SHA512.
# The passwords are 128 random bits, so more rounds would add CONNECT cost and no security.
_MOSQ_ITERATIONS = 101
_MOSQ_SALT_BYTES = 12


def new_password() -> str:
    """A broker password: 128 random bits, URL-safe so it also fits in a broker URL."""
    return secrets.token_urlsafe(16)


def mosquitto_hash(password: str, *, salt: bytes | None = None, iterations: int = _MOSQ_ITERATIONS) -> str:
    """The `$7$` hash `mosquitto_passwd` writes (mosquitto >= 2.0), computed without the tool."""
    salt = salt if salt is not None else secrets.token_bytes(_MOSQ_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_verify(password: str, hashed: str) -> bool:
    """True when `hashed` (the part of a passwd line after `user:`) is `password`'s `$7$` hash."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    salt, want = base64.b64decode(parts[3]), parts[4]
    got = mosquitto_hash(password, salt=salt, iterations=int(parts[2])).split("$")[4]
    return hmac.compare_digest(got, want)


def argon2_hash(password: str) -> str:
    """The hash amqtt's FileAuthPlugin checks (pwdlib ships with amqtt). Cheap parameters: the
    password is 128 random bits, and the default costs ~0.5 s of CPU per CONNECT on a small board."""
    try:
        from pwdlib import PasswordHash
        from pwdlib.hashers.argon2 import Argon2Hasher
    except ImportError:
        raise ConfigError("argon2 hashes for the embedded broker need amqtt: pip install amqtt") from None
    hasher = Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1)
    return PasswordHash((hasher,)).hash(password)


@dataclass(frozen=True)
class Login:
    """One broker user: its name, the hashes of its password, and the device it is (None: coordinator)."""

    username: str
    mosquitto: str
    argon2: str | None = None
    agent: str | None = None


@dataclass(frozen=True)
class FleetAcl:
    """The users and topic rules of one fleet's broker."""

    fleet: str
    logins: tuple[Login, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet")
        names = [login.username for login in self.logins]
        if len(set(names)) != len(names):
            raise ConfigError("broker users: a user name appears twice")
        for login in self.logins:
            if login.agent is not None:
                check_id(login.agent, "agent id")
            elif login.username != COORDINATOR_USER:
                raise ConfigError(f"broker users: {login.username!r} is neither a device nor the coordinator")

    @property
    def topics(self) -> Topics:
        return Topics(self.fleet)

    # ---- the rules -----------------------------------------------------------------------------
    def publish_topics(self, login: Login) -> list[str]:
        t = self.topics
        if login.agent is None:
            return [t.root + "#"]
        return [t.agent(login.agent, kind) for kind in DEVICE_PUBLISHES]

    def read_topics(self, login: Login) -> list[str]:
        t = self.topics
        if login.agent is None:
            return [t.root + "#"]
        own = [t.agent(login.agent, kind) for kind in DEVICE_READS]
        return [*own, t.coordinator_status, t.rollout("#")]

    # ---- mosquitto ----------------------------------------------------------------------------
    def mosquitto_passwd(self) -> str:
        return "".join(f"{login.username}:{login.mosquitto}\n" for login in self.logins)

    def mosquitto_acl(self) -> str:
        """mosquitto's `acl_file`: no lines for anonymous, so an anonymous client gets nothing."""
        out = [f"# fedclip fleet {self.fleet}: generated by `fedclip-coord provision broker`; do not edit\n"]
        for login in self.logins:
            out.append(f"\nuser {login.username}\n")
            pub, read = self.publish_topics(login), self.read_topics(login)
            for topic in pub:
                out.append(f"topic {'readwrite' if topic in read else 'write'} {topic}\n")
            out.extend(f"topic read {topic}\n" for topic in read if topic not in pub)
        return "".join(out)

    # ---- amqtt --------------------------------------------------------------------------------
    def amqtt_passwd(self) -> str:
        missing = [login.username for login in self.logins if not login.argon2]
        if missing:
            raise ConfigError(
                f"broker users {', '.join(missing[:3])}: no argon2 hash for the embedded broker "
                "(provisioned without amqtt installed; `provision add --force` them again)"
            )
        return "".join(f"{login.username}:{login.argon2}\n" for login in self.logins)

    def amqtt_plugins(self, password_file: str) -> dict:
        """The `plugins` section of amqtt 0.12's broker config: file logins, then topic ACLs.

        amqtt's `acl` is its subscribe ACL; a subscription outside it is refused (SUBACK 0x80), so
        nothing outside it is ever delivered. A publish outside `publish_acl` is dropped. A device
        login must use its own client id (`amqtt_plugins.py`): amqtt would otherwise hand device B's
        queued messages to whoever resumes B's session.
        """
        return {
            "amqtt.plugins.authentication.FileAuthPlugin": {"password_file": password_file},
            "fedclip.sdk.amqtt_plugins.DeviceClientIdPlugin": {},
            "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {
                "publish_acl": {login.username: self.publish_topics(login) for login in self.logins},
                "acl": {login.username: self.read_topics(login) for login in self.logins},
            },
        }


__all__ = [
    "COORDINATOR_USER",
    "FleetAcl",
    "Login",
    "argon2_hash",
    "mosquitto_hash",
    "mosquitto_verify",
    "new_password",
]
