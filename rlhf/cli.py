"""The `rlhf` command: one entry, a sub-command per stage."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from rlhf.config import RootConfig, load_config
from rlhf.errors import RlhfError

app = typer.Typer(
    help="rlhf-loop: pretrain, SFT, collect human feedback, train a reward model, PPO with KL, serve, iterate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Generate or convert data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config with one section per stage")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a config key, e.g. --set sft.lr=3e-4 (repeatable)")
]
OutOpt = Annotated[str | None, typer.Option("--out", help="run directory (default: the stage's out_dir)")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="continue from the run directory's last checkpoint")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="plain log lines instead of progress bars")]


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "urllib3", "accelerate", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config(config: Path | None, sets: list[str] | None, section: str, out: str | None) -> RootConfig:
    overrides = list(sets or [])
    if out:
        overrides.append(f"{section}.out_dir={out}")
    return load_config(config, overrides)


@data_app.command("demo")
def data_demo(
    out: Annotated[Path, typer.Option("--out", help="directory for the generated files")] = Path("data/demo"),
    seed: Annotated[
        int | None, typer.Option("--seed", help="generator seed (default: data.seed of the config)")
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Write the demo task: pretraining corpus, SFT demonstrations, RL and evaluation prompts (offline, deterministic)."""
    from rlhf.data import demo_task

    cfg = load_config(config, list(sets or [])).data
    paths = demo_task.generate(
        out, seed=cfg.seed if seed is None else seed, n_pretrain=cfg.n_pretrain, n_sft=cfg.n_sft,
        n_rl_prompts=cfg.n_rl_prompts, n_eval_prompts=cfg.n_eval_prompts, sft_rude_rate=cfg.sft_rude_rate,
        sft_wrong_rate=cfg.sft_wrong_rate, sft_ramble_rate=cfg.sft_ramble_rate,
    )  # fmt: skip
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@app.command()
def pretrain(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pretrain a causal LM on a corpus (next-token prediction on packed blocks)."""
    from rlhf.train import pretrain as stage

    cfg = _config(config, sets, "pretrain", out).pretrain
    _setup_logging(quiet)
    result = stage.run(cfg, resume=resume, quiet=quiet)
    typer.echo(
        f"pretrain: held-out loss {result.get('loss', float('nan')):.4f}, ppl {result.get('ppl', float('nan')):.2f}; model in {cfg.out_dir}/final"
    )


@app.command()
def sft(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Supervised fine-tuning on prompt -> response demonstrations (loss on response tokens only)."""
    from rlhf.train import sft as stage

    cfg = _config(config, sets, "sft", out).sft
    _setup_logging(quiet)
    result = stage.run(cfg, resume=resume, quiet=quiet)
    typer.echo(
        f"sft: held-out response loss {result.get('loss', float('nan')):.4f}; model in {cfg.out_dir}/final"
    )


@app.command("generate")
def generate_candidates(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: Annotated[str | None, typer.Option("--out", help="candidates JSONL (default: generate.out)")] = None,
    policy_version: Annotated[
        str | None, typer.Option("--policy-version", help="policy name stored with each completion")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Sample K candidate answers per prompt from a policy (nucleus sampling) for labelers to compare."""
    from rlhf import generate as stage

    overrides = list(sets or [])
    if out:
        overrides.append(f"generate.out={out}")
    if policy_version:
        overrides.append(f"generate.policy_version={policy_version}")
    cfg = load_config(config, overrides).generate
    _setup_logging(quiet)
    result = stage.run(cfg)
    typer.echo(
        f"generate: {result['completions']} answers to {result['prompts']} prompts by {result['policy']} "
        f"(EOS rate {result['eos_rate']:.2f}) in {result['seconds']:.1f}s; written to {result['out']}"
    )


@data_app.command("label-offline")
def data_label_offline(
    candidates: Annotated[Path, typer.Option("--candidates", help="candidates JSONL from `rlhf generate`")],
    out: Annotated[Path, typer.Option("--out", help="votes JSONL to write")] = Path("votes.jsonl"),
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Label candidates with the simulated panel (no web app): vote-format JSONL, plus its agreement with gold."""
    from rlhf.data.preferences import write_preferences
    from rlhf.labelers.panel import Panel, agreement_with_gold, label_offline, read_candidates

    cfg = load_config(config, list(sets or [])).panel
    rows = read_candidates(candidates)
    votes = label_offline(rows, Panel.from_config(cfg), cfg.pairs_per_prompt)
    write_preferences(out, votes)
    agreement = agreement_with_gold(votes)
    typer.echo(
        f"label-offline: {len(votes)} votes on {len(rows)} prompts by {cfg.size} simulated labelers; "
        f"agreement with gold {agreement.rate:.3f} on {agreement.n} gold-ordered pairs; written to {out}"
    )


@app.command()
def reward(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a Bradley-Terry reward model on preference data, initialised from the SFT policy."""
    from rlhf.train import reward as stage

    cfg = _config(config, sets, "reward", out).reward
    _setup_logging(quiet)
    result = stage.run(cfg, resume=resume, quiet=quiet)
    if "eval" not in result:
        return  # another process of a distributed run: the main one reports
    acc = result["eval"]["rm/accuracy"]
    line = f"reward: {result['train_pairs']} pairs in {result['train_groups']} groups; "
    if acc.get("n"):
        low, high = acc["ci95"]
        line += f"held-out accuracy {acc['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}, {acc['n']} pairs); "
    typer.echo(line + f"model in {cfg.out_dir}/final")
    if cfg.gold_eval:
        from rlhf.eval.reward_eval import add_gold_eval

        files = [cfg.train_file, *([cfg.eval_file] if cfg.eval_file else [])]
        gold = add_gold_eval(cfg.out_dir, files, cfg.format)
        if not gold["gold/pairs"]:
            typer.echo("reward vs gold: no held-out pairs that gold orders (set reward.eval_fraction > 0)")
            return
        typer.echo(
            f"reward vs gold on {gold['gold/pairs']} held-out pairs: reward model "
            f"{gold['gold/rm_accuracy']['accuracy']:.3f}, labels (panel) {gold['gold/label_agreement']['accuracy']:.3f}"
        )


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 1."""
    try:
        app()
    except RlhfError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
