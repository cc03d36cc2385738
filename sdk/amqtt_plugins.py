"""amqtt plugins of the embedded broker: a fleet's logins and topic rules (`broker_acl.FleetAcl`).

`FleetAuthPlugin` admits exactly the fleet's logins (the same `$7$` hashes mosquitto checks) and a
device login only under its own client id: amqtt resumes a persistent session for whoever presents
its client id, and would hand device B's queued messages to device A's login presenting "B".
`FleetTopicPlugin` checks every publish, subscription and delivery against the rules.

Both read the ACL through `LIVE[key]` on every check, so `EmbeddedBroker.reload` applies a revoke by
swapping one object: the revoked login cannot connect, publish or receive from then on. A standalone
amqtt (`provision broker --kind amqtt`) names a JSON file (`FleetAcl.to_json`) instead of a key.
Imported only by amqtt, through the dotted paths in the broker config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from fedclip.sdk.broker_acl import FleetAcl
from fedclip.sdk.ids import ID_PATTERN

# key -> the ACL an embedded broker of this process enforces now (EmbeddedBroker sets and swaps it).
LIVE: dict[str, FleetAcl] = {}
_ACTIONS = {Action.PUBLISH: "publish", Action.SUBSCRIBE: "subscribe", Action.RECEIVE: "receive"}


@dataclass
class FleetConfig:
    key: str = ""  # an entry of LIVE (the embedded broker)
    acl_file: str = ""  # or a FleetAcl JSON file, read once at start (a standalone amqtt)


def _acl(plugin) -> FleetAcl | None:
    cfg: FleetConfig = plugin.context.config
    if cfg.key:
        return LIVE.get(cfg.key)
    cached = getattr(plugin, "_file_acl", None)
    if cached is None and cfg.acl_file:
        cached = plugin._file_acl = FleetAcl.from_json(Path(cfg.acl_file).read_text(), cfg.acl_file)
    return cached


class FleetAuthPlugin(BaseAuthPlugin):
    async def authenticate(self, *, session) -> bool | None:
        acl = _acl(self)
        user = getattr(session, "username", None)
        if acl is None or not acl.check_password(user, getattr(session, "password", None)):
            return False
        if isinstance(user, str) and ID_PATTERN.match(user) and session.client_id != user:
            self.context.logger.warning(
                "login %s refused: client id %r is not its own", user, session.client_id
            )
            return False
        return True

    Config = FleetConfig


class FleetTopicPlugin(BaseTopicPlugin):
    async def topic_filtering(self, *, session=None, topic=None, action=None) -> bool | None:
        acl = _acl(self)
        if acl is None or not topic or action not in _ACTIONS:
            return False
        return acl.allows(getattr(session, "username", None), _ACTIONS[action], topic)

    Config = FleetConfig
