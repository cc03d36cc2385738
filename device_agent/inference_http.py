"""The Classifier over local HTTP (JSON in, JSON out), for applications not written in Python.

    GET  /health   {"status": "ok", "adapter_version", "bundle_id", "labels", "device", "providers",
                    "label_prior"}
    GET  /metrics  Prometheus text format (`metrics_inference`): requests, latency, adapter, swaps
    POST /predict  {"images": [IMAGE, ...], "labels"?: [...], "prompt"?: "a photo of a {}.", "top_k"?: 3}
                -> {"adapter_version", "labels", "predictions": [{"top": [{"label", "score"}], "logits"}]}
    POST /embed    {"images"?: [IMAGE, ...], "texts"?: [...]}
                -> {"adapter_version", "image_embeds"?: [[...]], "text_embeds"?: [[...]]}

IMAGE is {"b64": "<base64 of the image file>"} or {"path": "/abs/file.jpg"} (a plain string is taken
as base64). Embeddings are L2-normalized. Every answer names the adapter version that produced it.

The server is stdlib `http.server` with a thread per connection, bound to 127.0.0.1 (or a Unix
socket): it trusts its callers as much as the device's own processes, which is why it can read image
paths. Bad input never reaches the model and never stops the server: a body over `max_body` bytes is
refused from its Content-Length before it is read (413), wrong JSON, a corrupt image or a bad label
list is a 400, and each answer's `error` is one line.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import socket
import socketserver
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from fedclip.device_agent.classifier import Classifier
from fedclip.device_agent.metrics_inference import CONTENT_TYPE, InferenceMetrics
from fedclip.sdk.errors import DataError, FedclipError
from fedclip.sdk.preprocess import load_image

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 32 << 20  # a batch of 32 camera frames as JPEG fits many times over
MAX_IMAGES = 256
MAX_TOP_K = 1000


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _decode_image(item: Any, i: int):
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, dict) and set(item) == {"path"} and isinstance(item["path"], str):
        return load_image(item["path"])
    data = item.get("b64") if isinstance(item, dict) and set(item) == {"b64"} else item
    if not isinstance(data, str):
        raise DataError(f'images[{i}]: expected {{"b64": ...}}, {{"path": ...}} or a base64 string')
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"images[{i}]: not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            return img.convert("RGB") if img.mode not in ("RGB", "L") else img.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"images[{i}]: cannot read image ({str(e).splitlines()[0][:120]})") from None


def _images(body: dict) -> list:
    items = body.get("images")
    if not isinstance(items, list) or not items:
        raise DataError('"images" must be a non-empty list')
    if len(items) > MAX_IMAGES:
        raise DataError(f'"images": at most {MAX_IMAGES} per request, got {len(items)}')
    return [_decode_image(item, i) for i, item in enumerate(items)]


def _open_set(clf: Classifier) -> dict | None:
    gate, cfg = clf.open_set_gate, clf.open_set
    if gate is None or cfg is None:
        return None
    names = clf.manifest.task.labels
    stats = clf.swap_stats()
    return {"labels": [names[k] for k in gate.labels], "quantile": cfg.quantile,
            "sent_away": stats.open_set_sent_away, "fallback": stats.open_set_fallback}  # fmt: skip


def _strings(body: dict, key: str) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f'"{key}" must be a list of strings')
    return value


class InferenceHandler(BaseHTTPRequestHandler):
    server: Any  # InferenceServer or UnixInferenceServer
    protocol_version = "HTTP/1.1"
    server_version = "fedclip-inference"
    # A client that stops sending (or an idle keep-alive connection) frees its thread after this.
    timeout = 60

    def address_string(self) -> str:  # a Unix socket has no (host, port)
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    # ---- plumbing ------------------------------------------------------------------------------
    def _send(self, status: int, doc: dict) -> None:
        self._send_bytes(status, json.dumps(doc).encode(), "application/json")

    def _send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HttpError(411, "a Content-Length header is required")
        n = int(length)
        if n > self.server.max_body:
            raise HttpError(413, f"request body of {n} bytes is over the limit of {self.server.max_body}")
        raw = self.rfile.read(n)
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "request body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise HttpError(400, "request body must be a JSON object")
        return doc

    def _handle(self, fn) -> None:
        # One handler serves every request of a keep-alive connection: per-request fields reset here.
        t0, self._images = time.perf_counter(), 0
        try:
            status, doc = 200, fn()
        except HttpError as e:
            status, doc = e.status, {"error": str(e)}
        except FedclipError as e:
            status, doc = 400, {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}
        except Exception as e:  # a bug must cost one request, never the server
            log.exception("inference request failed")
            status, doc = 500, {"error": f"internal error ({type(e).__name__})"}
        # Counted once the answer is chosen and before it goes out: a client that reads it and then
        # scrapes /metrics finds its request there (counting after the write raced that scrape), and
        # a client that hangs up mid-answer is counted too. The latency is the work, not the write.
        self.server.metrics.observe(self.path, status, time.perf_counter() - t0, self._images)
        self._send(status, doc)

    # ---- routes --------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        route = self.path.split("?", 1)[0]
        if route == "/metrics":
            return self._metrics()
        self._handle(self._health if route == "/health" else self._not_found)

    def do_POST(self) -> None:  # noqa: N802
        route = {"/predict": self._predict, "/embed": self._embed}.get(self.path.split("?", 1)[0])
        self._handle(route or self._not_found)

    def _not_found(self) -> dict:
        known = "GET /health, /metrics, POST /predict, /embed"
        raise HttpError(404, f"no such endpoint {self.command} {self.path[:100]} ({known})")

    def _metrics(self) -> None:
        """Prometheus text format; this scrape is counted in the next one."""
        t0 = time.perf_counter()
        self._send_bytes(200, self.server.metrics.render(), CONTENT_TYPE)
        self.server.metrics.observe(self.path, 200, time.perf_counter() - t0)

    def _health(self) -> dict:
        clf: Classifier = self.server.classifier
        return {
            "status": "ok",
            "adapter_version": clf.adapter_version,
            "bundle_id": clf.manifest.bundle_id,
            "labels": list(clf.labels or clf.manifest.task.labels),
            "device": clf.device,
            "providers": clf.providers,
            # the adapter's label prior is added to logits over the bundle's labels (balanced softmax)
            "label_prior": clf.label_prior,
            # ... only to images like the device's own (`--open-set`): the labels it has images of
            "open_set": _open_set(clf),
        }

    def _predict(self) -> dict:
        body = self._body()
        top_k = body.get("top_k", 3)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
            raise DataError(f'"top_k" must be an integer from 1 to {MAX_TOP_K}')
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise DataError('"prompt" must be a string')
        labels = _strings(body, "labels")
        images = _images(body)
        out = self.server.classifier.predict(images, labels=labels, prompt=prompt)
        self._images = len(images)
        k = min(top_k, len(out.labels))
        preds = [
            {"top": [{"label": lab, "score": score} for lab, score in top], "logits": _floats(row)}
            for top, row in zip(out.top(k), out.logits, strict=True)
        ]
        return {"adapter_version": out.adapter_version, "labels": list(out.labels), "predictions": preds}

    def _embed(self) -> dict:
        body = self._body()
        clf: Classifier = self.server.classifier
        texts = _strings(body, "texts")
        if body.get("images") is None and texts is None:
            raise DataError('give "images", "texts" or both')
        out: dict[str, Any] = {"adapter_version": clf.adapter_version}
        if body.get("images") is not None:
            out["image_embeds"] = [_floats(r) for r in clf.embed_images(_images(body))]
            self._images = len(out["image_embeds"])
        if texts is not None:
            out["text_embeds"] = [_floats(r) for r in clf.embed_texts(texts)]
        return out


def _floats(row: np.ndarray) -> list[float]:
    return [float(v) for v in row]


class _TcpHandler(InferenceHandler):
    # http.server writes the headers and the body in two sends: with Nagle on, the body waits for the
    # client's delayed ACK of the headers, 40 ms on Linux, longer than a small model's whole answer.
    disable_nagle_algorithm = True


class InferenceServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], classifier: Classifier, max_body: int = DEFAULT_MAX_BODY):
        self.classifier, self.max_body = classifier, max_body
        self.metrics = InferenceMetrics(classifier)
        super().__init__(addr, _TcpHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, (bytes, bytearray)) else host
        return f"http://{name}:{port}"


class UnixInferenceServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str | Path, classifier: Classifier, max_body: int = DEFAULT_MAX_BODY):
        self.classifier, self.max_body = classifier, max_body
        self.metrics = InferenceMetrics(classifier)
        path = Path(path)
        if path.exists() and path.is_socket():
            _refuse_if_live(path)
            path.unlink()  # a stale socket of a server that died
        super().__init__(str(path), InferenceHandler)
        os.chmod(path, 0o660)  # the device's own users and group, nobody else

    @property
    def socket_path(self) -> str:
        addr = self.server_address
        return addr.decode() if isinstance(addr, (bytes, bytearray)) else str(addr)

    @property
    def url(self) -> str:
        return f"unix:{self.socket_path}"

    def server_close(self) -> None:
        super().server_close()
        Path(self.socket_path).unlink(missing_ok=True)


def _refuse_if_live(path: Path) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return
    finally:
        probe.close()
    raise DataError(f"--unix {path}: another server is listening on it")


def make_server(
    classifier: Classifier,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    unix: str | Path | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> InferenceServer | UnixInferenceServer:
    """Bind (not yet serving): call `serve_forever()`, and `shutdown()` + `server_close()` to stop."""
    where = f"--unix {unix}" if unix is not None else f"{host}:{port}"
    try:
        if unix is not None:
            return UnixInferenceServer(unix, classifier, max_body)
        return InferenceServer((host, port), classifier, max_body)
    except OSError as e:
        raise DataError(f"cannot listen on {where} ({e.strerror or e})") from None
