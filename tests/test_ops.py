"""The operator's views of a real run: `/metrics` (parsed with prometheus_client's parser), the
dashboard's JSON document, every `--json` output of the coordinator's commands, and basic auth.

Everything real: mosquitto, `fedclip-coord serve --ops-port` in its own process, scripted agents
over MQTT (tests/ops_fleet.py), the CLI in subprocesses; expected values come from the real store.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from ops_fleet import WAIT_S, GroupAgent, ServeWithOps, eventually, play_round, sample, scrape
from test_rollout_serve import _coord

from fedclip.coordinator.fleet_view import REJECTION_KINDS, rejection_kind
from fedclip.coordinator.ops_server import OpsServer, read_credentials
from fedclip.coordinator.registry import Registry
from fedclip.coordinator.store import Store
from fedclip.coordinator.store.rows import agent_values
from fedclip.sdk.broker_ports import free_port, wait_for_port
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.wire import Topics

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]


def _json(*args: str):
    out = _coord(*args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def lora_bundle(bundle_factory):
    return bundle_factory(adapter="lora", labels=("a", "b", "c"))


def _expected(state) -> dict:
    """What the metrics must say, from the store's own public methods."""
    with Store(state, readonly=True) as s:
        rounds = s.rounds()
        updates = [u for r in rounds for u in s.updates(r.round)]
        task_bytes = sum(s.blobs.size(blob) for r in rounds for _, blob in s.selections(r.round).values())
        return {
            "aggregated": sum(r.state == "aggregated" for r in rounds),
            "collecting": sum(r.state == "collecting" for r in rounds),
            "accepted": len(updates),
            "bytes_in": sum(u.wire_bytes for u in updates),
            "bytes_out": task_bytes,
            "rejections": [reason for _, _, _, reason in s.rejections()],
        }


