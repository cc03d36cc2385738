"""`fedclip-agent serve-inference`: the Classifier over local HTTP for the device's applications.

The server itself is `inference_http`; this is its command line (docs/inference.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from fedclip.device_agent import cli_options as opt
from fedclip.sdk.cli import setup_logging
from fedclip.sdk.errors import DataError

log = logging.getLogger(__name__)


def serve_inference(
    state: Path = typer.Option(
        None, "--state", help="An agent's state dir: serve the adapter it has installed, following rollouts."
    ),
    bundle: Path = typer.Option(
        None, "--bundle", help="Bundle folder (with --state: when the agent was given a folder, not a URL)."
    ),
    adapter: Path = opt.ADAPTER,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (keep it on loopback)."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="TCP port (0: any free one)."),
    unix: Path = typer.Option(None, "--unix", help="Serve on this Unix socket instead of TCP."),
    labels: str = typer.Option(None, "--labels", help="Default labels, comma-separated (else the bundle's)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per ONNX Runtime run."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", min=0.001, help="Largest request body (MiB)."),
    prior_weight: float = opt.PRIOR,
    open_set: Path = opt.OPEN_SET,
    open_set_quantile: float = opt.OPEN_SET_Q,
    open_set_fallback: Path = opt.OPEN_SET_FALLBACK,
    device: str = opt.DEVICE,
    threads: int = opt.THREADS,
    quiet: bool = opt.QUIET,
) -> None:
    """Serve the Classifier over local HTTP: GET /health, POST /predict and /embed (docs/inference.md)."""
    import signal
    import sys
    import threading

    from fedclip.device_agent.classifier import Classifier
    from fedclip.device_agent.inference_http import make_server
    from fedclip.device_agent.open_set import OpenSet

    setup_logging(quiet=quiet)
    if state is None and bundle is None:
        raise DataError("give --state DIR (follow an agent) or --bundle DIR [--adapter FILE]")
    if state is not None and adapter is not None:
        raise DataError("--adapter goes with --bundle; with --state the agent's installed adapter is served")
    kw = dict(
        device=device,
        threads=threads,
        batch_size=batch_size,
        prior_weight=prior_weight,
        labels=[x.strip() for x in labels.split(",") if x.strip()] if labels else None,
        open_set=OpenSet(open_set, open_set_quantile) if open_set is not None else None,
    )
    if state is not None:
        if open_set_fallback is not None:
            raise DataError("--open-set-fallback goes with --adapter; with --state the agent's own is used")
        clf = Classifier.from_state(state, bundle=bundle, **kw)
    else:
        clf = Classifier.from_bundle(bundle, adapter=adapter, fallback=open_set_fallback, **kw)
    server = make_server(clf, host=host, port=port, unix=unix, max_body=int(max_body_mb * (1 << 20)))

    def stop(signum, frame) -> None:
        # shutdown() waits for serve_forever to return: never from the thread that runs it
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # One line on stderr that scripts (and tests) wait for; the port is the real one with --port 0.
    print(
        f"serving inference on {server.url} (adapter {clf.adapter_version or 'bundle'})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        clf.close()
    log.info("inference server stopped")
