"""Bundle download: directory, file:// and http:// (our own bundle server), resume with Range after a
cut connection, and refusal of corrupt bundles. Real files, real sockets, no mocks."""

from __future__ import annotations

import os
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedclip.coordinator.bundle_server import BundleServer
from fedclip.sdk.errors import BundleError
from fedclip.sdk.fetch import fetch_bundle, fetch_bytes
from fedclip.sdk.hashing import sha256_bytes
from fedclip.sdk.manifest import (
    AdapterSpec,
    BaseModel,
    GraphSpec,
    Manifest,
    Preprocess,
    TaskSpec,
    TensorSpec,
)


def make_bundle(root: Path, sizes: dict[str, int]) -> Manifest:
    """A sealed bundle folder of random files: a real manifest with real sha256s (no ONNX needed)."""
    root.mkdir(parents=True)
    for i, (name, size) in enumerate(sizes.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(os.urandom(size) if size else b"")
        del i
    manifest = Manifest(
        format_version=1,
        base_model=BaseModel("fedclip-tiny", 32),
        adapter=AdapterSpec("lora", 4, 8.0, ("q", "v"), ("vision",)),
        task=TaskSpec("classify", ("a", "b")),
        preprocess=Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        tensors=(TensorSpec("x.lora_A", (4, 8)),),
        graphs={"training": GraphSpec("training_model.onnx", ("image", "labels"), ("loss",))},
    )
    return manifest.seal(root)


SIZES = {"training_model.onnx": 3_000_000, "eval_model.onnx": 200_000, "checkpoint": 1, "sub/tok.txt": 0}


@pytest.fixture
def bundle(tmp_path) -> tuple[Path, Manifest]:
    src = tmp_path / "src"
    return src, make_bundle(src, SIZES)


def _same(a: Path, b: Path) -> None:
    for name in SIZES:
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_plain_directory_and_file_url(bundle, tmp_path):
    src, manifest = bundle
    out = fetch_bundle(src, tmp_path / "d1", progress=False)
    assert out == tmp_path / "d1" / manifest.bundle_id
    _same(src, out)
    assert Manifest.load(out).bundle_id == manifest.bundle_id
    out2 = fetch_bundle(src.as_uri(), tmp_path / "d2", progress=False)
    _same(src, out2)
    # a second fetch reuses the verified copy
    assert fetch_bundle(src, tmp_path / "d1", progress=False) == out


def test_http_download_with_progress_bar(bundle, tmp_path):
    src, manifest = bundle
    with BundleServer(src.parent) as server:
        out = fetch_bundle(f"{server.url}/src", tmp_path / "dl", progress=True)
    _same(src, out)


def test_server_range_requests_and_read_only(bundle):
    src, _ = bundle
    data = (src / "eval_model.onnx").read_bytes()
    with BundleServer(src) as server:
        req = urllib.request.Request(f"{server.url}/eval_model.onnx", headers={"Range": "bytes=100-199"})
        with urllib.request.urlopen(req) as r:
            assert r.status == 206
            assert r.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
            assert r.read() == data[100:200]
        req = urllib.request.Request(f"{server.url}/eval_model.onnx", headers={"Range": "bytes=-10"})
        with urllib.request.urlopen(req) as r:
            assert r.read() == data[-10:]
        req = urllib.request.Request(
            f"{server.url}/eval_model.onnx", headers={"Range": f"bytes={len(data)}-"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 416
        for path in ("/../src/checkpoint", "/%2e%2e/etc/passwd", "/", "/nope", "/.hidden"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(server.url + path)
            assert e.value.code == 404, path
        req = urllib.request.Request(f"{server.url}/checkpoint", data=b"x", method="PUT")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 405
    assert server.host == "127.0.0.1"


class CuttingProxy:
    """A TCP proxy in front of the bundle server that cuts the first `cuts` responses after
    `after` bytes, the way a flaky link does mid-file."""

    def __init__(self, upstream_port: int, after: int, cuts: int):
        self.upstream_port, self.after, self.cuts = upstream_port, after, cuts
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ranges: list[str] = []
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        request = client.recv(65536)
        self.ranges += [line for line in request.decode().split("\r\n") if line.lower().startswith("range:")]
        up.sendall(request)
        cut = self.cuts > 0 and b"training_model" in request
        if cut:
            self.cuts -= 1
        sent = 0
        try:
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    break
                if cut and sent + len(chunk) > self.after:
                    client.sendall(chunk[: self.after - sent])
                    break
                client.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        finally:
            if cut:  # RST rather than FIN: the client sees a reset connection mid-body
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            client.close()
            up.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def test_cut_connection_resumes_with_range(bundle, tmp_path):
    src, manifest = bundle
    with BundleServer(src) as server:
        port = int(server.url.rsplit(":", 1)[1])
        proxy = CuttingProxy(port, after=700_000, cuts=2)
        try:
            out = fetch_bundle(
                f"http://127.0.0.1:{proxy.port}", tmp_path / "dl", progress=False, retry_delay=0.01
            )
        finally:
            proxy.close()
    _same(src, out)
    resumed = [r for r in proxy.ranges if not r.endswith("bytes=0-")]
    assert len(resumed) >= 2, proxy.ranges  # two resumes, each from where the cut left the part file


def test_interrupted_process_resumes_from_part_file(bundle, tmp_path):
    """A download that gave up (all retries spent) leaves its .part; the next call resumes it."""
    src, manifest = bundle
    with BundleServer(src) as server:
        port = int(server.url.rsplit(":", 1)[1])
        proxy = CuttingProxy(port, after=1_000_000, cuts=1)
        try:
            with pytest.raises(BundleError, match="run again to resume"):
                fetch_bundle(f"http://127.0.0.1:{proxy.port}", tmp_path / "dl", progress=False, retries=0)
            part = tmp_path / "dl" / f".{manifest.bundle_id}.part" / "training_model.onnx.part"
            assert 0 < part.stat().st_size < SIZES["training_model.onnx"]
            out = fetch_bundle(f"http://127.0.0.1:{proxy.port}", tmp_path / "dl", progress=False, retries=0)
        finally:
            proxy.close()
    _same(src, out)
    assert any(r.startswith("Range: bytes=") and not r.endswith("=0-") for r in proxy.ranges)


def test_corrupt_file_is_refused_and_deleted(bundle, tmp_path):
    src, manifest = bundle
    path = src / "eval_model.onnx"
    data = bytearray(path.read_bytes())
    data[1234] ^= 0xFF
    path.write_bytes(bytes(data))
    with BundleServer(src) as server:
        with pytest.raises(BundleError, match="eval_model.onnx is corrupt"):
            fetch_bundle(server.url, tmp_path / "dl", progress=False)
    assert not (tmp_path / "dl" / manifest.bundle_id).exists()
    assert not list((tmp_path / "dl").rglob("eval_model.onnx*"))


def test_truncated_file_and_missing_file_and_modified_manifest_are_refused(bundle, tmp_path):
    src, manifest = bundle
    (src / "checkpoint").write_bytes(b"")
    with pytest.raises(BundleError, match="checkpoint is corrupt"):
        fetch_bundle(src, tmp_path / "a", progress=False)
    (src / "checkpoint").unlink()
    with pytest.raises(BundleError, match="checkpoint is missing"):
        fetch_bundle(src, tmp_path / "b", progress=False)
    text = (src / "manifest.yaml").read_text().replace("fedclip-tiny", "fedclip-big")
    (src / "manifest.yaml").write_text(text)
    with pytest.raises(BundleError, match="manifest was modified"):
        fetch_bundle(src, tmp_path / "c", progress=False)


def test_unsafe_names_and_bad_sources(tmp_path):
    with pytest.raises(BundleError, match="not a fedclip bundle|missing"):
        fetch_bundle(tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(BundleError, match="scheme"):
        fetch_bundle("ftp://example.org/b", tmp_path / "out", progress=False)
    with pytest.raises(BundleError, match="attempts"):
        fetch_bundle("http://127.0.0.1:9/b", tmp_path / "out", progress=False, retries=1, retry_delay=0.01)


def test_fetch_bytes_checks_sha256(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"adapter bytes")
    with BundleServer(tmp_path) as server:
        url = f"{server.url}/a.bin"
        assert fetch_bytes(url, sha256_bytes(b"adapter bytes"), max_bytes=1000) == b"adapter bytes"
        with pytest.raises(BundleError, match="sha256"):
            fetch_bytes(url, sha256_bytes(b"other"), max_bytes=1000)
        with pytest.raises(BundleError, match="larger"):
            fetch_bytes(url, sha256_bytes(b"adapter bytes"), max_bytes=4)