def test_metrics_dashboard_json_and_cli_json_follow_a_real_run(mosquitto, lora_bundle, tmp_path):
    bundle_id = Manifest.load(lora_bundle).bundle_id
    state = tmp_path / "state"
    agents = [
        GroupAgent(mosquitto.url, "cam1", bundle_id, groups=("lab",)),
        GroupAgent(mosquitto.url, "cam2", bundle_id, tuning=("g-r0", 3, 15)),
    ]
    creds = ("prom", "scrape-pw")
    (tmp_path / "ops.auth").write_text(":".join(creds) + "\n")
    serve = ServeWithOps(
        mosquitto.url,
        lora_bundle,
        state,
        tmp_path / "serve.log",
        2,
        "--ops-auth-file",
        str(tmp_path / "ops.auth"),
    )
    try:
        serve.wait_up(creds)
        assert serve.get("/metrics")[0] == 401  # --ops-auth-file reached the endpoint
        play_round(agents, 1, accuracy=0.4)
        # garbage on an update topic: rejected as malformed, counted by reason
        agents[0].session.publish(Topics("t1").update("cam1"), b"\x00garbage", qos=1)
        tasks2 = [a.task(2, timeout=WAIT_S) for a in agents]  # round 1 aggregated, round 2 collecting

        # ---- /metrics during the run ----
        def scraped():
            status, headers, body = serve.get("/metrics", creds)
            assert status == 200 and headers["Content-Type"].startswith("text/plain")
            m = scrape(body.decode())
            return m if sample(m, "fedclip_updates_rejected_total", reason="malformed") >= 1 else None

        m = eventually(scraped, "the rejection in /metrics")
        want = _expected(state)
        assert want["aggregated"] == 1 and want["collecting"] == 1 and want["accepted"] == 2
        assert sample(m, "fedclip_state_readable") == 1
        assert sample(m, "fedclip_rounds", state="aggregated") == 1
        assert sample(m, "fedclip_rounds", state="collecting") == 1
        assert sample(m, "fedclip_rounds", state="failed") == 0
        assert sample(m, "fedclip_round_last") == 2
        assert sample(m, "fedclip_updates_accepted_total") == want["accepted"]
        assert sample(m, "fedclip_update_bytes_received_total") == want["bytes_in"] > 0
        assert sample(m, "fedclip_task_bytes_sent_total") == want["bytes_out"] > 0
        assert sum(v for (n, _), v in m.items() if n == "fedclip_updates_rejected_total") == len(
            want["rejections"]
        )
        assert sample(m, "fedclip_agents_online", group="lab", bundle=bundle_id[:12]) == 1
        assert sample(m, "fedclip_agents_online", group="", bundle=bundle_id[:12]) == 1
        assert sample(m, "fedclip_agents_known") == 2
        # cam1's gate falls back to the fleet's g-r0 (ops_fleet.GroupAgent's status), cam2's to the base
        assert sample(m, "fedclip_agents_open_set_fallback", version="g-r0") == 1
        assert sample(m, "fedclip_agents_open_set_fallback", version="") == 1
        assert sample(m, "fedclip_round_duration_seconds_count") == 1  # round 1 closed
        assert sample(m, "fedclip_aggregation_duration_seconds_count") == 1
        assert sample(m, "fedclip_round_duration_seconds_bucket", le="+Inf") == 1
        assert sample(m, "fedclip_fleet_metric", name="accuracy") == pytest.approx(0.4)

        # ---- the dashboard's JSON document ----
        status, headers, body = serve.get("/api/fleet", creds)
        assert status == 200 and headers["Content-Type"] == "application/json"
        doc = json.loads(body)
        assert doc["fleet"] == "t1" and doc["bundle_id"] == bundle_id and doc["global_version"] == "g-r1"
        assert [(r["round"], r["state"]) for r in doc["rounds"]] == [(1, "aggregated"), (2, "collecting")]
        r1 = doc["rounds"][0]
        assert (r1["updates"], r1["selected"], r1["bytes_in"]) == (2, 2, want["bytes_in"])
        # serve's default loss, resolved for this classify bundle; known once the round closed
        assert (r1["loss"], doc["rounds"][1]["loss"]) == ("balanced-softmax", None)
        assert r1["metrics"]["accuracy"] == pytest.approx(0.4) and r1["duration_s"] > 0
        by_agent = {a["agent"]: a for a in doc["agents"]}
        assert by_agent["cam1"]["online"] and by_agent["cam1"]["groups"] == ["lab"]
        assert by_agent["cam1"]["device_tuning"] == {"accuracy": 0.7, "accuracy_fleet": 0.5, "mu": 1.5}
        assert by_agent["cam2"]["device_tuning"] is None and by_agent["cam1"]["tuning_progress"] is None
        assert by_agent["cam2"]["tuning_progress"] == {"adapter": "g-r0", "epoch": 3, "epochs": 15}
        assert (by_agent["cam1"]["open_set_fallback"], by_agent["cam2"]["open_set_fallback"]) == (
            "g-r0",
            None,
        )
        assert by_agent["cam1"]["metrics"]["accuracy"] == pytest.approx(0.4)
        assert [v["version"] for v in doc["versions"]] == ["g-r0", "g-r1"]
        assert doc["versions"][1]["parent"] == "g-r0"
        assert doc["rejections"][0]["kind"] == "malformed" and doc["rejections"][0]["agent"] == "cam1"
        assert doc["rollouts"] == []

        # ---- read-only and no path escapes ----
        assert serve.get("/assets/../ops_server.py", creds)[0] == 404
        assert serve.get("/assets/dashboard.js", creds)[0] == 200
        assert serve.get("/nope", creds)[0] == 404

        for a, t in zip(agents, tasks2, strict=True):
            a.send(a.update(t, 0.6, num_samples=10))
        assert serve.finish() == 0, serve.log_path.read_text()[-3000:]
    finally:
        for a in agents:
            a.close()
        serve.stop()
    assert "Prometheus metrics at " + serve.url in serve.log_path.read_text()

    # ---- every --json output of the CLI, on the finished state dir ----
    st = _json("status", "--state", str(state), "--json")
    assert st["fleet"] == "t1" and st["global_version"] == "g-r2" and st["schema"] == 1
    assert st["round_counts"] == {
        "aggregated": 2, "collecting": 0, "failed": 0, "last": 2, "last_state": "aggregated"
    }  # fmt: skip
    assert st["fleet_metrics"] == {
        "round": 2,
        "metrics": {"accuracy": pytest.approx(0.6), "loss": pytest.approx(0.4), "updates": 2},
    }
    assert {a["agent"]: a["groups"] for a in st["agents"]} == {"cam1": ["lab"], "cam2": []}
    assert {a["agent"]: a["open_set_fallback"] for a in st["agents"]} == {"cam1": "g-r0", "cam2": None}
    table = _coord("status", "--state", str(state))  # the table names it beside the adapter in use
    assert table.returncode == 0 and "(fallback g-r0)" in table.stdout, table.stdout + table.stderr

    listed = _json("adapters", "list", "--state", str(state), "--json")["versions"]
    assert [(v["version"], v["parent"], v["round"], v["scope"]) for v in listed] == [
        ("g-r0", None, 0, "global"),
        ("g-r1", "g-r0", 1, "global"),
        ("g-r2", "g-r1", 2, "global"),
    ]
    shown = _json("adapters", "show", "g-r2", "--state", str(state), "--json")
    assert shown["parent"] == "g-r1" and shown["bundle_id"] == bundle_id and shown["tensors"]
    assert {k: shown[k] for k in ("version", "round", "scope")} == {
        "version": "g-r2",
        "round": 2,
        "scope": "global",
    }

    # the same metrics from `fedclip-coord dashboard`'s server with no coordinator running
    with OpsServer(state) as ops:
        m = scrape(ops.metrics().decode())
    want = _expected(state)
    assert sample(m, "fedclip_rounds", state="aggregated") == 2 == want["aggregated"]
    assert sample(m, "fedclip_updates_accepted_total") == 4 == want["accepted"]
    assert sample(m, "fedclip_agents_online", group="lab", bundle=bundle_id[:12]) == 1


