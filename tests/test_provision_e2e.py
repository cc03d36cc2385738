"""A provisioned fleet runs a real round: two `fedclip-agent start` processes started from their
startup kits as they are, the coordinator's `Server` logged in with its password file, mosquitto
running the generated config. The ACL must let the whole protocol through and nothing else."""

from __future__ import annotations

import pytest
from fixtures_broker import need_mosquitto
from fixtures_fleet import AgentProc
from test_coordinator import Running

from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.provision import Provisioner
from fedclip.coordinator.store import Store
from fedclip.sdk.broker_acl import COORDINATOR_USER
from fedclip.sdk.broker_mosquitto import MosquittoBroker
from fedclip.sdk.broker_ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(600)]
FLEET = "kit-fleet"


def test_a_round_runs_on_a_provisioned_fleet_from_kits_as_they_are(tiny_bundle, fmnist_dir, tmp_path):
    need_mosquitto()
    port = free_port()
    state = tmp_path / "coord"
    prov = Provisioner.init(state, FLEET, broker=f"mqtt://127.0.0.1:{port}", bundle=str(tiny_bundle))
    kits = [prov.add(a, out=tmp_path / "kits" / a).path for a in ("dev-1", "dev-2")]
    prov.write_broker("mosquitto", tmp_path / "broker", port=port)
    broker = MosquittoBroker(port=port, include_dir=tmp_path / "broker" / "conf.d")
    broker.start()
    agents: list[AgentProc] = []
    try:
        for kit in kits:
            (kit / "data").symlink_to(fmnist_dir)  # the kit's `data: data`, as a device would set it
            agents.append(
                AgentProc(
                    tmp_path / "logs",
                    ["-c", str(kit / "agent.yaml"), "--threads", "1"],
                    kit.name,
                    kit / "state",
                )
            )
        cfg = CoordConfig(
            broker=broker.url,
            fleet=FLEET,
            bundle=tiny_bundle,
            state=state,
            rounds=1,
            min_updates=2,
            selection="all",
            round_timeout=300.0,
            username=COORDINATOR_USER,
            password_file=str(prov.coordinator_password_file),
        ).with_secret()
        assert Running(cfg).join(timeout=540) == 0, "\n".join(a.tail() for a in agents)
        for agent in agents:
            assert agent.terminate() == 0, agent.tail()
    finally:
        for agent in agents:
            agent.kill()
        log = broker.log_file.read_text(errors="replace")
        broker.cleanup()
    with Store(state, readonly=True) as s:
        assert [(r.round, r.state) for r in s.rounds()] == [(1, "aggregated")]
        assert sorted(u.agent for u in s.updates(1)) == ["dev-1", "dev-2"]
    # every login was accepted (mosquitto logs refused ones; denied publishes only at debug level,
    # so the round completing is what shows the ACL let the protocol through)
    assert "not authorised" not in log, log[-3000:]
    assert log.count("u'dev-1'") >= 1 and log.count("u'dev-2'") >= 1
