"""`fedclip-agent serve-inference` as a real process: the JSON contract over TCP and a Unix socket, and
bad input (corrupt image, huge body, wrong JSON, ...) answered with a 4xx and one line, never a crash.
Its `/metrics` is scraped and parsed with prometheus_client's text parser: the counters follow the
requests made, the adapter in use, its swaps and an adapter that fails to load."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedclip.device_agent.classifier import Classifier
from fedclip.sdk.adapters import AdapterMeta, save_adapter
from fedclip.sdk.manifest import Manifest

WAIT_S = 120


class Served:
    """One `fedclip-agent serve-inference` process; `request()` talks to it over TCP or its socket."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        self._log = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedclip.device_agent.cli", "serve-inference", "--threads", "1", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + WAIT_S
        while "serving inference on " not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        line = next(ln for ln in self.log.read_text().splitlines() if "serving inference on " in ln)
        self.url = line.split("serving inference on ", 1)[1].split(" ", 1)[0]

    def connection(self) -> http.client.HTTPConnection:
        if self.url.startswith("unix:"):
            path = self.url[len("unix:") :]

            class UnixConnection(http.client.HTTPConnection):
                def connect(self) -> None:
                    self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.sock.connect(path)

            return UnixConnection("localhost", timeout=WAIT_S)
        host, port = self.url[len("http://") :].rsplit(":", 1)
        return http.client.HTTPConnection(host, int(port), timeout=WAIT_S)

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers=None):
        conn = self.connection()
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """GET /metrics, parsed: {(sample name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        conn = self.connection()
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            text = resp.read().decode()
            assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain"), text
        finally:
            conn.close()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=WAIT_S)
        finally:
            self._log.close()


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 34, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def adapter_file(tiny_bundle, tmp_path_factory) -> Path:
    m = Manifest.load(tiny_bundle)
    rng = np.random.default_rng(5)
    tensors = {t.name: rng.normal(0, 0.3, t.shape).astype(np.float32) for t in m.trainable}
    path = tmp_path_factory.mktemp("adapter") / "v7.safetensors"
    return save_adapter(path, tensors, AdapterMeta(bundle_id=m.bundle_id, version="v7"))


def test_http_contract_and_bad_input(tiny_bundle, adapter_file, tmp_path):
    pngs = [_png(i) for i in range(3)]
    (tmp_path / "img.png").write_bytes(pngs[2])
    server = Served(
        tmp_path,
        "--bundle",
        str(tiny_bundle),
        "--adapter",
        str(adapter_file),
        "--port",
        "0",
        "--max-body-mb",
        "0.05",
    )
    try:
        status, health = server.request("GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["adapter_version"] == "v7"
        assert health["bundle_id"] == Manifest.load(tiny_bundle).bundle_id
        # --device auto (the default) on a CPU-only onnxruntime: the CPU, and only it
        assert health["device"] == "cpu" and health["providers"] == ["CPUExecutionProvider"]

        images = [{"b64": _b64(pngs[0])}, _b64(pngs[1]), {"path": str(tmp_path / "img.png")}]
        status, out = server.request("POST", "/predict", {"images": images, "top_k": 2})
        assert status == 200, out
        assert out["adapter_version"] == "v7" and len(out["predictions"]) == 3
        assert all(len(p["top"]) == 2 for p in out["predictions"])
        # the same numbers as the Python API in this process
        ref = Classifier.from_bundle(tiny_bundle, adapter=adapter_file).predict(
            [Image.open(io.BytesIO(p)) for p in pngs]
        )
        np.testing.assert_allclose([p["logits"] for p in out["predictions"]], ref.logits, atol=1e-4)
        assert out["predictions"][0]["top"][0]["label"] == ref.top(1)[0][0][0]

        status, out = server.request("POST", "/predict", {"images": images[:1], "labels": ["cat", "dog"]})
        assert status == 200 and out["labels"] == ["cat", "dog"] and len(out["predictions"][0]["logits"]) == 2
        status, out = server.request("POST", "/embed", {"images": images[:2], "texts": ["a cat"]})
        assert status == 200 and len(out["image_embeds"]) == 2 and len(out["text_embeds"]) == 1
        assert abs(np.linalg.norm(out["text_embeds"][0]) - 1) < 1e-4

        corrupt = pngs[0][:40]
        bad = [
            ("POST", "/predict", {"images": [{"b64": _b64(corrupt)}]}, 400, "cannot read image"),
            ("POST", "/predict", {"images": ["%%% not base64"]}, 400, "base64"),
            ("POST", "/predict", {"images": [{"path": str(tmp_path / "missing.png")}]}, 400, "not found"),
            ("POST", "/predict", b"{not json", 400, "not valid JSON"),
            ("POST", "/predict", b"[1, 2]", 400, "JSON object"),
            ("POST", "/predict", {"images": []}, 400, "non-empty"),
            ("POST", "/predict", {"images": images[:1], "top_k": "x"}, 400, "top_k"),
            ("POST", "/predict", {"images": images[:1], "labels": "cat"}, 400, "labels"),
            ("POST", "/embed", {}, 400, "images"),
            ("POST", "/predict", {"images": ["A" * 60_000]}, 413, "over the limit"),
            ("GET", "/nope", None, 404, "no such endpoint"),
            ("POST", "/health", {}, 404, "no such endpoint"),
        ]
        for method, path, body, code, text in bad:
            status, out = server.request(method, path, body)
            assert status == code, (path, body if not isinstance(body, dict) else list(body), out)
            assert text in out["error"] and "\n" not in out["error"], out
        # a body with no Content-Length is refused rather than read to the end
        conn = server.connection()
        conn.putrequest("POST", "/predict")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
        conn.close()
        status, health = server.request("GET", "/health")  # still serving after all of it
        assert status == 200

        m = server.metrics()
        req = "fedclip_inference_requests_total"
        answered: dict[tuple[str, str], int] = {("/health", "200"): 2, ("/predict", "200"): 2}
        answered[("/embed", "200")] = 1
        for _, path, _, code, _ in bad:
            route = path if path in ("/health", "/predict", "/embed") else "other"
            answered[(route, str(code))] = answered.get((route, str(code)), 0) + 1
        answered[("/predict", "411")] = 1
        got = {(dict(lab)["route"], dict(lab)["status"]): v for (name, lab), v in m.items() if name == req}
        assert got == answered
        assert m[("fedclip_inference_errors_total", (("kind", "client"),))] == len(bad) + 1
        assert m[("fedclip_inference_errors_total", (("kind", "server"),))] == 0
        # images of successful requests only: 3 + 1 classified, 2 embedded
        assert m[("fedclip_inference_images_total", (("route", "/predict"),))] == 4
        assert m[("fedclip_inference_images_total", (("route", "/embed"),))] == 2
        hist = "fedclip_inference_request_duration_seconds"
        n_predict = sum(v for (route, _), v in answered.items() if route == "/predict")
        assert m[(f"{hist}_count", (("route", "/predict"),))] == n_predict
        assert m[(f"{hist}_bucket", (("le", "+Inf"), ("route", "/predict")))] == n_predict
        assert m[(f"{hist}_sum", (("route", "/predict"),))] > 0
        bundle_id = Manifest.load(tiny_bundle).bundle_id
        assert m[("fedclip_inference_adapter", (("bundle_id", bundle_id), ("version", "v7")))] == 1
        assert m[("fedclip_inference_adapter_swaps_total", ())] == 0
        assert m[("fedclip_inference_process_resident_memory_bytes", ())] > 0
        # a scrape is counted too (in the next one), and the counters only move forward
        m2 = server.metrics()
        assert m2[(req, (("route", "/metrics"), ("status", "200")))] == 1
        assert m2[(req, (("route", "/predict"), ("status", "200")))] == 2
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_unix_socket(tiny_bundle, tmp_path):
    sock = tmp_path / "inference.sock"
    server = Served(tmp_path, "--bundle", str(tiny_bundle), "--unix", str(sock))
    try:
        assert server.url == f"unix:{sock}"
        assert oct(os.stat(sock).st_mode & 0o777) == oct(0o660)
        status, health = server.request("GET", "/health")
        assert status == 200 and health["adapter_version"] is None
        status, out = server.request("POST", "/predict", {"images": [_b64(_png(1))]})
        assert status == 200 and len(out["predictions"]) == 1
    finally:
        assert server.stop() == 0, server.log.read_text()
    assert not sock.exists()  # removed on a clean stop


def test_follows_the_agent_state_dir(tiny_bundle, adapter_file, tmp_path):
    """`--state DIR`: /health reports the adapter the agent's state names, and moves when it changes."""
    from fedclip.device_agent.state import AgentState
    from fedclip.sdk.adapters import load_adapter

    m = Manifest.load(tiny_bundle)
    state_dir = tmp_path / "agent"
    st = AgentState(state_dir, agent_id="cam", fleet="f", bundle_id=m.bundle_id)
    (state_dir / "bundles").mkdir()
    (state_dir / "bundles" / m.bundle_id).symlink_to(tiny_bundle)  # where an agent downloads it
    tensors, meta = load_adapter(adapter_file)
    st.install_adapter("v7", tensors, meta, source="rollout")
    # the agent's record of a published round and of one under way, written by its own state API
    summary = {"metrics": {"accuracy_after": 0.75, "steps": 8.0}, "num_samples": 40, "train_seconds": 2.0}
    st.begin_round(3, b"task 3")
    st.store_update(3, b"update 3", summary)
    st.mark_published(3)
    st.begin_round(4, b"task 4")
    server = Served(tmp_path, "--state", str(state_dir), "--port", "0")
    try:
        assert server.request("GET", "/health")[1]["adapter_version"] == "v7"
        met = server.metrics()  # the agent's side, read from its state dir at the scrape
        assert met[("fedclip_agent_state_readable", ())] == 1
        assert met[("fedclip_agent_rounds", (("status", "done"),))] == 1
        assert met[("fedclip_agent_rounds", (("status", "built"),))] == 0
        assert met[("fedclip_agent_last_round", ())] == 3
        assert met[("fedclip_agent_round_in_progress", ())] == 4
        assert met[("fedclip_agent_last_round_train_seconds", ())] == 2.0
        assert met[("fedclip_agent_last_round_step_seconds", ())] == 0.25
        assert met[("fedclip_agent_last_round_metric", (("name", "accuracy_after"),))] == 0.75
        assert met[("fedclip_agent_adapter_installed", (("version", "v7"),))] == 1
        st.set_current_adapter(None)  # what a rollback to the bundle's own adapter writes
        deadline = time.monotonic() + WAIT_S
        while server.request("GET", "/health")[1]["adapter_version"] is not None:
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.1)
        status, out = server.request("POST", "/predict", {"images": [_b64(_png(2))]})
        assert status == 200 and out["adapter_version"] is None
        met = server.metrics()
        in_use = ("fedclip_inference_adapter", (("bundle_id", m.bundle_id), ("version", "")))
        assert met[in_use] == 1  # the bundle's own adapter
        assert met[("fedclip_inference_adapter_swaps_total", ())] == 1
        assert met[("fedclip_inference_adapter_last_swap_timestamp_seconds", ())] > 0
        assert met[("fedclip_inference_adapter_load_failures_total", ())] == 0

        # an installed adapter that cannot be loaded: counted, and the current one keeps serving
        st.install_adapter("v8", tensors, meta, source="rollout", use=False)
        (state_dir / "adapters" / "v8.safetensors").write_bytes(b"not an adapter")
        st.set_current_adapter("v8")
        deadline = time.monotonic() + WAIT_S
        while server.metrics()[("fedclip_inference_adapter_load_failures_total", ())] < 1:
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.1)
        met = server.metrics()
        assert met[("fedclip_inference_adapter_swaps_total", ())] == 1 and met[in_use] == 1
        # the agent installed v8, inference still serves the bundle's own: both visible
        assert met[("fedclip_agent_adapter_installed", (("version", "v8"),))] == 1
        assert server.request("GET", "/health")[1]["adapter_version"] is None
    finally:
        assert server.stop() == 0, server.log.read_text()
        st.close()
