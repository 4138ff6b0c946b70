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


def settle_unstarted_runs(interrupted: bool = False) -> None:
    """Undo the run directories of stages that stopped with an error before their first output, or keep them
    for --resume when interrupted (rlhf.runs); not imported here before a stage has (it brings torch)."""
    runs = sys.modules.get("rlhf.runs")
    if runs is not None and interrupted:
        runs.keep_unstarted_runs()
    elif runs is not None:
        runs.abandon_unstarted_runs()


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 1; Ctrl-C says so, with status 130."""
    try:
        app()
    except RlhfError as e:
        settle_unstarted_runs()  # a stage that stopped before its first output leaves no run directory behind
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except SystemExit as e:  # typer turns Ctrl-C (KeyboardInterrupt) into a silent exit with status 130
        if e.code not in (0, None):
            settle_unstarted_runs(interrupted=e.code == 130)
        if e.code == 130:
            again = "run it again to continue" + ("" if "loop" in sys.argv[1:2] or "demo" in sys.argv[1:2] else
                                                  ", with --resume for a training stage")  # fmt: skip
            typer.echo(f"interrupted ({again})", err=True)
        raise
    except BaseException:
        settle_unstarted_runs()
        raise
