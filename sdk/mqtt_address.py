"""Broker URLs: `mqtt://` / `mqtts://` addresses, one or a list of a cluster's nodes, parsed once.

The agent's config, the coordinator and `MqttSession` all read a broker URL through here, so a bad one
is refused the same way everywhere (a one-line ConfigError) and credentials in a URL never get printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from fedclip.sdk.errors import ConfigError

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerAddress:
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """`mqtt://host:port` or `mqtts://host:port` (credentials in the URL are accepted)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ConfigError(f"broker url {url!r}: {e}") from None
        if parts.scheme not in _DEFAULT_PORTS:
            raise ConfigError(f"broker url {url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ConfigError(f"broker url {url!r}: no host")
        return cls(
            scheme=parts.scheme,
            host=parts.hostname,
            port=port or _DEFAULT_PORTS[parts.scheme],
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:  # never prints credentials
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_broker_urls(urls: str | Sequence[str]) -> list[BrokerAddress]:
    """One URL, a comma-separated list, or a sequence of URLs: the nodes of one broker (cluster)."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = [BrokerAddress.parse(u.strip()) for u in items if u.strip()]
    if not out:
        raise ConfigError("broker url: none given")
    if len({a.tls for a in out}) > 1:
        raise ConfigError("broker urls: mix mqtt:// and mqtts://; the nodes of one cluster share one scheme")
    return out
