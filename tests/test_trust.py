"""The coordinator counts a message only from the enrolled, unrevoked agent whose key signed it."""

from __future__ import annotations

import numpy as np
import pytest

from fedclip.coordinator.trust import Trust
from fedclip.sdk import messages as m
from fedclip.sdk.errors import WireError
from fedclip.sdk.signing import generate_key
from fedclip.sdk.wire import decode

FLEET = "f"
KEYS = {"cam-1": generate_key(), "cam-2": generate_key()}
ADAPTER = {"a.lora_A": np.ones((2, 2), np.float32)}


class Registry:
    """A registry of two devices, one of which can be revoked."""

    def __init__(self):
        self.revoked: set[str] = set()

    def verify_key(self, agent_id):
        key = KEYS.get(agent_id)
        return None if key is None or agent_id in self.revoked else key.public_key()

    def is_revoked(self, agent_id):
        return agent_id in self.revoked


def msg(obj: m.WireBody, agent="cam-1", key=None, sent_at=0.0):
    return decode(m.encode(obj, FLEET, agent, key=key, sent_at=sent_at), fleet=FLEET)


def update(round_id=1):
    return m.Update(round_id, "b", 10, adapter=ADAPTER)


def test_signed_by_the_enrolled_key_passes():
    Trust(Registry()).check("cam-1", msg(update(), key=KEYS["cam-1"]), "u")


@pytest.mark.parametrize(
    "agent,obj_agent,key,reason",
    [
        ("cam-1", "cam-1", None, "unsigned message"),
        ("cam-1", "cam-1", "cam-2", "does not verify with agent cam-1's enrolled key"),
        ("cam-9", "cam-9", "cam-1", "agent 'cam-9' is not enrolled"),
        ("cam-2", "cam-1", "cam-1", "envelope names agent 'cam-1', the topic 'cam-2'"),
    ],
)
def test_anyone_else_is_refused(agent, obj_agent, key, reason):
    with pytest.raises(WireError, match=reason):
        Trust(Registry()).check(agent, msg(update(), obj_agent, KEYS.get(key or "")), "u")


def test_revocation_takes_effect_on_the_next_message():
    reg = Registry()
    trust = Trust(reg)
    trust.check("cam-1", msg(update(1), key=KEYS["cam-1"]), "u")
    reg.revoked.add("cam-1")
    with pytest.raises(WireError, match="agent 'cam-1' is revoked"):
        trust.check("cam-1", msg(update(2), key=KEYS["cam-1"]), "u")


def test_an_older_status_is_a_replay_but_the_last_will_is_not():
    trust = Trust(Registry())
    old = msg(m.AgentStatus("online", last_round=1), key=KEYS["cam-1"], sent_at=100.0)
    will = msg(m.AgentStatus("offline"), key=KEYS["cam-1"], sent_at=150.0)  # signed at connect time
    new = msg(m.AgentStatus("online", last_round=2), key=KEYS["cam-1"], sent_at=200.0)
    trust.check("cam-1", new, "s")
    with pytest.raises(WireError, match="a replay"):
        trust.check("cam-1", old, "s")
    trust.check("cam-1", will, "s")


def test_unprovisioned_fleets_check_only_the_envelope():
    trust = Trust(None)
    assert not trust.required
    trust.check("cam-1", msg(update()), "u")
    with pytest.raises(WireError, match="names agent"):
        trust.check("cam-2", msg(update()), "u")
