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


EXPORT_FORMATS = ("fedclip", "open_clip", "lora")


@app.command()
def export(
    version: str = typer.Argument(..., help="Version id, e.g. g-r3 or a-<agent>-r3."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write (.safetensors; .pt for open_clip)."),
    state: Path = _STATE,
    fmt: str = typer.Option(
        "fedclip",
        "--format",
        help="fedclip: an adapter file (loads into PyTorch and the ONNX graphs); open_clip: the base model "
        "with the adapter merged, for open_clip.create_model(NAME, pretrained=FILE); lora: the factors "
        "with their open_clip weight names (docs/deploy.md).",
    ),
    bundle: Path = typer.Option(
        None, "--bundle", help="The bundle folder (open_clip and lora: the base model and adapter spec)."
    ),
) -> None:
    """Write a version as a fedclip adapter file, a merged open_clip checkpoint, or a LoRA file."""
    from fedclip.sdk.errors import ConfigError

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format: unknown format {fmt!r} (choose from {', '.join(EXPORT_FORMATS)})")
    store, reg = _registry(state)
    with store:
        if fmt == "fedclip":
            typer.echo(str(reg.export(version, out)))
            return
        tensors, meta = reg.load(version)
    if bundle is None:
        raise ConfigError(f"--format {fmt} needs --bundle (the bundle the version was trained on)")
    from fedclip.exporters.adapter_export import write_lora, write_open_clip  # torch: only here
    from fedclip.sdk.manifest import Manifest

    manifest = Manifest.load(bundle)
    if meta.bundle_id != manifest.bundle_id:
        raise ConfigError(
            f"--bundle: {bundle} is bundle {manifest.bundle_id[:12]}, not {meta.bundle_id[:12]}"
        )
    written = (
        write_open_clip(manifest, tensors, out)
        if fmt == "open_clip"
        else [write_lora(manifest, tensors, meta, out)]
    )
    for path in written:
        typer.echo(str(path))
