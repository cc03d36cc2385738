"""`fedclip-coord dashboard`: the ops endpoint (dashboard and `/metrics`) for a state dir, alone.

The same server `serve --ops-port` starts, for when no coordinator runs: a finished experiment, or a
machine that only has a copy of the state dir. Read-only; runs until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer


def dashboard(
    state: Path = typer.Option(..., "--state", help="The coordinator's state directory."),
    port: int = typer.Option(8090, "--port", min=0, max=65535, help="Port (0: a free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    auth_file: Path | None = typer.Option(
        None, "--auth-file", help="File with user:password: ask for HTTP basic auth."
    ),
) -> None:
    """Serve the read-only fleet dashboard and Prometheus /metrics of a state dir until Ctrl-C."""
    from fedclip.coordinator.serve_cmd import start_ops
    from fedclip.sdk.cli import setup_logging

    setup_logging()
    ops = start_ops(state, host, port, auth_file)
    typer.echo(f"dashboard: {ops.url}/  metrics: {ops.url}/metrics", err=True)
    stop = threading.Event()
    # Ctrl-C and SIGTERM (systemd, docker stop) both end it cleanly, even where the shell that
    # started it made SIGINT ignored (background jobs)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        ops.stop()
    typer.echo("dashboard: stopped", err=True)
