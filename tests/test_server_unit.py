"""The round loop's logic against the in-memory transport (`fedclip.sdk.transport.MemoryBroker`).

Round selection, tasks, quorum, the one deadline extension and aggregation run through the real
`Server` with a real store and registry; only the broker is in memory, so each test takes about a
second. Update intake (accept, dedupe, each rejection recorded and acknowledged) is driven message by
message. The same paths over a real mosquitto are in test_coordinator.py (integration).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.registry import Registry, load_initial_adapter
from fedclip.coordinator.server import Server
from fedclip.coordinator.server.tasks import RoundState
from fedclip.coordinator.store import Store
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.transport import MemoryBroker, MemoryTransport
from fedclip.sdk.wire import Envelope, Message, MsgType, Topics, decode, encode

FLEET = "u1"
TOPICS = Topics(FLEET)
WAIT_S = 60.0  # deadline for any one expected message (the suite shares 2 cores)


@pytest.fixture(scope="module")
def bundle(bundle_factory):
    path = bundle_factory(adapter="lora", labels=("a", "b", "c"))  # the one test_coordinator uses
    manifest = Manifest.load(path)
    return path, manifest, load_initial_adapter(path, manifest)


def _server(bundle, tmp_path, broker: MemoryBroker, **kw) -> Server:
    path, manifest, initial = bundle
    options = dict(
        broker="mqtt://in-memory", fleet=FLEET, bundle=path, state=tmp_path / "state", strategy="fedavg",
        rounds=1, min_updates=2, round_timeout=60.0, selection="all", http=False,
    )  # fmt: skip
    cfg = CoordConfig(**{**options, **kw})
    store = Store(cfg.state)
    registry = Registry(store, manifest.bundle_id, manifest.adapter.kind)
    registry.ensure_initial(initial, "fedavg")
    return Server(cfg, manifest, broker.client(manual_ack=True), store, registry)


class Agent:
    """One device played by the test on the in-memory broker."""

    def __init__(self, broker: MemoryBroker, agent_id: str, bundle_id: str, online: bool = True):
        self.id = agent_id
        self.client: MemoryTransport = broker.client()
        self.client.subscribe(TOPICS.task(agent_id))
        self.client.connect()
        body = {"state": "online" if online else "offline", "bundle_id": bundle_id, "last_round": -1}
        self.bundle_id = bundle_id
        self.client.publish(
            TOPICS.status(agent_id), encode(Envelope(MsgType.STATUS, FLEET, agent_id, body=body)), retain=True
        )

    def task(self) -> Message | None:
        """The next task message; None for an emptied retained task (the round closed)."""
        msg = self.client.get(WAIT_S)
        assert msg is not None, f"{self.id}: no task message within {WAIT_S}s"
        return decode(msg.payload, fleet=FLEET, expect=MsgType.TASK) if msg.payload else None

    def answer(self, task: Message, delta: float, num_samples: int = 10) -> bytes:
        env = task.envelope
        tensors = {k: (v + np.float32(delta)).astype(v.dtype) for k, v in task.adapter_tensors.items()}
        body = {"bundle_id": self.bundle_id, "num_samples": num_samples, "metrics": {"accuracy": delta}}
        out = Envelope(
            MsgType.UPDATE, FLEET, self.id, round=env.round, base_version=env.base_version, body=body
        )
        payload = encode(out, tensors)
        self.client.publish(TOPICS.update(self.id), payload)
        return payload


class Running:
    """`server.run()` on a thread; `join` returns its exit code or re-raises."""

    def __init__(self, server: Server):
        self.server, self.result = server, []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result.append(self.server.run())
        except BaseException as e:  # surfaced by join()
            self.result.append(e)

    def join(self) -> int:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the round loop did not finish"
        if isinstance(self.result[0], BaseException):
            raise self.result[0]
        return self.result[0]


def test_a_round_selects_compatible_online_agents_sends_tasks_and_aggregates(bundle, tmp_path):
    broker = MemoryBroker()
    bid = bundle[1].bundle_id
    a, b = Agent(broker, "a", bid), Agent(broker, "b", bid)
    off, other = Agent(broker, "c", bid, online=False), Agent(broker, "d", "f" * 64)
    running = Running(_server(bundle, tmp_path, broker))
    ta, tb = a.task(), b.task()
    assert ta.envelope.round == tb.envelope.round == 1 and ta.envelope.base_version == "g-r0"
    assert ta.envelope.body["hyperparameters"]["lr"] == running.server.cfg.lr
    a.answer(ta, 0.1, num_samples=10)
    b.answer(tb, 0.4, num_samples=30)
    assert running.join() == 0
    # only a and b were asked; their retained tasks are cleared and the coordinator says it finished
    assert off.client.get(0) is None and other.client.get(0) is None
    assert broker.retained(TOPICS.task("a")) is None and broker.retained(TOPICS.task("c")) is None
    status = decode(broker.retained(TOPICS.coordinator_status), fleet=FLEET).envelope.body
    assert status["state"] == "offline" and status["finished"] is True
    with Store(tmp_path / "state", readonly=True) as store:
        assert store.get_round(1).state == "aggregated" and store.head("global") == "g-r1"
        g1 = Registry(store, "").load("g-r1")[0]
        assert sorted(store.selections(1)) == ["a", "b"]
    for name, start in ta.adapter_tensors.items():  # sample-weighted FedAvg: 0.1 * 1/4 + 0.4 * 3/4
        np.testing.assert_allclose(g1[name], start + np.float32(0.325), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reset", [True, False])
def test_tasks_ask_agents_to_start_adamw_afresh_unless_told_not_to(bundle, tmp_path, reset):
    """An agent's AdamW moments from its last round point back to its own last adapter, not the
    round's start: the coordinator asks for fresh ones by default (`reset_optimizer`)."""
    broker = MemoryBroker()
    bid = bundle[1].bundle_id
    a, b = Agent(broker, "a", bid), Agent(broker, "b", bid)
    running = Running(_server(bundle, tmp_path, broker, **({} if reset else {"reset_optimizer": False})))
    ta, tb = a.task(), b.task()
    assert ta.envelope.body["reset_optimizer"] is reset and tb.envelope.body["reset_optimizer"] is reset
    a.answer(ta, 0.1)
    b.answer(tb, 0.2)
    assert running.join() == 0


