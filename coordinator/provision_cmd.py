"""`fedclip-coord provision init|add|revoke|broker|list`: enrol a fleet's devices (`provision.py`)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="Provision a fleet: its keys and CA, one startup kit per device, the broker's logins and ACL.",
    no_args_is_help=True,
)

_STATE = typer.Option(..., "--state", help="The coordinator's state directory.")


@app.command()
def init(
    state: Path = _STATE,
    fleet: str = typer.Option(..., "--fleet", help="Fleet name (topic root fedclip/<fleet>/)."),
    broker: str = typer.Option(
        "mqtt://127.0.0.1:1883", help="The broker URL devices use (mqtts://host:port for TLS)."
    ),
    host: list[str] = typer.Option(
        [],
        "--host",
        help="A name or address on the broker's certificate (repeat; default: the URL's host, "
        "127.0.0.1, localhost).",
    ),
    bundle: str = typer.Option(
        "bundle", help="What each kit's agent.yaml names as its bundle (folder or URL)."
    ),
) -> None:
    """Make the fleet's keys: coordinator signing key, fleet CA, broker certificate, coordinator login.

    Safe to run again: existing keys are kept; settings given now replace the old ones.
    """
    from fedclip.coordinator.provision import Provisioner

    prov = Provisioner.init(state, fleet, broker=broker, hosts=host or None, bundle=bundle)
    typer.echo(f"fleet {fleet} provisioned in {state}")
    typer.echo(f"  coordinator key   {prov.coordinator_public_key}")
    typer.echo(f"  fleet CA          {prov.dir / 'ca.crt'}")
    typer.echo(f"  broker cert for   {', '.join(prov.settings.hosts)}")
    login = f"--username {_coordinator_user()} --password-file {prov.coordinator_password_file}"
    typer.echo(f"  coordinator login {login}")


def _coordinator_user() -> str:
    from fedclip.sdk.broker_acl import COORDINATOR_USER

    return COORDINATOR_USER


@app.command()
def add(
    agent_ids: list[str] = typer.Argument(..., help="The device's agent id (several with --kits)."),
    state: Path = _STATE,
    group: list[str] = typer.Option([], "--group", help="A group the device belongs to (repeat)."),
    tls: bool = typer.Option(
        False, "--tls", help="Also issue a TLS client certificate (broker URL mqtts://)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the kit as this folder (one id)."),
    tar: Path | None = typer.Option(None, "--tar", help="Write the kit as this .tar.gz (one id)."),
    kits: Path | None = typer.Option(None, "--kits", help="Write each id's kit as KITS/<id>.tar.gz."),
    broker: str | None = typer.Option(None, help="Broker URL for this device (default: the fleet's)."),
    bundle: str | None = typer.Option(
        None, help="Bundle folder or URL for this device (default: the fleet's)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Re-issue the kit of an enrolled device (new key, login)."
    ),
) -> None:
    """Make each device's startup kit and enrol its public key; private files are 0600."""
    from rich.progress import track

    from fedclip.coordinator.provision import Provisioner
    from fedclip.sdk.errors import ConfigError

    if (out, tar, kits).count(None) != 2:
        raise ConfigError("provision add: give one of --out DIR, --tar FILE, --kits DIR")
    if kits is None and len(agent_ids) > 1:
        raise ConfigError("provision add: several ids need --kits DIR (one tarball each)")
    prov = Provisioner.open(state)
    ids = track(agent_ids, description="kits", transient=True) if len(agent_ids) > 1 else agent_ids
    try:
        for agent_id in ids:
            target = dict(out=out, tar=tar) if kits is None else dict(tar=kits / f"{agent_id}.tar.gz")
            kit = prov.add(
                agent_id,
                groups=tuple(group),
                tls=tls,
                broker=broker,
                bundle=bundle,
                force=force,
                rewrite_brokers=False,
                **target,
            )
            typer.echo(f"{agent_id}: startup kit {kit.path} ({', '.join(kit.files)})")
    finally:
        prov.write_brokers()  # once for every kit made, also when a later id in the list failed
    _remind_reload(prov)


@app.command()
def revoke(
    agent_id: str = typer.Argument(..., help="The device's agent id."),
    state: Path = _STATE,
    reason: str = typer.Option("", help="Why (kept in the registry)."),
) -> None:
    """Refuse the device from now on and remove its broker login from the broker files written."""
    from fedclip.coordinator.provision import Provisioner

    prov = Provisioner.open(state)
    _, files = prov.revoke(agent_id, reason)
    typer.echo(f"{agent_id}: revoked")
    if not files:
        typer.echo("  no broker files written yet: run `fedclip-coord provision broker` for your broker")
    _remind_reload(prov)


@app.command()
def broker(
    state: Path = _STATE,
    kind: str = typer.Option("mosquitto", help="mosquitto or amqtt."),
    out: Path = typer.Option(..., "--out", help="Folder for the broker's config, password file and ACL."),
    port: int = typer.Option(1883, help="Plain MQTT listener port (0: none)."),
    listen: str = typer.Option("127.0.0.1", "--listen", help="Address the listeners bind."),
    tls_port: int = typer.Option(0, "--tls-port", help="TLS listener port (0: none); mosquitto only."),
    require_client_cert: bool = typer.Option(
        False, "--require-client-cert", help="The TLS listener refuses clients without a fleet certificate."
    ),
) -> None:
    """Write the broker's listeners, password file and ACL from the registry (rewritten on revoke)."""
    from fedclip.coordinator.provision import Provisioner

    prov = Provisioner.open(state)
    files = prov.write_broker(
        kind, out, port=port, host=listen, tls_port=tls_port, require_client_cert=require_client_cert
    )
    for f in files:
        typer.echo(f"wrote {f}")
    if kind == "mosquitto":
        typer.echo(f"mosquitto: add `include_dir {files[0].parent}` to mosquitto.conf, then reload it")
    else:
        typer.echo(f"amqtt: amqtt -c {files[0]}")


@app.command("list")
def list_(state: Path = _STATE) -> None:
    """Every enrolled device: groups, TLS certificate, enrolled and revoked times."""
    import time

    from rich.console import Console
    from rich.table import Table

    from fedclip.coordinator.enrolment import Enrolment

    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"

    with Enrolment.load(state) as reg:
        table = Table("agent", "groups", "tls cert", "enrolled", "revoked", "reason")
        for d in reg.devices():
            table.add_row(
                d.agent,
                ",".join(d.groups) or "-",
                d.cert_serial[:12] if d.cert_serial else "-",
                when(d.enrolled_at),
                when(d.revoked_at),
                d.revoked_reason or "-",
            )
    Console().print(table)


def _remind_reload(prov) -> None:
    if prov.settings.broker_outputs:
        outs = ", ".join(e["out"] for e in prov.settings.broker_outputs)
        typer.echo(f"  broker files rewritten in {outs}: reload the broker (mosquitto: SIGHUP)")
