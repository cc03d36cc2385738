"""Who may log in to a fleet's broker and where each login may publish and subscribe.

One set of rules and one password hash (mosquitto's PBKDF2-SHA512 `$7$`), for each broker fedclip
configures: mosquitto gets them rendered as its `password_file` and `acl_file`; the embedded amqtt
broker checks them live through fedclip's plugins (`amqtt_plugins.py`, `FleetAcl.allows`), so a
reload there is one object swap. Provisioning writes both from the enrolment registry.

The rules (topics under `fedclip/<fleet>/`, `wire.Topics` names them):
- a device publishes only on its own `agents/<id>/{status,update,ack}`;
- a device reads only its own `agents/<id>/{task,adapter,command,pin,status}` and the fleet-wide
  `coordinator/status` and `rollout/#`;
- the coordinator login reads and writes everything under the fleet root, so only it can publish
  tasks, adapters and commands;
- anonymous clients get nothing (`allow_anonymous false`, no ACL lines).

Device logins are the agent ids; the coordinator's login contains a `.`, which no id may, so no
device can ever be enrolled under the coordinator's name.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field

from fedclip.sdk.errors import ConfigError
from fedclip.sdk.ids import check_id
from fedclip.sdk.wire import Topics

COORDINATOR_USER = "fedclip.coordinator"
DEVICE_PUBLISHES = ("status", "update", "ack")
# "status": its own, which the session watches for a stale last will overwriting it (sdk/mqtt_will.py).
DEVICE_READS = ("task", "adapter", "command", "pin", "status")
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
    try:
        salt, rounds = base64.b64decode(parts[3], validate=True), int(parts[2])
    except (ValueError, binascii.Error):
        return False
    if not 1 <= rounds <= 1_000_000:  # a corrupt hash must not cost a minute of CPU per login
        return False
    got = mosquitto_hash(password, salt=salt, iterations=rounds).split("$")[4]
    return hmac.compare_digest(got, parts[4])


@dataclass(frozen=True)
class Login:
    """One broker user: its name, its password's `$7$` hash, and the device it is (None: coordinator)."""

    username: str
    mosquitto: str
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

    @functools.cached_property
    def _by_name(self) -> dict[str, Login]:
        return {login.username: login for login in self.logins}

    def login(self, username: str | None) -> Login | None:
        return self._by_name.get(username) if username else None

    def check_password(self, username: str | None, password: str | None) -> bool:
        login = self.login(username)
        return login is not None and mosquitto_verify(password or "", login.mosquitto)

    def allows(self, username: str | None, action: str, topic: str) -> bool:
        """May `username` `action` ("publish", "subscribe" or "receive") on `topic` (a filter for
        subscribe: it must be no wider than a rule)? Unknown logins may do nothing."""
        login = self.login(username)
        if login is None:
            return False
        rules = self.publish_topics(login) if action == "publish" else self.read_topics(login)
        return any(covers(rule, topic) for rule in rules)

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

    # ---- the embedded broker's file form ------------------------------------------------------
    def to_json(self) -> str:
        logins = [{"username": x.username, "mosquitto": x.mosquitto, "agent": x.agent} for x in self.logins]
        return json.dumps({"fleet": self.fleet, "logins": logins}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "fleet ACL") -> FleetAcl:
        try:
            data = json.loads(text)
            return cls(data["fleet"], tuple(Login(**x) for x in data["logins"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{where}: not a fleet ACL ({e})") from None


def covers(rule: str, requested: str) -> bool:
    """True when the topic filter `rule` covers `requested`: a topic, or a filter whose wildcards
    the rule matches with the same wildcard or a `#` (so a subscription is never wider than a rule)."""
    want = requested.split("/")
    for i, part in enumerate(rule.split("/")):
        if part == "#":
            return True  # the rest, and the parent level itself (MQTT)
        if i >= len(want) or want[i] == "#" or (part != "+" and part != want[i]):
            return False
    return len(rule.split("/")) == len(want)


def amqtt_plugins(*, key: str = "", acl_file: str = "") -> dict:
    """The `plugins` section of an amqtt 0.12 broker config enforcing a fleet's ACL with fedclip's
    plugins (`amqtt_plugins.py`): `key` names a live ACL of this process, `acl_file` a JSON file."""
    cfg = {"key": key, "acl_file": acl_file}
    return {
        "fedclip.sdk.amqtt_plugins.FleetAuthPlugin": cfg,
        "fedclip.sdk.amqtt_plugins.FleetTopicPlugin": dict(cfg),
    }


__all__ = [
    "COORDINATOR_USER",
    "FleetAcl",
    "Login",
    "amqtt_plugins",
    "covers",
    "mosquitto_hash",
    "mosquitto_verify",
    "new_password",
]
