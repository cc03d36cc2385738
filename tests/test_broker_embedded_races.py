"""The embedded amqtt broker under subscriptions that arrive while messages are delivered.

amqtt 0.12 iterates its topic-filter table and awaits inside the loop (the fleet ACL's check before
each delivery, the retained messages of a connecting client); a SUBSCRIBE handled meanwhile changed
the table and the loop died: the message missed every subscriber after that point (a coordinator
lost agents' statuses while other agents connected) and a connecting client was dropped.
`broker_embedded._Snapshots` makes those loops iterate a copy.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from fedclip.sdk.broker_acl import COORDINATOR_USER, FleetAcl, Login, mosquitto_hash, new_password
from fedclip.sdk.broker_embedded import EmbeddedBroker, _Snapshots
from fedclip.sdk.mqtt import MqttSession
from fedclip.sdk.wire import Topics

pytestmark = pytest.mark.timeout(180)


def test_the_table_is_iterated_over_a_copy():
    table = _Snapshots({"a": [("s1", 1)], "b": [("s2", 0)]})
    seen = []
    for key, subs in table.items():  # a plain dict raises here ("changed size during iteration")
        table[f"{key}-new"] = []
        subs.append(("late", 1))  # the copy's list, not the table's
        seen.append(key)
    for _key in table:
        table.pop("b", None)
    assert seen == ["a", "b"] and table["a"] == [("s1", 1)] and "b" not in table
    with pytest.raises(RuntimeError, match="changed size"):
        plain = {"a": 1}
        for _key in plain:
            plain["b"] = 2


def test_statuses_reach_the_coordinator_while_agents_connect(caplog):
    """An agent's status matches two filters (the coordinator's `agents/+/status`, after the agent's
    own will-guard filter): 300 of them while 30 other agents connect and subscribe; every one
    arrives and no delivery loop dies."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    fleet, pw, coord_pw = "race", new_password(), new_password()
    topics = Topics(fleet)
    h = mosquitto_hash(pw)
    logins = tuple(Login(f"dev{i}", h, agent=f"dev{i}") for i in range(31))
    acl = FleetAcl(fleet, (*logins, Login(COORDINATOR_USER, mosquitto_hash(coord_pw))))
    n = 300
    with EmbeddedBroker(username=COORDINATOR_USER, password=coord_pw, acl=acl) as broker:
        assert isinstance(broker._broker._subscriptions, _Snapshots)

        def device(i: int) -> MqttSession:
            return MqttSession(
                broker.plain_url, f"dev{i}", username=f"dev{i}", password=pw, clean_session=True
            )

        with MqttSession(broker.url, "coordinator", clean_session=True) as coord, device(0) as agent:
            probe = topics.status("dev0")
            agent.subscribe(probe)  # the agent's own filter first, as its will guard makes it
            agent.publish(probe, b"probe")
            assert agent.get(timeout=15) is not None
            coord.subscribe(topics.status("+"))
            agent.publish(probe, b"probe-2")
            while (msg := coord.get(timeout=15)) is None or msg.payload != b"probe-2":
                assert msg is not None, "the coordinator's subscription did not come up"
            joined: list[MqttSession] = []

            def join() -> None:
                for i in range(1, 31):
                    s = device(i)
                    s.connect()
                    s.subscribe(topics.task(f"dev{i}"))
                    s.subscribe(topics.adapter(f"dev{i}"))
                    joined.append(s)

            joiner = threading.Thread(target=join)
            joiner.start()
            for k in range(n):
                agent.publish(probe, f"s{k}".encode(), qos=1)
            joiner.join(120)
            got: set[bytes] = set()
            deadline = time.monotonic() + 30
            while len(got) < n and time.monotonic() < deadline:
                msg = coord.get(timeout=0.5)
                if msg is not None and msg.topic == probe and msg.payload.startswith(b"s"):
                    got.add(msg.payload)
            for s in joined:
                s.close()
    died = [r.getMessage() for r in caplog.records if "changed size" in str(r.exc_info or r.getMessage())]
    assert not died, f"{len(died)} delivery loops died"
    assert len(got) == n, f"{n - len(got)} of {n} statuses lost"
