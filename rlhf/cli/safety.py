"""`rlhf redteam` and `rlhf cai`: attacks on a policy, and alignment from a constitution's principles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rlhf.cli.common import (
    ConfigOpt,
    OutOpt,
    QuietOpt,
    SetOpt,
    app,
    settings_help,
    setup_logging,
    stage_config,
)
from rlhf.errors import ConfigError


@app.command(epilog=settings_help("redteam"))
def redteam(
    filter_file: Annotated[
        Path | None,
        typer.Option(
            "--filter", help="instead of a search: write this SFT JSONL without the flagged responses"
        ),
    ] = None,
    filter_list: Annotated[
        Path | None, typer.Option("--filter-list", help="with --filter: the list (default: OUT/filter.jsonl)")
    ] = None,
    filter_out: Annotated[
        Path | None,
        typer.Option("--filter-out", help="with --filter: output (default: OUT/sft_filtered.jsonl)"),
    ] = None,
    by_answer: Annotated[
        bool,
        typer.Option(
            "--filter-by-answer",
            help="with --filter: drop every row giving a flagged answer, whatever its request (default: only "
            "rows giving it to the request it was flagged for)",
        ),
    ] = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Red-team a policy: seed attacks per harm category, mutations of those that work, an optional red-team
    model; a classifier flags harmful answers; attack success rate per category with 95% CIs, and preference
    pairs, an SFT filter list and PPO prompts from what was flagged (docs/cai.md). Resumable."""
    cfg = stage_config(config, sets, "redteam", out).redteam
    from rlhf.stages import redteam as stage

    setup_logging(quiet)
    if filter_file is None and (filter_list is not None or filter_out is not None or by_answer):
        raise ConfigError(
            "--filter-list, --filter-out and --filter-by-answer go with --filter FILE (the SFT data to filter)"
        )
    if filter_file is not None:
        listed = filter_list or Path(cfg.out_dir) / "filter.jsonl"
        target = filter_out or Path(cfg.out_dir) / "sft_filtered.jsonl"
        for option, path in (("--filter", filter_file), ("--filter-list", listed)):
            if not path.is_file():
                raise ConfigError(f"{option}: no such file: {path}")
        kept, removed = stage.apply_filter(str(filter_file), str(listed), str(target), by_answer)
        typer.echo(f"redteam filter: kept {kept} rows, removed {removed} flagged responses; wrote {target}")
        return
    report = stage.run(cfg, quiet=quiet)
    typer.echo(stage.format_report(report))


cai_app = typer.Typer(
    help="Constitutional AI: revise answers under a constitution (SL-CAI), label pairs with AI feedback (RL-CAI).",
    no_args_is_help=True,
)
app.add_typer(cai_app, name="cai")


@cai_app.command("revise", epilog=settings_help("cai"))
def cai_revise(
    config: ConfigOpt = None, sets: SetOpt = None, out: OutOpt = None, quiet: QuietOpt = False
) -> None:
    """Critique and revise the policy's answers under randomly drawn principles, n_revisions times; write the
    final revisions as SFT data and (revision > original) as preference pairs. A principle with applies_to
    (regular expressions in the constitution) is drawn only for prompts they match; prompts no principle
    applies to are left out."""
    cfg = stage_config(config, sets, "cai", out).cai
    from rlhf.stages import cai as stage

    setup_logging(quiet)
    summary = stage.revise(cfg, quiet=quiet)
    typer.echo(f"cai revise: {summary['sft_rows']} SFT rows, {summary['pairs']} pairs in {cfg.out_dir}"
               + (f", {summary['unrevised']} answers with no revision left out" if summary["unrevised"] else "")
               + (f", {summary['unrouted_prompts']} prompts no principle applies to left out"
                  if summary["unrouted_prompts"] else ""))  # fmt: skip


@cai_app.command("label", epilog=settings_help("cai", ("eval", "judge")))
def cai_label(
    config: ConfigOpt = None, sets: SetOpt = None, out: OutOpt = None, quiet: QuietOpt = False
) -> None:
    """Sample two answers per prompt; a judge (the eval section's eval.judge*) picks the better under a randomly
    drawn principle; write the AI labels as preference records, and push them as votes with cai.push_db.
    A principle with applies_to (regular expressions in the constitution) is drawn only for prompts they
    match; prompts no principle applies to get no label."""
    root = stage_config(config, sets, "cai", out)
    from rlhf.stages import cai as stage

    setup_logging(quiet)
    summary = stage.label(root.cai, root.eval, quiet=quiet)
    typer.echo(f"cai label: {summary['records']} AI labels ({summary['ties']} ties) by {summary['labeler']} in {root.cai.out_dir}"
               + (f", {summary['unrouted_prompts']} prompts no principle applies to left out"
                  if summary["unrouted_prompts"] else "")
               + (f" (its labels.jsonl also keeps {summary['kept_beyond']} of an earlier run beyond these)"
                  if summary["kept_beyond"] else "")
               + (f"; {summary['pushed']} votes pushed to project {root.cai.project}" if "pushed" in summary else ""))  # fmt: skip
