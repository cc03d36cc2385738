"""Identifiers shared by topics, state dirs and the registry."""

from __future__ import annotations

import re

from fedclip.sdk.errors import ConfigError

# No '/', '+', '#': ids are embedded in MQTT topics and file names.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_id(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ConfigError(f"{what}: {value!r} is not a valid id (1-64 of A-Z a-z 0-9 _ -)")
    return value
