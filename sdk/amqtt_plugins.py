"""amqtt plugin for the embedded broker: a device login may connect only under its own client id.

amqtt resumes a persistent session for whoever presents its client id, whatever the login, and then
delivers that session's queued messages without another ACL check: device A connecting as client id
"B" would receive B's queued tasks. A device's login is its agent id, so the rule is simple: a login
that is an id (the coordinator's contains a `.`, which no id may) must use itself as client id.
Imported only by amqtt, through the dotted path in the broker config.
"""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.plugins.base import BaseAuthPlugin

from fedclip.sdk.ids import ID_PATTERN


class DeviceClientIdPlugin(BaseAuthPlugin):
    async def authenticate(self, *, session) -> bool | None:
        user = getattr(session, "username", None)
        if user and ID_PATTERN.match(user) and session.client_id != user:
            self.context.logger.warning(
                "login %s refused: client id %r is not its own", user, session.client_id
            )
            return False
        return None  # no opinion: the password plugin decides

    @dataclass
    class Config:
        """No settings."""
