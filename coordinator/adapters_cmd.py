"""`fedclip-coord adapters list|show|export`: the adapter registry of a coordinator state dir."""

from __future__ import annotations

from pathlib import Path

import typer

from fedclip.coordinator.json_out import JSON_OPTION, print_json

app = typer.Typer(help="List, inspect and export adapter versions from the registry.", no_args_is_help=True)

_STATE = typer.Option(..., "--state", help="The coordinator's state directory.")


def _registry(state: Path):
    from fedclip.coordinator.registry import Registry
    from fedclip.coordinator.store import Store

    store = Store(state, readonly=True)
    return store, Registry(store, store.get_meta("bundle_id") or "")


@app.command("list")
def list_(
    state: Path = _STATE,
    scope: str | None = typer.Option(None, help="global or agent."),
    agent: str | None = typer.Option(None, help="Only this agent's versions."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Every adapter version: round, scope, parent, strategy."""
    from rich.console import Console
    from rich.table import Table

    from fedclip.coordinator.fleet_view import version_record

    store, reg = _registry(state)
    with store:
        rows = [v for v in reg.list(scope) if not agent or v.agent == agent]
    if as_json:
        print_json({"versions": [version_record(v) for v in rows]})
        return
    table = Table("version", "round", "scope", "agent", "parent", "strategy", "metrics")
    for v in rows:
        shown = ", ".join(f"{k}={x:.3g}" for k, x in sorted(v.metrics.items()) if "acc" in k or "loss" in k)
        table.add_row(
            v.version, str(v.round), v.scope, v.agent or "-", v.parent or "-", v.strategy, shown or "-"
        )
    Console().print(table)


@app.command()
def show(
    version: str = typer.Argument(..., help="Version id, e.g. g-r3."),
    state: Path = _STATE,
    as_json: bool = typer.Option(True, "--json", help="Print JSON (the only output of this command)."),
) -> None:
    """One version's record and tensors (name, shape, norm) as JSON (`--json` is accepted for scripts
    that pass it to every command)."""
    import numpy as np

    from fedclip.coordinator.fleet_view import version_record

    del as_json  # the output is JSON either way
    store, reg = _registry(state)
    with store:
        row = reg.show(version)
        tensors, meta = reg.load(version)
    out = {
        **version_record(row),
        "blob": row.blob,
        "bundle_id": meta.bundle_id,
        "kind": meta.kind,
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype), "norm": float(np.linalg.norm(v))}
            for k, v in sorted(tensors.items())
        },
    }
    print_json(out)


@app.command()
def export(
    version: str = typer.Argument(..., help="Version id, e.g. g-r3 or a-<agent>-r3."),
    out: Path = typer.Option(..., "--out", "-o", help="Adapter file to write (.safetensors)."),
    state: Path = _STATE,
) -> None:
    """Write a version as a fedclip adapter file (loads into PyTorch and the ONNX graphs)."""
    store, reg = _registry(state)
    with store:
        path = reg.export(version, out)
    typer.echo(str(path))
