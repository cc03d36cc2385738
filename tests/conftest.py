"""Shared fixtures live in one module per concern, so parts of the suite can grow independently."""

from fixtures_broker import *  # noqa: F403
from fixtures_bundle import *  # noqa: F403
from fixtures_data import *  # noqa: F403
from fixtures_fleet import *  # noqa: F403
from fixtures_rollout import *  # noqa: F403
