"""`--json` output of the coordinator's commands: one document on stdout (or one per line for
streams), keys sorted, NaN written as null, so scripts can rely on `json.loads` of what they read.

The field names are those of `fleet_view`'s records and are listed in docs/operations.md.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from fedclip.coordinator.fleet_view import finite

JSON_OPTION = typer.Option(
    False, "--json", help="Print JSON (fields in docs/operations.md) instead of tables."
)


def dumps(obj: Any, *, lines: bool = False) -> str:
    """`obj` as JSON text: indented for a document, compact for a JSON-lines record."""
    return json.dumps(finite(obj), sort_keys=True, allow_nan=False, indent=None if lines else 2)


def print_json(obj: Any) -> None:
    typer.echo(dumps(obj))


def print_json_line(obj: Any) -> None:
    """One record of a JSON-lines stream, flushed at once so a reading pipe sees it now."""
    sys.stdout.write(dumps(obj, lines=True) + "\n")
    sys.stdout.flush()
