"""`rlhf serve` is wired into the CLI with the documented options, and rejects A/B without a store."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from rlhf.cli import app


def test_serve_help_lists_the_options() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in (
        "--feedback-db",
        "--host",
        "--port",
        "--max-batch-size",
        "--ab-rate",
        "--candidate-model",
        "--model-name",
        "--candidate-name",
    ):
        assert option in result.output


def test_ab_rate_without_a_feedback_store_is_a_config_error() -> None:
    result = CliRunner().invoke(app, ["serve", "some/model", "--ab-rate", "0.5"])
    assert result.exit_code != 0 and "feedback_db" in str(result.exception)


def test_a_candidate_named_like_the_model_is_told_how_to_rename_it(model_dirs: dict[str, Path]) -> None:
    """Both ids default to their directory's name: the error names the option that renames either."""
    args = ["serve", str(model_dirs["policy"]), "--candidate-model", str(model_dirs["policy"])]
    clash = CliRunner().invoke(app, args)
    assert clash.exit_code != 0 and "--candidate-name" in str(clash.exception)


def test_a_feedback_store_that_cannot_be_opened_is_one_line_before_serving(
    model_dirs: dict[str, Path],
) -> None:
    """The model server and the gateway: the store's error, not SQLAlchemy's traceback from start-up."""
    from rlhf.errors import ConfigError

    bad = "postgresql://nobody@127.0.0.1:1/none"  # nothing listens on port 1
    for args in (["serve", str(model_dirs["policy"]), "--feedback-db", bad],
                 ["gateway", "--upstream", "http://127.0.0.1:9/v1", "--feedback-db", bad]):  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, ConfigError), (args[0], result.exception)
        assert str(result.exception).startswith("cannot open the database postgresql"), args[0]
