"""rlhf.cli.main(): how the command line ends on user errors and on Ctrl-C; a closing line on one process only."""

from __future__ import annotations

import pytest
import typer

from rlhf import cli
from rlhf.cli.common import summary
from rlhf.errors import ConfigError


def _app_raising(exc: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def run() -> None:
        raise exc

    @app.command()
    def other() -> None:  # two commands, so `run` is named on the command line
        pass

    return app


def test_ctrl_c_says_interrupted_and_exits_130(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "app", _app_raising(KeyboardInterrupt()))
    monkeypatch.setattr("sys.argv", ["rlhf", "run"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 130
    assert capsys.readouterr().err.startswith("interrupted")


def test_a_user_error_is_one_line_and_exits_1(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "app", _app_raising(ConfigError("ppo.lr: should be > 0")))
    monkeypatch.setattr("sys.argv", ["rlhf", "run"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    assert capsys.readouterr().err == "error: ppo.lr: should be > 0\n"


@pytest.mark.parametrize(("rank", "printed"), [(None, True), ("0", True), ("1", False)])
def test_a_training_stages_closing_line_is_printed_by_the_main_process_only(
    rank: str | None, printed: bool, monkeypatch, capsys
) -> None:
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    summary("sft: held-out response loss 0.1234; model in runs/sft/final")
    assert (capsys.readouterr().out != "") is printed