@pytest.mark.parametrize(("options", "loss"), [({}, "balanced-softmax"), ({"loss": "ce"}, None)])
def test_tasks_ask_for_balanced_softmax_by_default_where_the_bundle_trains_it(
    bundle, tmp_path, options, loss
):
    """`loss: auto` (the default) is balanced softmax on a classify bundle of format 2: with plain CE
    FedAvg's global adapter stayed at zero-shot under label skew (docs/aggregation.md). Asked for,
    plain CE; it is the wire's default, so its tasks do not name it."""
    broker = MemoryBroker()
    bid = bundle[1].bundle_id
    assert bundle[1].takes_label_bias
    a, b = Agent(broker, "a", bid), Agent(broker, "b", bid)
    running = Running(_server(bundle, tmp_path, broker, **options))
    ta, tb = a.task(), b.task()
    assert running.server.cfg.loss == (loss or "ce")
    for t in (ta, tb):
        assert t.envelope.body["hyperparameters"].get("loss") == loss
    a.answer(ta, 0.1)
    b.answer(tb, 0.2)
    assert running.join() == 0


def test_below_quorum_the_deadline_is_extended_once_then_the_round_fails(bundle, tmp_path):
    broker = MemoryBroker()
    bid = bundle[1].bundle_id
    a, b = Agent(broker, "a", bid), Agent(broker, "b", bid)
    running = Running(_server(bundle, tmp_path, broker, round_timeout=1.0))
    first_a, first_b = a.task(), b.task()
    a.answer(first_a, 0.1)
    again = b.task()  # b is silent: the same task comes again with a later deadline
    assert again.envelope.round == 1 and again.envelope.body["deadline"] > first_b.envelope.body["deadline"]
    assert again.tensors.keys() == first_b.tensors.keys()
    assert a.task() is None and b.task() is None  # round 1 failed: its tasks are cleared
    second_a, second_b = a.task(), b.task()
    assert second_a.envelope.round == second_b.envelope.round == 2
    a.answer(second_a, 0.2)
    b.answer(second_b, 0.2)
    assert running.join() == 0
    with Store(tmp_path / "state", readonly=True) as store:
        r1 = store.get_round(1)
        assert r1.state == "failed" and r1.extended
        assert r1.reason == "quorum not reached: 1 of 2 updates after extension"
        assert store.get_round(2).state == "aggregated"
        metrics = [line for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines() if line]
        assert ['"state": "failed"' in metrics[0], '"state": "aggregated"' in metrics[1]] == [True, True]


