"""`coordinator.validation`: every rule of update validation on its own, without a broker, and the one
parser of agent status messages (`coordinator.fleet`)."""

from __future__ import annotations

import numpy as np
import pytest

from fedclip.coordinator.fleet import Fleet, parse_status
from fedclip.coordinator.registry import load_initial_adapter
from fedclip.coordinator.validation import HeldStats, NormBound, validate_update
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
        (dict(num_samples=-1), "'num_samples' must be an integer in [0, 2147483647]"),
        (dict(num_samples=2**63), "'num_samples' must be an integer in [0, 2147483647]"),
        (dict(num_samples=True), "num_samples"),
        (dict(metrics={"loss": "low"}), "metrics 'loss' is not a finite number"),
        (dict(metrics={"ok": True}), "metrics 'ok' is not a finite number"),
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
        topics, topic, _status("cam1", state="online", bundle_id="b1", groups=["lab"], last_round=4)
    )
    assert (info.id, info.online, info.groups, info.bundle_id, info.last_round) == (
        "cam1",
        True,
        ("lab",),
        "b1",
        4,
    )
    assert info.info["groups"] == ["lab"]
    # a group that is no id, a huge round: the whole status is refused (sdk.messages.AgentStatus)
    assert parse_status(topics, topic, _status("cam1", state="online", groups=["lab", "bad/group"])) is None
    assert parse_status(topics, topic, _status("cam1", state="online", groups=[3])) is None
    assert parse_status(topics, topic, _status("cam1", state="online", last_round=2**63)) is None
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


# ---- statistics held by the coordinator (they travel once per agent and data) ------------------
def _gauss(manifest, value=0.1, dtype=np.float16):
    labels, dim = len(manifest.task.labels), manifest.base_model.embed_dim
    return {
        "stats/label_hist": np.ones(labels, np.float32),
        "stats/mean": np.full((labels, dim), value, dtype),
        "stats/var": np.full((labels, dim), 0.01, dtype),
    }


def _check_held(manifest, start, msg, held):
    return validate_update(
        "a",
        msg,
        round_id=1,
        selected={"a": "g-r0"},
        manifest=manifest,
        strategy="ce-lora",
        needed_stats=("histogram", "gaussian"),
        start_tensors=lambda version: start,
        held_stats=lambda agent: held if agent == "a" else None,
        where="update of a",
    )


def test_float16_statistics_are_accepted_as_float32_and_marked_sent(setup):
    manifest, start = setup
    sent = _gauss(manifest)
    ok = _check_held(manifest, start, _update(manifest, start, stats=sent, data_digest="d1"), None)
    assert ok.stats_sent and ok.data_digest == "d1"
    assert all(v.dtype == np.float32 for v in ok.stats.values())
    np.testing.assert_allclose(ok.stats["stats/mean"], sent["stats/mean"].astype(np.float32))


def test_missing_gaussian_statistics_use_the_held_ones_for_the_same_data(setup):
    manifest, start = setup
    stored = {k: v.astype(np.float32) for k, v in _gauss(manifest, value=0.3).items()}
    held = HeldStats("d1", stored)
    hist = {"stats/label_hist": np.full(len(manifest.task.labels), 2.0, np.float32)}
    ok = _check_held(manifest, start, _update(manifest, start, stats=hist, data_digest="d1"), held)
    assert not ok.stats_sent and ok.data_digest == "d1"
    np.testing.assert_array_equal(ok.stats["stats/mean"], stored["stats/mean"])
    np.testing.assert_array_equal(ok.stats["stats/var"], stored["stats/var"])
    np.testing.assert_array_equal(ok.stats["stats/label_hist"], hist["stats/label_hist"])  # the fresh one


@pytest.mark.parametrize(
    "digest, held, needle",
    [
        ("d2", "d1", "holds none for data digest d2"),  # the data changed
        (None, "d1", "holds none for data digest (none)"),  # an agent that names no digest
        ("d1", None, "holds none for data digest d1"),  # nothing held (a new state dir)
        ("", "", "holds none for data digest (none)"),  # "" never matches, not even ""
    ],
)
def test_missing_statistics_without_matching_held_ones_are_rejected(setup, digest, held, needle):
    manifest, start = setup
    held_stats = None if held is None else HeldStats(held, _gauss(manifest, dtype=np.float32))
    body = {} if digest is None else {"data_digest": digest}
    hist = {"stats/label_hist": np.ones(len(manifest.task.labels), np.float32)}
    with pytest.raises(WireError) as e:
        _check_held(manifest, start, _update(manifest, start, stats=hist, **body), held_stats)
    assert "statistic 'stats/mean' is missing (ce-lora needs gaussian)" in str(e.value)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_half_the_gaussian_statistics_is_never_completed_from_held_ones(setup):
    manifest, start = setup
    held = HeldStats("d1", _gauss(manifest, dtype=np.float32))
    partial = {k: v for k, v in _gauss(manifest).items() if k != "stats/var"}
    with pytest.raises(WireError, match="statistic 'stats/var' is missing"):
        _check_held(manifest, start, _update(manifest, start, stats=partial, data_digest="d1"), held)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float16_statistics_are_rejected_when_decoded(setup, bad):
    manifest, start = setup
    stats = _gauss(manifest)
    stats["stats/var"][0, 0] = bad
    env = Envelope(MsgType.UPDATE, FLEET, "a", round=1, base_version="g-r0", body={"bundle_id": "x"})
    with pytest.raises(WireError, match="tensor 'stats/var' has non-finite values"):
        decode(encode(env, {**start, **stats}), fleet=FLEET)


def test_negative_float16_variance_and_bad_digests_are_rejected(setup):
    manifest, start = setup
    stats = _gauss(manifest)
    stats["stats/var"][1, 2] = np.float16(-0.01)
    with pytest.raises(WireError, match="statistic 'stats/var' has negative values"):
        _check_held(manifest, start, _update(manifest, start, stats=stats, data_digest="d1"), None)
    for bad in ("x" * 129, 12):
        with pytest.raises(WireError, match="'data_digest' must be a string of at most 128 chars"):
            _check_held(
                manifest, start, _update(manifest, start, stats=_gauss(manifest), data_digest=bad), None
            )
