"""`coordinator.validation`: every rule of update validation on its own, without a broker, and the one
parser of agent status messages (`coordinator.fleet`)."""

from __future__ import annotations

import numpy as np
import pytest

from fedclip.coordinator.fleet import Fleet, parse_status
from fedclip.coordinator.registry import load_initial_adapter
from fedclip.coordinator.validation import NormBound, validate_update
from fedclip.sdk.errors import AdapterError, WireError
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.wire import Envelope, MsgType, Topics, decode, encode

FLEET = "v1"


@pytest.fixture(scope="module")
def setup(tiny_bundle):
    manifest = Manifest.load(tiny_bundle)
    return manifest, load_initial_adapter(tiny_bundle, manifest)


def _update(manifest, start, *, agent="a", base="g-r0", delta=0.0, tensors=None, stats=None, **body):
    tensors = {k: v + np.float32(delta) for k, v in start.items()} if tensors is None else tensors
    fields = {"bundle_id": manifest.bundle_id, "num_samples": 10, "metrics": {"accuracy": 0.5}, **body}
    env = Envelope(MsgType.UPDATE, FLEET, agent, round=1, base_version=base, body=fields)
    return decode(encode(env, {**tensors, **(stats or {})}), fleet=FLEET)


def _check(manifest, start, msg, agent="a", needed=(), bound=NormBound()):
    return validate_update(
        agent,
        msg,
        round_id=1,
        selected={"a": "g-r0", "b": "g-r0"},
        manifest=manifest,
        strategy="test",
        needed_stats=needed,
        start_tensors=lambda version: start,
        bound=bound,
        where=f"update of {agent}",
    )


def test_a_good_update_is_accepted_with_its_norm(setup):
    manifest, start = setup
    ok = _check(manifest, start, _update(manifest, start, delta=0.5))
    n = sum(v.size for v in start.values())
    assert ok.agent == "a" and ok.num_samples == 10 and ok.metrics == {"accuracy": 0.5}
    assert ok.norm == pytest.approx(0.5 * np.sqrt(n), rel=1e-5) and not ok.clipped
    assert len(ok.sha) == 64 and ok.stats == {}


def test_norm_bound_rejects_or_clips(setup):
    manifest, start = setup
    msg = _update(manifest, start, delta=0.5)
    with pytest.raises(WireError, match="update norm .* exceeds the bound 1"):
        _check(manifest, start, msg, bound=NormBound(1.0, "reject"))
    clipped = _check(manifest, start, msg, bound=NormBound(1.0, "clip"))
    assert clipped.clipped
    d = np.sqrt(sum(float(((clipped.tensors[k] - start[k]) ** 2).sum()) for k in start))
    assert d == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(agent="b"), "claims to be from agent 'b'"),
        (dict(base="g-r7"), "built on 'g-r7'"),
        (dict(bundle_id="f" * 64), "for bundle ffffffffffff"),
        (dict(num_samples=-1), "num_samples must be >= 0"),
        (dict(num_samples=True), "num_samples"),
        (dict(metrics={"loss": "low"}), "metric 'loss' is not a number"),
        (dict(metrics={"ok": True}), "metric 'ok' is not a number"),
        (dict(metrics=[1, 2]), "'metrics' must be an object"),
        (dict(stats={"stats/raw": np.zeros(3, np.float32)}), "unknown statistic 'stats/raw'"),
        (dict(stats={"stats/label_hist": np.zeros(3, np.float32)}), "statistic 'stats/label_hist' has shape"),
        (dict(stats={"stats/label_hist": -np.ones(10, np.float32)}), "negative values"),
    ],
)
def test_each_rule_rejects_with_a_one_line_reason(setup, change, needle):
    manifest, start = setup
    stats = change.pop("stats", None)
    msg = _update(manifest, start, stats=stats, **change)
    with pytest.raises(WireError) as e:
        _check(manifest, start, msg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_selection_tensors_and_needed_statistics(setup):
    manifest, start = setup
    with pytest.raises(WireError, match="'zed' was not selected"):
        _check(manifest, start, _update(manifest, start, agent="zed"), agent="zed")
    name = sorted(start)[0]
    with pytest.raises(AdapterError, match="shape"):
        _check(manifest, start, _update(manifest, start, tensors={**start, name: np.zeros(3, np.float32)}))
    with pytest.raises(WireError, match=r"'stats/mean' is missing \(test needs gaussian\)"):
        _check(manifest, start, _update(manifest, start), needed=("gaussian",))
    hist = np.ones(len(manifest.task.labels), np.float32)
    ok = _check(
        manifest, start, _update(manifest, start, stats={"stats/label_hist": hist}), needed=("histogram",)
    )
    np.testing.assert_array_equal(ok.stats["stats/label_hist"], hist)


def _status(agent: str, **body) -> bytes:
    return encode(Envelope(MsgType.STATUS, FLEET, agent, body=body))


def test_one_status_parser_for_rounds_and_rollouts():
    topics = Topics(FLEET)
    topic = topics.status("cam1")
    info = parse_status(
        topics,
        topic,
        _status("cam1", state="online", bundle_id="b1", groups=["lab", "bad/group", 3], last_round=4),
    )
    assert (info.id, info.online, info.groups, info.bundle_id, info.last_round) == (
        "cam1",
        True,
        ("lab",),
        "b1",
        4,
    )
    assert info.info["groups"] == ["lab", "bad/group", 3]  # kept as sent for the status table
    assert parse_status(topics, topic, _status("cam2", state="online")) is None  # on another's topic
    assert parse_status(topics, topic, _status("cam1", state="sleeping")) is None
    assert parse_status(topics, topic, b"garbage") is None
    assert parse_status(topics, topics.update("cam1"), _status("cam1", state="online")) is None
    assert parse_status(topics, topic, b"") is None
    fleet = Fleet()
    fleet.on_status("cam1", info)
    assert fleet.compatible_online("b1") == ["cam1"] and fleet.online_count() == 1
    fleet.on_status("cam1", None)  # an emptied retained status forgets the agent
    assert fleet.compatible_online("b1") == []
