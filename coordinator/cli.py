"""`fedclip-coord`: one typer app; each command group lives in its own module.

Command modules import heavy dependencies (torch, open_clip) inside their functions only, so
`fedclip-coord --help` and every non-export command start without torch.
"""

from __future__ import annotations

import importlib

import typer

from fedclip.sdk.cli import run

app = typer.Typer(
    help="fedclip coordinator: export bundles, run federated rounds, manage adapters and rollouts.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Keeps the app a command group even while it has a single command."""


# (module, attribute, command name); a module that is not there yet is skipped.
_COMMANDS = [
    ("fedclip.coordinator.export_cmd", "export", "export"),
    ("fedclip.coordinator.serve_cmd", "serve", "serve"),
    ("fedclip.coordinator.serve_cmd", "status", "status"),
    ("fedclip.coordinator.partition_cmd", "partition", "partition"),
    ("fedclip.coordinator.demo", "demo", "demo"),
]
_GROUPS = [
    ("fedclip.coordinator.adapters_cmd", "app", "adapters"),
    ("fedclip.coordinator.rollout_cmd", "app", "rollout"),
]

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
    run(app, "fedclip-coord")


if __name__ == "__main__":
    main()
