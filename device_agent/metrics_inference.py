"""Prometheus metrics of one `serve-inference` process: its requests and the adapter it serves with.

`GET /metrics` answers in the Prometheus text format. The request side (requests by route and
status, latency, images, errors) is counted by the HTTP handler as each answer goes out; the adapter
side (version in use, swaps, adapters that failed to load) is read from the `Classifier` at scrape
time, so a swap made by its watcher thread needs no hook. A server that follows an agent's state dir
also shows the agent's rounds (`metrics_agent`). Each server has its own registry: two
servers in one process (tests, an application embedding one) never share or collide on counters.

Uses the official `prometheus_client` (pure Python, stdlib only, ~100 ms to import; in every
`agent*` extra), the library the coordinator's `/metrics` uses, for the text format's escaping and
histogram rules. Torch-free. Metric names are listed in docs/inference.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fedclip.device_agent.metrics_agent import AgentStateCollector

if TYPE_CHECKING:
    from fedclip.device_agent.classifier import Classifier

CONTENT_TYPE = CONTENT_TYPE_LATEST
ROUTES = ("/health", "/predict", "/embed", "/metrics")
# Any other path is counted as "other": a label value per scanned URL would grow without bound.
OTHER = "other"
# Batch 1 of fedclip-tiny answers in ~2 ms, ViT-B-32 batch 32 on a small CPU in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def route_label(path: str) -> str:
    route = path.split("?", 1)[0]
    return route if route in ROUTES else OTHER


class _AdapterCollector:
    """The classifier's adapter state, read on each scrape."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    def describe(self) -> list[Metric]:
        return []  # read at scrape time only

    def collect(self) -> Iterator[Metric]:
        clf = self.classifier
        stats = clf.swap_stats()
        info = GaugeMetricFamily(
            "fedclip_inference_adapter",
            "1 for the adapter requests are served with (version empty: the bundle's own)",
            labels=["version", "bundle_id"],
        )
        info.add_metric([stats.version or "", clf.manifest.bundle_id], 1)
        yield info
        swaps = CounterMetricFamily(
            "fedclip_inference_adapter_swaps", "Switches to another adapter (rollouts and rollbacks)"
        )
        swaps.add_metric([], stats.swaps)
        yield swaps
        failed = CounterMetricFamily(
            "fedclip_inference_adapter_load_failures",
            "Adapters the agent installed that could not be loaded (the previous one kept serving)",
        )
        failed.add_metric([], stats.load_failures)
        yield failed
        away = CounterMetricFamily(
            "fedclip_inference_open_set_sent_away",
            "Images the open-set gate scored with its fallback, without the label prior",
        )
        away.add_metric([], stats.open_set_sent_away)
        yield away
        if clf.open_set_gate is not None:  # where the gate sends them now
            fallback = GaugeMetricFamily(
                "fedclip_inference_open_set_fallback",
                "1 for the model the open-set gate sends images to (version empty: the bundle's own)",
                labels=["version"],
            )
            fallback.add_metric([stats.open_set_fallback or ""], 1)
            yield fallback
        if stats.last_swap is not None:
            last = GaugeMetricFamily(
                "fedclip_inference_adapter_last_swap_timestamp_seconds", "Unix time of the last switch"
            )
            last.add_metric([], stats.last_swap)
            yield last


class InferenceMetrics:
    """The metrics of one inference server; `observe` per answered request, `render` per scrape."""

    def __init__(self, classifier: Classifier) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "fedclip_inference_requests",
            "HTTP requests answered, by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fedclip_inference_request_duration_seconds",
            "Time from the request line read to the answer sent, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter(
            "fedclip_inference_images",
            "Images classified (/predict) or embedded (/embed) in successful requests",
            ["route"],
            registry=self.registry,
        )
        self.errors = Counter(
            "fedclip_inference_errors",
            "Requests answered with an error: client (4xx: bad input, refused) or server (5xx: a bug)",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("client", "server"):
            self.errors.labels(kind)  # present at 0 from the start, so rate() sees the first error
        self.registry.register(_AdapterCollector(classifier))
        if classifier.state_dir is not None:
            self.registry.register(AgentStateCollector(classifier.state_dir))
        # RSS, CPU seconds, open fds of this process (Linux /proc; absent elsewhere)
        ProcessCollector(namespace="fedclip_inference", registry=self.registry)

    def observe(self, path: str, status: int, seconds: float, images: int = 0) -> None:
        route = route_label(path)
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels("server" if status >= 500 else "client").inc()
        elif images:
            self.images.labels(route).inc(images)

    def render(self) -> bytes:
        return generate_latest(self.registry)
