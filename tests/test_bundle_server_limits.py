"""The bundle server holds no connection for free (idle timeout, connection cap), and a bundle's
manifest cannot name a file outside its folder."""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
import urllib.request

import pytest
import yaml
from test_manifest import make_manifest

from fedclip.coordinator.bundle_server import BundleServer
from fedclip.sdk.errors import BundleError
from fedclip.sdk.manifest import MANIFEST_NAME, GraphSpec, Manifest, TokenizerSpec

DEADLINE = 15


def _connect(server: BundleServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=DEADLINE)
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout is the deadline)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _get(server: BundleServer, name: str) -> bytes:
    with urllib.request.urlopen(f"{server.url}/{name}", timeout=DEADLINE) as r:
        return r.read()


def test_idle_connections_are_closed(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    with BundleServer(tmp_path, timeout=0.5) as server:
        silent = _connect(server)
        assert _read_until_closed(silent) == b""  # never sent a request: closed, not kept forever
        silent.close()
        keep_alive = _connect(server)
        keep_alive.sendall(b"GET /a.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _read_until_closed(keep_alive)  # answered, then closed once it stays idle
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"x" * 100)
        keep_alive.close()


def test_connections_past_the_cap_get_503_and_the_server_stays_up(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"payload")
    with BundleServer(tmp_path, timeout=DEADLINE, max_connections=2) as server:
        held = [_connect(server), _connect(server)]
        extra = _connect(server)
        extra.sendall(b"GET /a.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _read_until_closed(extra)
        assert reply.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in reply
        extra.close()
        for s in held:
            s.close()
        # the slots come back when their threads notice the close: poll with a deadline
        end = time.monotonic() + DEADLINE
        while True:
            try:
                assert _get(server, "a.bin") == b"payload"
                break
            except OSError:  # 503 (HTTPError) or a reset while the slots are still held
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)


def test_a_client_that_stops_reading_is_cut_and_frees_its_slot(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedclip.coordinator.bundle_server")
    (tmp_path / "big.bin").write_bytes(b"\0" * (32 << 20))  # more than the socket buffers hold
    (tmp_path / "a.bin").write_bytes(b"payload")
    with BundleServer(tmp_path, timeout=0.5, max_connections=1) as server:
        stalled = _connect(server)
        stalled.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
        # the only slot is free again once the server gave up on the stalled reader
        end = time.monotonic() + DEADLINE
        while True:
            try:
                assert _get(server, "a.bin") == b"payload"
                break
            except OSError:
                assert time.monotonic() < end, "the stalled download kept its connection"
                time.sleep(0.05)
        stalled.close()
    # the handler ended because the reader stalled, not because it sent the whole file
    assert any("stalled during big.bin" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "change",
    [
        {"graphs": {"training": GraphSpec("../outside.onnx", ("image",), ("loss",))}},
        {"tokenizer": TokenizerSpec("/etc/passwd", 77)},
        {"initial_tensors": "sub/../../x.safetensors"},
        {"checkpoint": ".hidden"},
    ],
)
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(tmp_path, change):
    data = dataclasses.replace(make_manifest(), **change).to_dict()
    (tmp_path / MANIFEST_NAME).write_text(yaml.safe_dump(data))
    with pytest.raises(BundleError, match="outside its folder") as e:
        Manifest.load(tmp_path, verify=False)
    assert "\n" not in str(e.value)


def test_a_listed_file_that_is_a_symlink_out_of_the_bundle_is_refused(tmp_path):
    bundle, outside = tmp_path / "b", tmp_path / "secret.txt"
    bundle.mkdir()
    outside.write_bytes(b"graph bytes")
    (bundle / "training_model.onnx").symlink_to(outside)
    (bundle / "tokenizer").mkdir()
    (bundle / "tokenizer" / "bpe.txt.gz").write_bytes(b"vocab")
    make_manifest().seal(bundle)
    with pytest.raises(BundleError, match="leads outside the bundle"):
        Manifest.load(bundle)