@pytest.fixture
def open_round(bundle, tmp_path):
    """A server whose round 1 is open for a and b (set up the way `_start_round` leaves it)."""
    broker = MemoryBroker()
    server = _server(bundle, tmp_path, broker)
    server.store.start_round(1, "fedavg", time.time() + 60, [("a", "g-r0", "t"), ("b", "g-r0", "t")])
    server.current = RoundState(1, time.time() + 60, False, {"a": "g-r0", "b": "g-r0"}, {})
    server.transport.subscribe(TOPICS.all_agents("update"))
    server.transport.connect()
    yield server, broker
    server.store.close()


def _update(bundle, agent: str, *, claims: str | None = None, round_id: int = 1, delta: float = 0.1, **body):
    _, manifest, initial = bundle
    fields = {"bundle_id": manifest.bundle_id, "num_samples": 5, "metrics": {"loss": 1.0}, **body}
    env = Envelope(MsgType.UPDATE, FLEET, claims or agent, round=round_id, base_version="g-r0", body=fields)
    return encode(env, {k: v + np.float32(delta) for k, v in initial.items()})


def test_intake_accepts_once_and_records_every_rejection_with_its_reason(bundle, open_round):
    server, _ = open_round
    intake, st = server.intake, server.current

    def offer(agent: str, payload: bytes) -> str:
        return intake.on_update(agent, Incoming(TOPICS.update(agent), payload, False), st)

    good = _update(bundle, "a")
    assert offer("a", good) == "stored" and st.received == {"a"}
    assert offer("a", good) == "duplicate"  # QoS 1 redelivery: nothing changes
    assert offer("a", _update(bundle, "a", delta=0.2)) == "conflict"
    assert offer("b", _update(bundle, "b", claims="a")) == "rejected"
    assert offer("b", _update(bundle, "b", round_id=7)) == "rejected"
    assert offer("e", _update(bundle, "e")) == "rejected"
    assert offer("b", _update(bundle, "b", num_samples=-1)) == "rejected"
    assert offer("b", b"not a message") == "rejected"
    reasons = [r[3] for r in server.store.rejections()]
    expected = [
        "already accepted from this agent",
        "envelope names agent 'a', the topic 'b'",
        "round 7 is not the current round (1)",
        "agent 'e' was not selected for round 1",
        "'num_samples' must be an integer in [0, 2147483647]",
        "update on the topic of b",
    ]
    assert len(reasons) == len(expected)
    for reason, part in zip(reasons, expected, strict=True):
        assert part in reason and "\n" not in reason
    assert [u.agent for u in server.store.updates(1)] == ["a"] and st.received == {"a"}


def test_every_update_is_acknowledged_once_handled_stored_or_rejected(bundle, open_round):
    server, broker = open_round
    agent = broker.client()
    agent.connect()
    good = _update(bundle, "a")
    for topic_agent, payload in (("a", good), ("a", good), ("b", _update(bundle, "b", claims="a"))):
        agent.publish(TOPICS.update(topic_agent), payload)
    assert server.transport.unacked == 3
    server.pump(WAIT_S)  # handles everything queued
    assert server.transport.unacked == 0
    assert [u.agent for u in server.store.updates(1)] == ["a"]
    assert len(server.store.rejections()) == 1


def test_a_late_update_for_a_closed_round_is_recorded_as_late(bundle, open_round):
    server, _ = open_round
    server.store.fail_round(1, "test")
    outcome = server.intake.on_update("a", Incoming(TOPICS.update("a"), _update(bundle, "a"), False), None)
    assert outcome == "late"
    assert server.store.rejections()[-1][3] == "late: round failed"


def test_robust_caps_bound_a_liar_from_three_updates_on():
    from fedclip.coordinator.server.close import robust_caps

    assert robust_caps([300, 280, 10**9], [1.0, 1.2, 500.0], 10.0) == (3000, 12.0)
    assert robust_caps([300, 10**9], [1.0, 500.0], 10.0) == (
        None,
        None,
    )  # two: no median one liar cannot move
    assert robust_caps([300, 280, 10**9], [1.0, 1.2, 500.0], 0.0) == (None, None)  # off
    assert robust_caps([5, 5, 5], [0.0, 0.0, 0.0], 10.0) == (50, None)  # no movement: nothing to clip
    # Newcomers' statistics-only updates (norm 0) do not shrink the cap, even as most of the round.
    assert robust_caps([5] * 7, [1.0, 1.2, 1.1, 0.0, 0.0, 0.0, 0.0], 10.0) == (50, 11.0)
    assert robust_caps([5] * 4, [1.0, 1.2, 0.0, 0.0], 10.0) == (50, None)  # 2 moved: no median yet


