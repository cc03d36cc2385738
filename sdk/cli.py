"""What both CLIs share: FedclipError -> one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

import typer

from fedclip.sdk.errors import FedclipError


def make_app(
    help: str, commands: Sequence[tuple[str, str, str]], groups: Sequence[tuple[str, str, str]] = ()
) -> typer.Typer:
    """A typer app from (module, attribute, name) entries: commands, then sub-apps, then `version`.

    Modules are imported here, once; each keeps its heavy imports (torch) inside its functions.
    """
    app = typer.Typer(help=help, no_args_is_help=True, add_completion=False)

    @app.callback()
    def _root() -> None:
        # A callback keeps the app a command group, so `prog CMD` works for every command.
        pass

    for module, attr, name in commands:
        app.command(name)(getattr(importlib.import_module(module), attr))
    for module, attr, name in groups:
        app.add_typer(getattr(importlib.import_module(module), attr), name=name)

    @app.command()
    def version() -> None:
        """Print the fedclip version."""
        from importlib.metadata import version as _v

        print(f"fedclip {_v('fedclip')}")

    return app


def run(app: typer.Typer, prog: str) -> None:
    try:
        app(prog_name=prog, standalone_mode=False)
    except FedclipError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        # Usage errors and aborts of the click that typer vendors; matched by shape, not by class,
        # because typer may vendor its own copy of click.
        if type(e).__name__ == "Abort":
            print(f"{prog}: aborted", file=sys.stderr)
            sys.exit(130)
        show = getattr(e, "show", None)
        if callable(show) and hasattr(e, "exit_code"):
            show()
            sys.exit(2)
        raise
    sys.exit(0)


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
