"""kill -9 of the real coordinator in the middle of a group-committed batch of updates.

Real parts throughout: mosquitto on the fleet's generated config, the real `fedclip-coord serve`
(provisioned: it counts only signed updates of enrolled agents), and the fleet simulator's agents
with their startup kits. The coordinator is paused while every agent publishes its signed update, so
on resuming it takes them in batches (of at most 16 here); `FEDCLIP_COORD_CRASH_AT` makes it
SIGKILL itself in the first batch of at least 4 updates: after the batch's blobs are durable but
before its rows commit ("blobs-written"), or after the commit but before any of the batch's PUBACKs
("update-stored"). A few agents also publish their update a second time while it is down, as a
device that never saw its PUBACK would, and one agent holds its update back until the restarted
coordinator has taken everything else, so the round cannot close before the redelivered batch is
handled. Every update must then be stored exactly once, with the content that agent sent, and the
round must aggregate each agent once.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from fedclip.coordinator.server.intake import CRASH_ENV
from fedclip.sdk.wire import decode, tensors_digest
from tests.fixtures_broker import need_mosquitto

N = 40
LAST = 39  # the agent (by index) that publishes only after the restart: the round stays open
RESENT = (3, 20, 33)  # agents (by index) that publish their update a second time
WAIT_S = 240.0

pytestmark = pytest.mark.timeout(600)


def _sim_setup():
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))  # its helpers import each other by name
    spec = importlib.util.spec_from_file_location("_sim_setup", bench / "_sim_setup.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_sim_setup"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    """The agents' startup kits, made once for both crash points."""
    return tmp_path_factory.mktemp("intake-kits")


def _rows(state: Path) -> list[tuple[str, str]]:
    con = sqlite3.connect(f"file:{state / 'coordinator.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT agent, sha256 FROM updates WHERE round=1 ORDER BY agent").fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("point", ["blobs-written", "update-stored"])
def test_kill_9_mid_batch_loses_no_update_and_counts_none_twice(bundle_factory, kits, tmp_path, point):
    need_mosquitto()
    setup = _sim_setup()
    bundle = bundle_factory(adapter="tri-lora", labels=("a", "b", "c"))
    settings = {
        "strategy": "fedavg",
        "rounds": 1,
        "clients_per_round": 0,
        "selection": "all",
        "min_updates": N,
        "round_timeout": WAIT_S * 2,
        # Batches of at most 16: the kill hits one of the burst's batches; those before it are
        # stored and acknowledged, it and the rest are delivered again after the restart.
        "intake_batch": 16,
    }
    crash = {CRASH_ENV: f"{point}:batch>=4"}
    sim = setup.start(
        bundle, N, settings, kits=kits, hold=True, workdir=tmp_path, env=crash, say=lambda *a: None
    )
    deadline = time.time() + WAIT_S
    fleet, log = sim.fleet, tmp_path / "coordinator.log"
    try:
        setup.wait(sim, lambda: "connected" in sim.watch.events, deadline, "the coordinator to connect")
        fleet.connect_all()
        setup.wait(sim, lambda: len(fleet.held) >= N, deadline, "every task answered (held)")
        sent = {fleet.ids[i]: blob for i, _, blob in fleet.held}
        last = next(h for h in fleet.held if h[0] == LAST)
        fleet.held.remove(last)
        # Paused, the coordinator reads nothing: the whole burst waits for it in the broker.
        os.kill(sim.coord.pid, signal.SIGSTOP)
        fleet.release()
        setup.wait(sim, lambda: fleet.c.updates_acked.get(1, 0) >= N - 1, deadline, "the broker to take all")
        os.kill(sim.coord.pid, signal.SIGCONT)
        setup.wait(sim, lambda: sim.coord.poll() is not None, deadline, "the coordinator to kill itself")
        assert sim.coord.returncode == -signal.SIGKILL
        crashed = lambda: "crash point" in log.read_text()  # noqa: E731
        setup.wait(sim, crashed, deadline, "the crash line in the log", coordinator=False)
        line = re.search(rf"crash point {point} in a batch of (\d+) updates: (.*)", log.read_text())
        batch = line[2].split()
        assert 4 <= int(line[1]) == len(batch) <= 16
        before = dict(_rows(sim.state))
        if point == "blobs-written":
            assert not set(batch) & set(before)  # the batch's rows never committed
        else:
            assert set(batch) <= set(before)  # committed, never acknowledged

        # While it is down: some agents publish their update again (same bytes, a new message).
        for i in RESENT:
            fleet.send_update(i, 1, sent[fleet.ids[i]])
        resent = lambda: fleet.c.updates_acked.get(1, 0) >= N - 1 + len(RESENT)  # noqa: E731
        setup.wait(sim, resent, deadline, "the resends taken by the broker", coordinator=False)
        setup.restart_coordinator(sim)
        # The broker hands it what was queued in order; the resends were queued last.
        resends = f"duplicate update from {fleet.ids[RESENT[-1]]}"
        setup.wait(sim, lambda: log.read_text().count(resends) >= 1, deadline, "the resends handled")
        fleet.send_update(*last)
        setup.wait(sim, lambda: "aggregated_r1" in sim.watch.events, deadline, "round 1 aggregated")
        setup.wait(sim, lambda: sim.coord.poll() is not None, deadline, "the coordinator to finish")
        assert sim.coord.returncode == 0, log.read_text()[-3000:]
    finally:
        setup.stop(sim)

    rows = _rows(sim.state)
    assert [a for a, _ in rows] == sorted(sent)  # every agent's update, each exactly once
    for agent, sha in rows:  # ... and it is the one that agent sent
        assert sha == tensors_digest(decode(sent[agent], fleet=setup.FLEET).tensors)
    text = log.read_text()
    assert re.search(rf"round 1: aggregated {N} updates with fedavg", text)
    dups = set(re.findall(r"duplicate update from (\S+) ignored", text))
    # the resent copies, and (killed after the commit) the whole redelivered batch, recognized
    assert dups == {fleet.ids[i] for i in RESENT} | (set(batch) if point == "update-stored" else set())
    con = sqlite3.connect(f"file:{sim.state / 'coordinator.sqlite'}?mode=ro", uri=True)
    try:
        assert con.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 0
        state, version = con.execute("SELECT state, global_version FROM rounds WHERE round=1").fetchone()
    finally:
        con.close()
    assert (state, version) == ("aggregated", "g-r1")