def test_basic_auth_read_only_and_one_line_errors(tmp_path):
    # a state dir from the real store (no broker needed to read one)
    state = tmp_path / "state"
    with Store(state) as s:
        s.set_meta("fleet", "f1")
    auth = tmp_path / "ops.auth"
    auth.write_text("operator:s3cret pass\n")
    with OpsServer(state, credentials=read_credentials(auth)) as ops:

        def get(path, header=None, method="GET"):
            req = urllib.request.Request(ops.url + path, method=method)
            if header:
                req.add_header("Authorization", header)
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, dict(r.headers), r.read()
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), e.read()

        good = "Basic " + base64.b64encode(b"operator:s3cret pass").decode()
        wrong = "Basic " + base64.b64encode(b"operator:guess").decode()
        for path in ("/", "/metrics", "/api/fleet", "/assets/dashboard.js"):
            status, headers, _ = get(path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Basic"), path
            assert get(path, wrong)[0] == 401
            assert get(path, "Basic !!notbase64")[0] == 401
            assert get(path, good)[0] == 200, path
        assert get("/metrics", good, method="POST")[0] == 405
        doc = json.loads(get("/api/fleet", good)[2])
        assert doc["fleet"] == "f1" and doc["agents"] == [] and doc["rounds"] == []
    for text in ("no colon here\n", ""):
        auth.write_text(text)
        out = _coord("dashboard", "--state", str(state), "--port", "0", "--auth-file", str(auth))
        assert out.returncode == 2 and "user:password" in out.stderr and out.stderr.count("\n") == 1
    out = _coord("dashboard", "--state", str(tmp_path / "nope"), "--port", "0")
    assert out.returncode == 2 and "no coordinator state" in out.stderr and out.stderr.count("\n") == 1
    out = _coord("status", "--state", str(tmp_path / "nope"), "--json")
    assert out.returncode == 2 and out.stdout == ""


@pytest.mark.parametrize(
    "reason,kind",
    [
        ("update on the topic of a: not a safetensors blob", "malformed"),
        ("update on the topic of a: round 99 is not the current round (1)", "wrong_round"),
        ("late: round aggregated", "late"),
        ("update on the topic of a: agent 'zed' was not selected for round 1", "not_selected"),
        ("update on the topic of b: claims to be from agent 'a'", "wrong_sender"),
        ("update on the topic of a: payload of 614400 bytes exceeds the limit", "too_large"),
        ("update on the topic of a: update norm 3e+04 exceeds the bound 100", "norm_bound"),
        ("update on the topic of a: tensor 'x' has non-finite values", "tensors"),
        ("update on the topic of a: unknown statistic 'stats/raw_images'", "statistics"),
        ("update on the topic of a: metric '<b>' is not a number", "metrics"),
        ("something nobody foresaw", "other"),
    ],
)
def test_rejection_kinds_are_bounded(reason, kind):
    assert rejection_kind(reason) == kind and kind in REJECTION_KINDS


def test_rollout_commands_json(mosquitto, tmp_path):
    """`rollout start/status/watch --json` with agents that really install and acknowledge."""
    from fixtures_rollout import FLEET as RFLEET
    from fixtures_rollout import HarnessAgent

    from fedclip.sdk.adapters import AdapterMeta, save_adapter
    from fedclip.sdk.signing import PUBLIC_KEY_NAME, ensure_keypair

    state = tmp_path / "coord"
    ensure_keypair(state / "keys")
    # rollout 1 from an adapter file, rollout 2 from the registry (`watch` resolves versions there)
    first_file = save_adapter(
        tmp_path / "v-one.safetensors", {"x.lora_A": np.ones((2, 2), np.float32)}, AdapterMeta("", "v-one")
    )
    with Store(state) as s:
        Registry(s, "", "lora").ensure_initial({"x.lora_A": np.zeros((2, 2), np.float32)}, "fedavg")

    def evaluate(tensors):  # the agent's local evaluation: the new adapter scores 0.8, no adapter 0.7
        return {"loss": 0.5, "accuracy": 0.7 if tensors is None else 0.8, "num_samples": 10}

    common = ["--state", str(state), "--broker", mosquitto.url, "--fleet", RFLEET]
    agents = [
        HarnessAgent(mosquitto.url, n, tmp_path / "agents" / n, state / "keys" / PUBLIC_KEY_NAME, evaluate)
        for n in ("a", "b")
    ]
    try:
        for a in agents:
            a.start()
        eventually(lambda: all(a.session.connected.is_set() for a in agents), "agents to connect")
        first = _json("rollout", "start", str(first_file), "--to", "all", "--canary", "0", "--wait",
                      "--wait-timeout", str(WAIT_S), "--json", *common)  # fmt: skip
        assert (first["id"], first["version"], first["state"], first["target"]) == (
            1,
            "v-one",
            "complete",
            "all",
        )
        assert sorted(first["targets"]) == ["a", "b"]
        assert [(s["name"], s["state"], sorted(s["agents"])) for s in first["stages"]] == [
            ("rest", "done", ["a", "b"])
        ]
        acks = {a["agent"]: a for a in first["acks"]}
        assert {a["status"] for a in acks.values()} == {"installed"}
        assert acks["a"]["new_accuracy"] == 0.8 and acks["a"]["current_accuracy"] == 0.7
        assert acks["a"]["regression"] == pytest.approx(-10.0)

        # a short stage: an ack that reaches `start` as it exits is lost (its session does not keep
        # it), so the rest stage may have to close on its deadline instead of on the ack
        started = _json("rollout", "start", "g-r0", "--to", "agents:a", "--canary", "0",
                        "--stage-timeout", "10", "--json", *common)  # fmt: skip
        assert started["id"] == 2 and started["state"] != "complete" and started["targets"] == ["a"]
        out = _coord("rollout", "watch", "2", "--wait-timeout", str(WAIT_S), "--json", *common)
        assert out.returncode == 0, out.stderr
        lines = [json.loads(x) for x in out.stdout.splitlines()]
        assert lines[-1]["type"] == "rollout" and lines[-1]["id"] == 2 and lines[-1]["state"] == "complete"
        events = [x for x in lines[:-1] if x["type"] == "event"]
        assert events and all(x["rollout"] == 2 and x["text"] for x in events)
        assert any(x["text"].startswith("complete") for x in events)
    finally:
        for a in agents:
            a.stop()

    listed = _json("rollout", "status", "--state", str(state), "--json")
    assert [(r["id"], r["state"]) for r in listed["rollouts"]] == [(2, "complete"), (1, "complete")]
    assert listed["pins"] == {}
    one = _json("rollout", "status", "1", "--state", str(state), "--json")
    assert one == first | {"updated_at": one["updated_at"]}
    assert one["fallback"] is False
    # --fallback needs a personalized round: g-r0 gives every agent the global adapter itself
    refused = _coord("rollout", "start", "g-r0", "--to", "agents:a", "--fallback", *common)
    assert refused.returncode != 0 and "--fallback: no target gets its own adapter of g-r0" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert [r["id"] for r in _json("rollout", "status", "--state", str(state), "--json")["rollouts"]] == [
        2,
        1,
    ]


def test_ops_settings_are_checked():
    from fedclip.coordinator.config import CoordConfig
    from fedclip.sdk.errors import ConfigError

    base = dict(broker="mqtt://h", fleet="f", bundle="b", state="s")
    with pytest.raises(ConfigError, match="ops_port: must be 0..65535"):
        CoordConfig.load(None, {**base, "ops_port": 70000})
    off = CoordConfig.load(None, base)
    assert off.ops_port is None and off.ops_host == "127.0.0.1" and off.ops_auth_file is None
    assert CoordConfig.load(None, {**base, "ops_port": 0}).ops_port == 0


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_dashboard_command_serves_a_state_dir_until_stopped(tmp_path, sig):
    state = tmp_path / "state"
    with Store(state) as s:
        s.set_meta("fleet", "f1")
        s.upsert_agents([agent_values("cam1", True, "b" * 64, "g-r0", 0, {"groups": ["lab"]}, time.time())])
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedclip.coordinator.cli", "dashboard", "--state", str(state),
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert wait_for_port("127.0.0.1", port, WAIT_S, alive=lambda: proc.poll() is None), proc.stderr.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            m = scrape(r.read().decode())
        assert sample(m, "fedclip_agents_online", group="lab", bundle="b" * 12) == 1
        assert sample(m, "fedclip_rounds", state="aggregated") == 0
    finally:
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err.strip().endswith("dashboard: stopped"), err
    assert f"http://127.0.0.1:{port}/metrics" in err


def test_concurrent_scrapes_and_polls_all_succeed(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    state = tmp_path / "state"
    with Store(state) as s:
        s.set_meta("fleet", "f1")
        s.start_round(1, "fedavg", 1.0, [(f"a{i}", "g-r0", "t") for i in range(20)])
        for i in range(20):
            s.upsert_agents(
                [agent_values(f"a{i}", True, "b" * 64, "", 0, {"groups": [f"g{i % 3}"]}, time.time())]
            )
    with OpsServer(state) as ops:

        def get(path: str) -> int:
            with urllib.request.urlopen(ops.url + path, timeout=60) as r:
                body = r.read()
            if path == "/api/fleet":
                assert len(json.loads(body)["agents"]) == 20
            else:
                assert sample(scrape(body.decode()), "fedclip_agents_known") == 20
            return r.status

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(get, ["/metrics", "/api/fleet"] * 20))
    assert statuses == [200] * 40
