"""The `rlhf` command: one entry, a sub-command per stage (rlhf.cli.stages), serving (serving), red teaming and
Constitutional AI (safety), the loop (loop) and the labeling app (rlhf.feedback.cli)."""

from __future__ import annotations

import sys

import typer

# each module registers its commands on the app; `rlhf --help` lists them in this order
# isort: off
from rlhf.cli import stages, serving, safety, loop  # noqa: F401

# isort: on
from rlhf.cli.common import app
from rlhf.errors import RlhfError

__all__ = ["app", "main"]


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 1; Ctrl-C says so, with status 130."""
    try:
        app()
    except RlhfError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except SystemExit as e:  # typer turns Ctrl-C (KeyboardInterrupt) into a silent exit with status 130
        if e.code == 130:
            typer.echo("interrupted (run it again to continue; a training stage with --resume)", err=True)
        raise
