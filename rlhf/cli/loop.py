"""`rlhf loop`: the rounds of iterative refinement, and `status` and `lineage`, which read its state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from rlhf.cli.common import ConfigOpt, QuietOpt, SetOpt, app, settings_help, setup_logging
from rlhf.config import RootConfig, load_config, text_override

if TYPE_CHECKING:
    from rlhf.feedback.db import Database
    from rlhf.feedback.models import PolicyVersion

loop_app = typer.Typer(
    help="Iterative refinement: rounds of generate -> votes -> reward model -> PPO -> eval (docs/loop.md).",
    invoke_without_command=True,
    epilog=settings_help("loop"),
)
app.add_typer(loop_app, name="loop")
LoopDbOpt = Annotated[
    str | None, typer.Option("--db", help="feedback store URL (default: loop.db, else OUT/feedback.db)")
]


@loop_app.callback()
def loop(
    ctx: typer.Context,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: Annotated[str | None, typer.Option("--out", help="loop directory (default: loop.out_dir)")] = None,
    feedback_url: Annotated[
        str | None, typer.Option("--feedback-url", help="vote through this running `rlhf label serve`")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the loop's rounds (resumes where a killed run stopped); `status` and `lineage` read its state."""
    overrides = [*(sets or []), *([text_override("loop.out_dir", out)] if out else [])]
    overrides += [f"loop.feedback_url={feedback_url}"] if feedback_url else []
    ctx.obj = (config, overrides)
    if ctx.invoked_subcommand is not None:
        return
    cfg = load_config(config, overrides)
    from rlhf.feedback.loop_state import format_lineage, get_loop, lineage
    from rlhf.stages import loop as stage

    setup_logging(quiet)
    versions = stage.run(cfg, quiet=quiet)
    for v in versions[1:]:
        typer.echo(round_line(v))
    store = loop_db(cfg, None)
    try:
        with store.session() as session:
            typer.echo(format_lineage(lineage(session, get_loop(session, cfg.loop.name), versions[-1].name)))
    finally:
        store.dispose()


def round_line(v: PolicyVersion) -> str:
    """One line per finished round; online DPO rounds (no reward model) trained the policy on the votes."""
    low, high = v.metrics["ci95"]
    trained = "reward model trained on" if v.reward_model is not None else "online DPO on"
    judge = v.metrics.get("judge", "gold")  # the eval judge's name (rounds recorded before it: gold)
    from rlhf.feedback.loop_state import UNCHANGED

    unchanged = UNCHANGED if v.metrics.get("unchanged") else ""
    return (f"round {v.round}: policy {v.name}, {judge} win rate vs SFT {v.metrics['win_rate_vs_sft']:.3f} "
            f"[{low:.3f}, {high:.3f}], {trained} {v.metrics['reward_model_votes']} votes{unchanged}")  # fmt: skip


def loop_db(cfg: RootConfig, url: str | None, read_only: bool = False) -> Database:
    """The loop's feedback store, migrated; `read_only` (status, lineage): one that is there, never a new one."""
    from rlhf.errors import ConfigError
    from rlhf.feedback.db import open_database
    from rlhf.stages.loop import db_url

    try:
        return open_database(url or db_url(cfg), existing=read_only)
    except ConfigError as e:
        raise ConfigError(f"{e} (give the loop's store with --db)") from None


@loop_app.command("status")
def loop_status(ctx: typer.Context, db: LoopDbOpt = None) -> None:
    """Rounds and their phases, versions, vote counts, metrics and the leaderboard (reads the store only)."""
    cfg = load_config(*ctx.obj)
    from rlhf.feedback.loop_state import get_loop, status_text

    store = loop_db(cfg, db, read_only=True)
    try:
        with store.session() as session:
            typer.echo(status_text(session, get_loop(session, cfg.loop.name)))
    finally:
        store.dispose()


@loop_app.command("lineage")
def loop_lineage(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="policy version, e.g. r3")],
    db: LoopDbOpt = None,
) -> None:
    """The chain from VERSION back to the SFT policy: each parent, reward model and its vote count."""
    cfg = load_config(*ctx.obj)
    from rlhf.feedback.loop_state import format_lineage, get_loop, lineage

    store = loop_db(cfg, db, read_only=True)
    try:
        with store.session() as session:
            typer.echo(format_lineage(lineage(session, get_loop(session, cfg.loop.name), version)))
    finally:
        store.dispose()
