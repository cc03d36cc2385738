"""Broker fixtures: a real mosquitto on a free port, started and stopped by the test.

Without mosquitto the tests that need it are skipped locally; in CI (the `CI` variable set) they fail,
because CI installs mosquitto and a silent skip there would hide a broken setup.
"""

from __future__ import annotations

import os

import pytest

from fedclip.sdk.broker_embedded import EmbeddedBroker
from fedclip.sdk.broker_mosquitto import MosquittoBroker, find_mosquitto

__all__ = ["embedded_broker", "mosquitto", "mosquitto_auth", "mosquitto_tls", "need_mosquitto"]

TEST_USER = "fedclip-test"
TEST_PASSWORD = "s3cret-test-pw"


def need_mosquitto() -> None:
    if find_mosquitto() is None:
        msg = "mosquitto is not installed (apt-get install mosquitto)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide mosquitto: {msg}")
        pytest.skip(msg)


def _run(broker: MosquittoBroker):
    try:
        broker.start()
        yield broker
    finally:
        broker.cleanup()


@pytest.fixture
def mosquitto():
    """A started mosquitto (anonymous, persistence on): `.url`, `.port`, `.restart()`, `.stop()`."""
    need_mosquitto()
    yield from _run(MosquittoBroker())


@pytest.fixture
def mosquitto_auth():
    """mosquitto with a password file; `.username` / `.password` are the only valid credentials."""
    need_mosquitto()
    yield from _run(MosquittoBroker(username=TEST_USER, password=TEST_PASSWORD))


@pytest.fixture
def mosquitto_tls():
    """mosquitto on mqtts:// with a throwaway CA; `.certs["ca.crt"]`, client cert and key included."""
    need_mosquitto()
    yield from _run(MosquittoBroker(tls=True))


@pytest.fixture
def embedded_broker():
    """The embedded amqtt broker; `.url` carries its generated credentials."""
    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
