"""`fedclip-agent`: one typer app; offline commands in `local_cmd`, fleet commands in `fleet_cmd`.

Never imports torch (the import test checks `sys.modules`).
"""

from __future__ import annotations

import importlib

import typer

from fedclip.sdk.cli import run

app = typer.Typer(
    help="fedclip device agent: train, evaluate and predict locally; join a fleet with `start`.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Keeps the app a command group even while it has a single command."""


# (module, attribute, command name); a module that is not there yet is skipped.
_COMMANDS = [
    ("fedclip.device_agent.local_cmd", "train", "train"),
    ("fedclip.device_agent.local_cmd", "eval", "eval"),
    ("fedclip.device_agent.local_cmd", "predict", "predict"),
    ("fedclip.device_agent.fleet_cmd", "start", "start"),
    ("fedclip.device_agent.fleet_cmd", "status", "status"),
]
_GROUPS: list[tuple[str, str, str]] = []

for module, attr, name in _COMMANDS:
    try:
        app.command(name)(getattr(importlib.import_module(module), attr))
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
for module, attr, name in _GROUPS:
    try:
        app.add_typer(getattr(importlib.import_module(module), attr), name=name)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise


@app.command()
def version() -> None:
    """Print the fedclip version."""
    from importlib.metadata import version as _v

    print(f"fedclip {_v('fedclip')}")


def main() -> None:
    run(app, "fedclip-agent")


if __name__ == "__main__":
    main()
