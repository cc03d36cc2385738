"""Every message class round-trips, and every hostile body is refused with a one-line reason.

Valid messages are generated (hypothesis, bounded examples) and must survive encode -> decode
unchanged; invalid ones are the valid body with one field replaced by a huge integer, NaN, a wrong
type, or removed, or with an extra field: each must raise WireError naming the problem in one line.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedclip.sdk import messages as m
from fedclip.sdk.adapters import encode_tensors
from fedclip.sdk.errors import WireError
from fedclip.sdk.messages.base import MAX_NAME
from fedclip.sdk.signing import generate_key, sign_envelope
from fedclip.sdk.wire import MAX_ROUND, STAT_LABEL_HIST, STAT_MEAN, Envelope, MsgType, tensors_digest
from fedclip.sdk.wire import encode as wire_encode

FLEET, AGENT = "fleet-1", "cam-07"
ADAPTER = {"visual.q.lora_A": np.arange(8, dtype=np.float32).reshape(2, 4)}
ADAPTER_B = np.ones((2, 4), np.float32)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
small_text = st.text(max_size=30)
finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
unit = st.floats(min_value=0, max_value=1, allow_nan=False)


def roundtrip(obj: m.WireBody, key=None, public_key=None):
    payload = m.encode(obj, FLEET, AGENT, key=key)
    return m.decode(type(obj), payload, fleet=FLEET, agent=AGENT, public_key=public_key, where="t")


def same(a: m.WireBody, b: m.WireBody) -> None:
    """Equal fields, comparing tensor mappings by value."""
    for name in a.__dataclass_fields__:  # type: ignore[attr-defined]  # every message is a dataclass
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, dict) and x and isinstance(next(iter(x.values())), np.ndarray):
            assert set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x), name
        else:
            assert x == y, name


hyper = st.builds(
    m.Hyperparameters,
    epochs=st.integers(1, m.MAX_EPOCHS),
    lr=st.floats(1e-6, m.MAX_LR, allow_nan=False),
    batch_size=st.integers(1, m.MAX_BATCH),
    max_steps=st.none() | st.integers(1, m.MAX_STEPS),
    loss=st.sampled_from(["ce", "balanced-softmax"]),
)
tasks = st.builds(
    m.Task,
    round_id=st.integers(0, MAX_ROUND),
    bundle_id=ids,
    deadline=st.floats(0, 1e10, allow_nan=False),
    hyperparameters=hyper,
    stats=st.sampled_from([("histogram",), ("histogram", "gaussian")]),
    noise_std=finite,
    reset_optimizer=st.booleans(),
    stats_digest=st.from_regex(r"[0-9a-f]{0,64}", fullmatch=True),
    base_version=st.just("") | ids,
    adapter=st.just(ADAPTER),
)
updates = st.builds(
    m.Update,
    round_id=st.integers(0, MAX_ROUND),
    bundle_id=ids,
    num_samples=st.integers(0, m.MAX_SAMPLES),
    base_version=st.just("") | ids,
    metrics=st.dictionaries(st.text(min_size=1, max_size=20), finite, max_size=5),
    train_seconds=st.floats(0, 1e6, allow_nan=False).map(lambda x: round(x, 3)),
    skipped_images=st.integers(0, 1000),
    data_digest=st.from_regex(r"[0-9a-f]{0,64}", fullmatch=True),
    adapter=st.just(ADAPTER),
    stats=st.just({STAT_LABEL_HIST: np.array([3, 0, 1], np.float32)}),
)


def _tunings(adapter: str):
    """None, or a tuning of `adapter` (a status's tuning is of the adapter it says it uses)."""
    return st.none() | st.integers(1, m.MAX_EPOCHS).flatmap(
        lambda n: st.builds(m.TuningProgress, st.just(adapter), st.integers(1, n), st.just(n))
    )


statuses = st.builds(
    m.AgentStatus,
    state=st.sampled_from(["online", "offline"]),
    bundle_id=ids,
    adapter_version=st.just("") | ids,
    last_round=st.integers(-1, MAX_ROUND),
    versions=st.dictionaries(ids, ids, max_size=4),
    device=st.dictionaries(ids, st.none() | ids | st.integers(0, 64), max_size=5),
    groups=st.lists(ids, max_size=4).map(tuple),
    num_samples=st.integers(0, m.MAX_SAMPLES),
    notice=small_text,
).flatmap(lambda s: _tunings(s.adapter_version).map(lambda t: dataclasses.replace(s, tuning=t)))


metrics = st.builds(
    m.AckMetrics, accuracy=st.none() | unit, loss=st.none() | finite, num_samples=st.integers(0, 99)
)
acks = st.builds(
    m.Ack,
    rollout=st.integers(1, m.MAX_ROLLOUT_ID),
    status=st.sampled_from(m.ACK_STATUSES),
    version=ids,
    reason=small_text,
    previous_version=st.just("") | ids,
    new=metrics,
    current=metrics,
)
pushes = st.builds(
    m.AdapterPush,
    version=ids,
    bundle_id=ids,
    rollout=st.integers(0, 10**6),
    stage=st.sampled_from(["", "canary", "all"]),
    rollout_version=ids,
    parent_version=st.just("") | ids,
    strategy=st.sampled_from(["fedavg", "ce-lora"]),
    kind=st.sampled_from(["lora", "tri-lora"]),
    round_id=st.integers(-1, MAX_ROUND),
    adapter=st.just(ADAPTER),
)
commands = st.one_of(
    st.builds(
        m.RolloutCommand,
        command=st.just("rollback"),
        rollout=st.integers(1, 10**9),
        version=ids,
        reason=small_text,
    ),
    st.builds(m.RolloutCommand, command=st.just("pin"), version=ids),
    st.builds(m.RolloutCommand, command=st.just("unpin")),
)
coord = st.builds(
    m.CoordinatorStatus,
    state=st.sampled_from(["online", "offline"]),
    bundle_id=ids,
    round_id=st.integers(0, MAX_ROUND),
    strategy=st.sampled_from(["fedavg", "ce-lora"]),
    bundle_url=st.just("") | st.just("http://127.0.0.1:8080"),
)
EVERY = {
    "task": tasks,
    "update": updates,
    "status": statuses,
    "ack": acks,
    "push": pushes,
    "command": commands,
    "coordinator": coord,
}


@pytest.mark.parametrize("kind", sorted(EVERY))
@SETTINGS
@given(data=st.data())
def test_every_message_roundtrips(kind, data):
    obj = data.draw(EVERY[kind])
    same(obj, roundtrip(obj))


KEY = generate_key()


@pytest.mark.parametrize("kind", sorted(EVERY))
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_signed_messages_verify_and_a_changed_byte_does_not(kind, data):
    obj = data.draw(EVERY[kind])
    payload = m.encode(obj, FLEET, AGENT, key=KEY)
    same(obj, m.decode(type(obj), payload, fleet=FLEET, agent=AGENT, public_key=KEY.public_key()))
    other = generate_key().public_key()
    with pytest.raises(WireError, match="signature does not verify"):
        m.decode(type(obj), payload, fleet=FLEET, agent=AGENT, public_key=other)
    unsigned = m.encode(obj, FLEET, AGENT)
    with pytest.raises(WireError, match="unsigned message"):
        m.decode(type(obj), unsigned, fleet=FLEET, agent=AGENT, public_key=KEY.public_key())


def test_envelope_agent_must_be_the_topics_agent():
    payload = m.encode(m.AgentStatus("online"), FLEET, "cam-01")
    with pytest.raises(WireError, match="names agent 'cam-01', the topic 'cam-02'"):
        m.decode(m.AgentStatus, payload, fleet=FLEET, agent="cam-02")


def test_wrong_type_is_refused():
    payload = m.encode(m.AgentStatus("online"), FLEET, AGENT)
    with pytest.raises(WireError, match="unexpected message type"):
        m.decode(m.Ack, payload, fleet=FLEET)


# ---- hostile bodies --------------------------------------------------------------------------
VALID = {
    m.Task: m.Task(3, "b1", 100.0, adapter=ADAPTER),
    m.Update: m.Update(3, "b1", 10, metrics={"loss": 1.0}, adapter=ADAPTER),
    m.AgentStatus: m.AgentStatus(
        "online",
        "b1",
        last_round=2,
        groups=("g",),
        device={"kind": "cpu"},
        adapter_version="v1",
        personal={"accuracy": 0.8, "mu": 1.5},
        tuning=m.TuningProgress("v1", 3, 15),
    ),
    m.Ack: m.Ack(4, "installed", "v1", new=m.AckMetrics(0.5, 1.0, 10)),
    m.AdapterPush: m.AdapterPush(
        "v1", "b1", rollout=2, adapter=ADAPTER, fallback_version="g-r1", fallback={"x.lora_A": ADAPTER_B}
    ),
    m.RolloutCommand: m.RolloutCommand("rollback", 2, "v1"),
    m.CoordinatorStatus: m.CoordinatorStatus("online", "b1", 3),
}
HUGE = 2**63
BAD_VALUES = {"huge": HUGE, "nan": math.nan, "list": [1], "object": {"a": 1}, "bool": True, "none": None}


def hostile_payload(obj: m.WireBody, body: dict) -> bytes:
    """The envelope of `obj` with `body`, written as a hostile sender would (NaN allowed in JSON)."""
    env = m.envelope(obj, FLEET, AGENT)
    tensors = obj.tensors()
    header = dict(Envelope(env.type, FLEET, AGENT, env.round, env.base_version, {}, 1.0).fields(), body=body)
    header["tensors_sha256"] = tensors_digest(tensors) if tensors else ""
    text = json.dumps(header)
    return encode_tensors(tensors, {"fedclip": text}) if tensors else text.encode()


def cases():
    for cls, obj in VALID.items():
        body = obj.to_body()
        for key in body:
            for name, value in BAD_VALUES.items():
                if value is None and key in ("max_steps",):
                    continue
                yield pytest.param(cls, key, name, {**body, key: value}, id=f"{cls.__name__}-{key}-{name}")
        yield pytest.param(cls, "sneaky", "extra", {**body, "sneaky": 1}, id=f"{cls.__name__}-extra-field")


def accepts(cls, body) -> bool:
    obj = VALID[cls]
    try:
        m.decode(cls, hostile_payload(obj, body), fleet=FLEET, agent=AGENT, where="t")
    except WireError as e:
        text = str(e)
        assert "\n" not in text and text.startswith("t: "), text
        return False
    return True


# A few replacements are valid values of the field (True for a bool, {"a": 1} for a metrics or
# device object, a missing adapter version that the envelope's base version stands in for): listed so
# that every other one must be refused.
STILL_VALID = {
    ("Task", "reset_optimizer", "bool"),
    ("Update", "metrics", "object"),
    ("AgentStatus", "device", "object"),
    ("AgentStatus", "personal", "object"),
    ("AdapterPush", "version", "none"),
}


@pytest.mark.parametrize("cls,key,kind,body", list(cases()))
def test_hostile_bodies_are_refused_with_one_line(cls, key, kind, body):
    if (cls.__name__, key, kind) in STILL_VALID:
        assert accepts(cls, body)
    else:
        assert not accepts(cls, body), f"{cls.__name__}.{key}={body[key]!r} was accepted"


@pytest.mark.parametrize(
    "tuning",
    [
        {"adapter": "v1", "epoch": 16, "epochs": 15},  # past its last epoch
        {"adapter": "v1", "epoch": 0, "epochs": 15},  # epochs count from 1
        {"adapter": "v1", "epoch": 1, "epochs": m.MAX_EPOCHS + 1},
        {"adapter": "v1", "epoch": HUGE, "epochs": 15},
        {"adapter": "v1", "epoch": 2.0, "epochs": 15},
        {"adapter": "v1", "epoch": True, "epochs": 15},
        {"adapter": "x" * 129, "epoch": 1, "epochs": 15},
        {"adapter": 7, "epoch": 1, "epochs": 15},
        {"epoch": 1, "epochs": 15},
        {"adapter": "v1", "epoch": 1, "epochs": 15, "eta": 3},
        {"adapter": "v2", "epoch": 1, "epochs": 15},  # not the adapter the status says it uses
    ],
)
def test_hostile_tuning_progress_is_refused(tuning):
    body = {**VALID[m.AgentStatus].to_body(), "tuning": tuning}
    assert not accepts(m.AgentStatus, body)


@pytest.mark.parametrize("cls", list(VALID))
def test_missing_required_fields_are_refused(cls):
    body = VALID[cls].to_body()
    required = {
        m.Task: ["bundle_id"],
        m.Update: ["bundle_id", "num_samples"],
        m.AgentStatus: ["state"],
        m.Ack: ["rollout", "status"],
        m.AdapterPush: ["bundle_id"],
        m.RolloutCommand: ["command", "rollout"],
        m.CoordinatorStatus: ["state", "bundle_id"],
    }[cls]
    for key in required:
        assert not accepts(cls, {k: v for k, v in body.items() if k != key}), key


# The status body fields every coordinator since schema 1's `tuning` knows: a status with another
# field is refused whole by those coordinators, so what agents add later travels inside these.
STATUS_FIELDS_EVERY_COORDINATOR_KNOWS = {
    "state", "bundle_id", "adapter_version", "last_round", "versions", "device", "groups", "num_samples",
    "notice", "personal", "tuning",
}  # fmt: skip


def test_a_status_names_the_fleets_adapter_in_its_device_map():
    """The fallback a device keeps (rollout --fallback) rides in `device`, which every coordinator
    reads; a junk value there names none."""
    said = m.AgentStatus(
        "online", adapter_version="a-x-r1", device={"kind": "cpu", m.DEVICE_FALLBACK: "g-r1"}
    )
    assert set(said.to_body()) <= STATUS_FIELDS_EVERY_COORDINATOR_KNOWS
    assert m.decode(m.AgentStatus, m.encode(said, FLEET, AGENT), fleet=FLEET).fallback_version == "g-r1"
    for junk in ("../g", "x" * 200, 7, None, ""):
        assert m.AgentStatus("online", device={m.DEVICE_FALLBACK: junk}).fallback_version == ""


def test_wire_features_are_read_from_the_status_versions():
    """What an agent takes beyond schema 1 travels in `versions` (a field every coordinator reads)."""
    versions = {"python": "3.11", m.FEATURES_KEY: "fallback,later-thing"}
    said = m.AgentStatus("online", versions=versions)
    got = m.decode(m.AgentStatus, m.encode(said, FLEET, AGENT), fleet=FLEET).versions
    assert m.wire_features(got) == {"fallback", "later-thing"}
    assert m.wire_features({"python": "3.11"}) == frozenset() == m.wire_features({m.FEATURES_KEY: ""})
    assert m.wire_features({m.FEATURES_KEY: " fallback , x,,"}) == {"fallback", "x"}
    assert len(",".join(m.AGENT_FEATURES)) <= MAX_NAME  # every coordinator cuts versions values there


def test_hyperparameters_bounds_hold_for_builders_too():
    with pytest.raises(WireError, match="epochs"):
        m.Hyperparameters(epochs=m.MAX_EPOCHS + 1)
    with pytest.raises(WireError, match="'lr' must be > 0"):
        m.Hyperparameters(lr=0.0)


def test_update_statistics_vocabulary():
    upd = m.Update(1, "b", 5, adapter=ADAPTER, stats={"stats/secret": np.ones(2, np.float32)})
    with pytest.raises(WireError, match="unknown statistic 'stats/secret'"):
        roundtrip(upd)
    ok = m.Update(1, "b", 5, adapter=ADAPTER, stats={STAT_MEAN: np.ones((3, 2), np.float32)})
    assert set(roundtrip(ok).stats) == {STAT_MEAN}
    assert m.KNOWN_STATS == {n for names in m.STATS_TENSORS.values() for n in names}


def test_adapter_push_needs_tensors_or_url():
    with pytest.raises(WireError, match="neither tensors nor a url"):
        roundtrip(m.AdapterPush("v1", "b1"))
    by_url = m.AdapterPush("v1", "b1", url="http://127.0.0.1:1/a.safetensors", sha256="0" * 64, size=5)
    same(by_url, roundtrip(by_url))
    with pytest.raises(WireError, match="http"):
        roundtrip(m.AdapterPush("v1", "b1", url="file:///etc/passwd", sha256="0" * 64))


def test_an_adapter_push_carries_its_fallback_signed_and_never_half_of_it():
    key = generate_key()
    push = VALID[m.AdapterPush]
    back = roundtrip(push, key=key, public_key=key.public_key())
    same(push, back)
    assert set(back.adapter) == set(ADAPTER) and set(back.fallback) == {"x.lora_A"}
    # the signature covers the fallback: a changed fallback tensor does not verify
    env = m.envelope(push, FLEET, AGENT)
    signed = sign_envelope(key, env, push.tensors())
    forged = {**push.tensors(), "fallback/x.lora_A": ADAPTER_B + 1}
    with pytest.raises(WireError, match="does not verify|digest"):
        m.decode(m.AdapterPush, wire_encode(signed, forged), fleet=FLEET, public_key=key.public_key())
    # a push without one reads as before to agents that predate it: no new body field
    assert "fallback_version" not in m.AdapterPush("v1", "b1", adapter=ADAPTER).to_body()
    for body, tensors, why in (
        (
            {"version": "v1", "bundle_id": "b1"},
            {**ADAPTER, "fallback/x": ADAPTER_B},
            "without a 'fallback_version'",
        ),
        ({"version": "v1", "bundle_id": "b1", "fallback_version": "g-r1"}, ADAPTER, "without its tensors"),
        ({"version": "v1", "bundle_id": "b1", "fallback_version": "../g"}, ADAPTER, "not a valid id"),
    ):
        payload = wire_encode(Envelope(MsgType.ADAPTER, FLEET, AGENT, body=body), tensors)
        with pytest.raises(WireError, match=why) as info:
            m.decode(m.AdapterPush, payload, fleet=FLEET)
        assert "\n" not in str(info.value)
    # by URL the fallback is in the fetched file, split as inline tensors are
    url = "http://127.0.0.1:1/a.safetensors"
    by_url = m.AdapterPush("v1", "b1", url=url, sha256="0" * 64, size=5, fallback_version="g-r1")
    got = roundtrip(by_url).with_fetched(push.tensors(), "fetched")
    assert set(got.adapter) == set(ADAPTER) and set(got.fallback) == {"x.lora_A"}
    with pytest.raises(WireError, match="without its tensors"):
        roundtrip(by_url).with_fetched(ADAPTER, "fetched")
    with pytest.raises(WireError, match="no adapter tensors"):
        roundtrip(by_url).with_fetched({"fallback/x.lora_A": ADAPTER_B}, "fetched")
    with pytest.raises(WireError, match="by URL carries no tensors"):  # they would not be the file's
        roundtrip(dataclasses.replace(by_url, fallback={"x.lora_A": ADAPTER_B}))


def test_task_round_must_exist_and_huge_rounds_never_parse():
    task = VALID[m.Task]
    env = m.envelope(task, FLEET, AGENT)
    for rnd, reason in ((-1, "no round id"), (MAX_ROUND + 1, "'round' must be an integer in")):
        payload = wire_encode(Envelope(MsgType.TASK, FLEET, AGENT, rnd, "", env.body), ADAPTER)
        with pytest.raises(WireError, match=reason):
            m.decode(m.Task, payload, fleet=FLEET)