def test_fair_selection_gives_the_agent_left_out_in_round_1_a_turn_in_round_2(bundle, tmp_path):
    """K = 2 of 3 with `selection: fair`: whoever sat out round 1 is in round 2 (least recently
    selected first), and the round loop's fleet index records each agent's turn."""
    broker = MemoryBroker()
    bid = bundle[1].bundle_id
    agents = {name: Agent(broker, name, bid) for name in ("a", "b", "c")}
    # seed 3: `random` would draw a and b in both rounds, so only the fair rule passes this test
    server = _server(bundle, tmp_path, broker, rounds=2, clients_per_round=2, selection="fair", seed=3)
    running = Running(server)
    answered: set[tuple[str, int]] = set()
    deadline = time.monotonic() + WAIT_S
    while running.thread.is_alive() and time.monotonic() < deadline:
        for agent in agents.values():  # answer every task that arrives, whoever gets one
            msg = agent.client.get(0.05)
            if msg is not None and msg.payload:
                task = decode(msg.payload, fleet=FLEET, expect=MsgType.TASK)
                if (agent.id, task.envelope.round) not in answered:
                    answered.add((agent.id, task.envelope.round))
                    agent.answer(task, 0.1)
    assert running.join() == 0
    with Store(tmp_path / "state", readonly=True) as store:
        r1, r2 = set(store.selections(1)), set(store.selections(2))
    assert len(r1) == len(r2) == 2
    assert ({"a", "b", "c"} - r1) <= r2  # the one left out goes first
    assert server.fleet.participation(["a", "b", "c"])[0] == [2 if x in r2 else 1 for x in "abc"]


def test_fair_selection_remembers_who_had_a_task_across_a_restart(bundle, tmp_path):
    """A coordinator gave a and b tasks in round 1 and a in round 2, then stopped; the next one on
    the same state dir knows it (agents report last_round -1 here, so only the store can tell)."""
    broker = MemoryBroker()
    bid = bundle[1].bundle_id
    for name in ("a", "b", "c"):
        Agent(broker, name, bid)
    with Store(tmp_path / "state") as store:
        store.start_round(1, "fedavg", time.time(), [("a", "g-r0", "t"), ("b", "g-r0", "t")])
        store.start_round(2, "fedavg", time.time(), [("a", "g-r0", "t")])
    server = _server(bundle, tmp_path, broker, selection="fair", clients_per_round=1, min_updates=1)
    try:
        server.transport.subscribe(TOPICS.all_agents("status"))
        server.transport.connect()
        deadline = time.monotonic() + WAIT_S
        while len(server.fleet.agents) < 3 and time.monotonic() < deadline:
            server.pump(0.1)
        assert server.fleet.participation(["a", "b", "c"])[0] == [2, 1, -1]
        assert server.selector.select(3, ["a", "b", "c"]) == ["c"]  # never had a task: first
    finally:
        server.store.close()


def test_max_missed_rests_an_agent_that_left_its_task_unanswered(bundle, tmp_path):
    """`max_missed: 1`: c is silent in round 1 (closed at its deadline with a and b), so round 2
    goes to a and b only; c would be back once it published a status or an update."""
    broker = MemoryBroker()
    bid = bundle[1].bundle_id
    agents = {name: Agent(broker, name, bid) for name in ("a", "b", "c")}
    server = _server(bundle, tmp_path, broker, rounds=2, round_timeout=3.0, max_missed=1)
    running = Running(server)
    answered: set[tuple[str, int]] = set()
    deadline = time.monotonic() + WAIT_S
    while running.thread.is_alive() and time.monotonic() < deadline:
        for name in ("a", "b"):  # c receives its task and never answers
            msg = agents[name].client.get(0.05)
            if msg is not None and msg.payload:
                task = decode(msg.payload, fleet=FLEET, expect=MsgType.TASK)
                if (name, task.envelope.round) not in answered:
                    answered.add((name, task.envelope.round))
                    agents[name].answer(task, 0.1)
    assert running.join() == 0
    with Store(tmp_path / "state", readonly=True) as store:
        assert sorted(store.selections(1)) == ["a", "b", "c"]
        assert sorted(store.selections(2)) == ["a", "b"]
    assert server.fleet.eligible(bid) == ["a", "b"]
