"""`fedclip-agent start` and `fedclip-agent status`: the agent's life in a fleet."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fedclip.sdk.cli import setup_logging


def start(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="agent.yaml; flags given here override it."
    ),
    broker: str | None = typer.Option(
        None, help="Broker URL: mqtt://host:1883 or mqtts://host:8883; a cluster: its URLs, comma-separated."
    ),
    fleet: str | None = typer.Option(None, help="Fleet name (topic root fedclip/<fleet>/)."),
    agent_id: str | None = typer.Option(None, "--id", help="Agent id; also the fixed MQTT client id."),
    bundle: str | None = typer.Option(
        None,
        help="Bundle folder exported by `fedclip-coord export`, or its http(s):// or file:// URL "
        "(downloaded into the state dir, every file's sha256 checked).",
    ),
    data: Path | None = typer.Option(
        None, help="Local data: image folder (one folder per label), CSV or JSONL."
    ),
    state: Path | None = typer.Option(
        None, help="State dir (adapters, rounds, checkpoints); survives restarts."
    ),
    username: str | None = typer.Option(None, help="Broker user name."),
    password_file: Path | None = typer.Option(None, help="File holding the broker password."),
    coordinator_key: Path | None = typer.Option(
        None, help="Coordinator's public key: only adapters signed with it are installed."
    ),
    device_key: Path | None = typer.Option(
        None, help="This device's Ed25519 private key (from its startup kit): signs status, updates, acks."
    ),
    accept_unsigned_adapters: bool = typer.Option(
        False,
        "--accept-unsigned-adapters",
        help="Without --coordinator-key, install unsigned pushed adapters (for closed test setups only).",
    ),
    ca_file: Path | None = typer.Option(None, help="CA certificate for mqtts://."),
    cert_file: Path | None = typer.Option(None, help="Client certificate for mqtts:// (with --key-file)."),
    key_file: Path | None = typer.Option(None, help="Client key for mqtts://."),
    group: list[str] | None = typer.Option(
        None, "--group", help="Group reported to the coordinator (repeat)."
    ),
    device: str | None = typer.Option(
        None, help="ONNX Runtime device: auto (CUDA if installed) | cpu | cuda [default: auto]."
    ),
    threads: int | None = typer.Option(None, help="ONNX Runtime threads (0: its default)."),
    backend: str | None = typer.Option(
        None, "--backend", help="Training backend: auto | step | ort-training [default: auto]."
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bars while training."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Join a fleet: announce this device, train the rounds the coordinator sends, publish updates.

    Runs until SIGTERM or Ctrl-C, then publishes `offline` and exits 0.

    Give --config agent.yaml, or at least --broker, --fleet, --id, --bundle, --data and --state.
    """
    from fedclip.device_agent.agent import Agent
    from fedclip.device_agent.config import AgentConfig

    setup_logging(verbose)
    overrides = {
        "broker": broker,
        "fleet": fleet,
        "id": agent_id,
        "bundle": bundle,
        "data": data,
        "state": state,
        "username": username,
        "password_file": password_file,
        "coordinator_key": coordinator_key,
        "device_key": device_key,
        "accept_unsigned_adapters": accept_unsigned_adapters or None,  # absent: agent.yaml decides
        "ca_file": ca_file,
        "cert_file": cert_file,
        "key_file": key_file,
        "groups": list(group) if group else None,
        "device": device,
        "threads": threads,
        "backend": backend,
        "progress": progress,
    }
    cfg = AgentConfig.load(config, overrides)
    raise typer.Exit(Agent.from_config(cfg).run())


def status(
    state: Path = typer.Option(..., help="The agent's state dir."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show what an agent's state dir records: identity, adapter, rounds, last metrics."""
    from fedclip.device_agent.state_summary import summarize

    info = summarize(state)
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"agent state {state}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in (
        "agent_id",
        "fleet",
        "bundle_id",
        "adapter_version",
        "adapter_source",
        "adapter_round",
        "adapter_rollout",
        "serving",
        "open_set_fallback",
        "pinned",
        "last_round",
        "rounds_done",
        "in_progress",
    ):
        value = info[key]
        table.add_row(key.replace("_", " "), "-" if value is None else str(value))
    if info["personal_tuning"]:
        t = info["personal_tuning"]
        paused = f"{t['adapter']}: paused, resumes in epoch {t['epoch']} of {t['epochs']}"
        table.add_row("personal tuning", paused)
    if info["pending_updates"]:
        table.add_row("pending updates", ", ".join(map(str, info["pending_updates"])))
    for name, value in sorted(info["last_metrics"].items()):
        table.add_row(f"  {name}", f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
