"""`fedclip-agent start --bundle URL`: the agent downloads its bundle from the coordinator's bundle
server into its state dir (every sha256 checked) and comes online with it; a corrupt file is refused.
"""

from __future__ import annotations

import shutil

import pytest

from fedclip.coordinator.bundle_server import BundleServer
from fedclip.sdk.manifest import Manifest

pytestmark = [pytest.mark.broker, pytest.mark.timeout(600)]


def test_agent_fetches_its_bundle_by_url(mosquitto, coordinator_factory, agent_factory, tiny_bundle):
    coord = coordinator_factory(mosquitto.url)
    with BundleServer(tiny_bundle) as server:
        agent = agent_factory(mosquitto.url, bundle=server.url)
        online = coord.wait_status(agent, lambda b: b["state"] == "online", "online status")
        assert agent.terminate() == 0
    bundle_id = Manifest.load(tiny_bundle).bundle_id
    assert online.envelope.body["bundle_id"] == bundle_id
    fetched = agent.state / "bundles" / bundle_id
    assert Manifest.load(fetched, verify=True).bundle_id == bundle_id


def test_corrupt_bundle_by_url_is_refused(mosquitto, agent_factory, tiny_bundle, tmp_path):
    copy = tmp_path / "served"
    shutil.copytree(tiny_bundle, copy)
    victim = next(copy / rel for rel in Manifest.load(tiny_bundle).files)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte off: only the sha256 can tell
    victim.write_bytes(bytes(data))
    with BundleServer(copy) as server:
        agent = agent_factory(mosquitto.url, agent_id="dev-bad", bundle=server.url)
        assert agent.proc.wait(timeout=300) == 2, agent.tail()
    assert "sha256 mismatch" in agent.text()
    assert not list((agent.state / "bundles").glob("*/manifest*"))
