"""The training and evaluation stages' commands: data, pretrain, SFT, the demo, generate, reward, PPO, DPO,
best-of-n and eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rlhf.cli.common import (
    ConfigOpt,
    OutOpt,
    QuietOpt,
    ResumeOpt,
    SetOpt,
    app,
    data_app,
    settings_help,
    setup_logging,
    stage_config,
    summary,
)
from rlhf.config import load_config, text_override
from rlhf.errors import ConfigError


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
    cfg = load_config(config, list(sets or [])).data
    from rlhf.data import demo_task
    from rlhf.data.jsonl import check_output_dir

    check_output_dir(out, "--out")

    # the data section's fields are generate's arguments, by name
    paths = demo_task.generate(out, **(cfg.model_dump() | ({} if seed is None else {"seed": seed})))
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@app.command(epilog=settings_help("pretrain"))
def pretrain(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pretrain a causal LM on a corpus (next-token prediction on packed blocks)."""
    cfg = stage_config(config, sets, "pretrain", out).pretrain
    from rlhf.stages import pretrain as stage

    setup_logging(quiet)
    result = stage.run(cfg, resume=resume, quiet=quiet)
    summary(
        f"pretrain: held-out loss {result.get('loss', float('nan')):.4f}, ppl {result.get('ppl', float('nan')):.2f}; model in {cfg.out_dir}/final"
    )


@app.command(epilog=settings_help("sft"))
def sft(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Supervised fine-tuning on prompt -> response demonstrations (loss on response tokens only)."""
    cfg = stage_config(config, sets, "sft", out).sft
    from rlhf.stages import sft as stage

    setup_logging(quiet)
    result = stage.run(cfg, resume=resume, quiet=quiet)
    summary(
        f"sft: held-out response loss {result.get('loss', float('nan')):.4f}; model in {cfg.out_dir}/final"
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="run directory of the whole demo")] = Path("runs/demo"),
    fast: Annotated[bool, typer.Option("--fast", help="a reduced demo, end to end in a few minutes")] = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run every stage on the built-in demo task; interrupted, it resumes where it stopped."""
    from rlhf.stages import demo as demo_run

    load_config(config, list(sets or []))  # check the config before any work
    setup_logging(quiet)
    demo_run.run(out, fast=fast, config=config, overrides=list(sets or []), quiet=quiet)
    for line in demo_run.summary_lines(out):
        typer.echo(line)
    typer.echo(f"run directory: {out}")


@app.command("generate", epilog=settings_help("generate"))
def generate_candidates(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: Annotated[str | None, typer.Option("--out", help="candidates JSONL (default: generate.out)")] = None,
    policy_version: Annotated[
        str | None, typer.Option("--policy-version", help="policy name stored with each completion")
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint", help="OpenAI-compatible engine that samples (base URL; default: generate.endpoint)"
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Sample K candidate answers per prompt from a policy (nucleus sampling) for labelers to compare."""
    from rlhf.stages import generate as stage

    overrides = list(sets or [])
    if out:
        overrides.append(text_override("generate.out", out))
    if policy_version:
        overrides.append(f"generate.policy_version={policy_version}")
    if endpoint:
        overrides.append(text_override("generate.endpoint", endpoint))
    cfg = load_config(config, overrides).generate
    setup_logging(quiet)
    result = stage.run(cfg)
    typer.echo(
        f"generate: {result['completions']} answers to {result['prompts']} prompts by {result['policy']} "
        f"{' at ' + result['endpoint'] if result['endpoint'] else ''} (EOS rate {result['eos_rate']:.2f}) in "
        f"{result['seconds']:.1f}s; written to {result['out']}"
    )


@data_app.command("label-offline")
def data_label_offline(
    candidates: Annotated[Path, typer.Option("--candidates", help="candidates JSONL from `rlhf generate`")],
    out: Annotated[Path, typer.Option("--out", help="votes JSONL to write")] = Path("votes.jsonl"),
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Label candidates with the simulated panel (no web app): vote-format JSONL, plus its agreement with gold."""
    cfg = load_config(config, list(sets or [])).panel
    from rlhf.data.jsonl import check_output_file
    from rlhf.data.preferences import write_preferences
    from rlhf.labelers.panel import Panel, agreement_with_gold, label_offline, read_candidates

    check_output_file(out, "--out")
    rows = read_candidates(candidates)
    votes = label_offline(rows, Panel.from_config(cfg), cfg.pairs_per_prompt)
    write_preferences(out, votes)
    agreement = agreement_with_gold(votes)
    typer.echo(
        f"label-offline: {len(votes)} votes on {len(rows)} prompts by {cfg.size} simulated labelers; "
        f"agreement with gold {agreement.rate:.3f} on {agreement.n} gold-ordered pairs; written to {out}"
    )


@app.command(epilog=settings_help("reward"))
def reward(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a Bradley-Terry reward model on preference data, initialised from the SFT policy."""
    cfg = stage_config(config, sets, "reward", out).reward
    from rlhf.stages import reward as stage

    setup_logging(quiet)
    result = stage.run(cfg, resume=resume, quiet=quiet)
    if "eval" not in result:
        return  # another process of a distributed run: the main one reports
    acc = result["eval"]["rm/accuracy"]
    line = f"reward: {result['train_pairs']} pairs in {result['train_groups']} groups; "
    if acc.get("n"):
        low, high = acc["ci95"]
        line += f"held-out accuracy {acc['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}, {acc['n']} pairs); "
    summary(line + f"model in {cfg.out_dir}/final")
    if cfg.gold_eval:
        from rlhf.eval.reward_eval import add_gold_eval

        files = [cfg.train_file, *([cfg.eval_file] if cfg.eval_file else [])]
        gold = add_gold_eval(cfg.out_dir, files, cfg.format)
        if not gold["gold/pairs"]:
            summary("reward vs gold: no held-out pairs that gold orders ("
                    + (f"reward.eval_file {cfg.eval_file} has none)" if cfg.eval_file
                       else "set reward.eval_fraction > 0, or reward.eval_file)"))  # fmt: skip
            return
        summary(
            f"reward vs gold on {gold['gold/pairs']} held-out pairs: reward model "
            f"{gold['gold/rm_accuracy']['accuracy']:.3f}, labels (panel) {gold['gold/label_agreement']['accuracy']:.3f}"
        )


@app.command(epilog=settings_help("ppo"))
def ppo(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """PPO against the reward model with a KL penalty to the SFT reference (and the reward-hacking guard)."""
    cfg = stage_config(config, sets, "ppo", out).ppo
    from rlhf.stages import ppo as stage

    setup_logging(quiet)
    gold_fn = None
    if cfg.guard_gold:  # the demo's hidden judge reaches training only here, as the guard's yardstick
        from rlhf.eval.judges import gold_utilities

        gold_fn = gold_utilities
    result = stage.run(cfg, resume=resume, quiet=quiet, gold_fn=gold_fn)
    # the guard's choice, where it kept one (the policy `rlhf demo` and `rlhf loop` go on with), and the last
    best = Path(cfg.out_dir) / "best"
    kept = (f"the guard's best (iteration {result['best_iteration']}) in {best}, the last in {cfg.out_dir}/final"
            if best.is_dir() and result.get("best_iteration") is not None else f"model in {cfg.out_dir}/final")  # fmt: skip
    summary(
        f"ppo: {result['stop_reason']}; score {result.get('ppo/score', float('nan')):.3f}, "
        f"KL {result.get('ppo/kl', float('nan')):.3f}; {kept}"
    )


@app.command(epilog=settings_help("dpo"))
def dpo(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Direct preference optimisation (DPO, IPO, conservative DPO, SimPO, ORPO, KTO) of the SFT policy on preference
    data."""
    cfg = stage_config(config, sets, "dpo", out).dpo
    from rlhf.stages import dpo as stage

    setup_logging(quiet)
    result = stage.run(cfg, resume=resume, quiet=quiet)
    loss = cfg.loss + (f", label smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else "")
    terms = "judged answers" if cfg.loss == "kto" else "pairs"
    line = f"dpo ({loss}): {result['train_pairs']} {terms} in {result['train_judgements']} judgements; "
    if "dpo/eval_accuracy" in result:
        line += (f"held-out reward accuracy {result['dpo/eval_accuracy']:.3f}, "
                 f"margin {result['dpo/eval_margin']:.3f}; ")  # fmt: skip
    summary(line + f"model in {cfg.out_dir}/final")


@app.command(epilog=settings_help("bon"))
def bon(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: Annotated[str | None, typer.Option("--out", help="kept answers JSONL (default: bon.out)")] = None,
    n: Annotated[int | None, typer.Option("--n", help="answers sampled per prompt (default: bon.n)")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Best-of-n: sample n answers per prompt, keep the reward model's favourite (SFT data for rejection sampling)."""
    from rlhf.stages import bon as stage

    overrides = [
        *(sets or []),
        *([text_override("bon.out", out)] if out else []),
        *([f"bon.n={n}"] if n is not None else []),
    ]
    cfg = load_config(config, overrides).bon
    setup_logging(quiet)
    result = stage.run(cfg)
    typer.echo(
        f"bon: best of {result['n']} on {result['prompts']} prompts, score {result['best_score']:.3f} "
        f"(one sample: {result['mean_score']:.3f}, KL <= {result['kl_bound']:.3f} nats); {result['written']} written "
        f"to {result['out']}"
        + (f" ({result['unfinished']} whose answers never ended left out)" if result["written"] < result["prompts"]
           else "")
    )  # fmt: skip


@app.command("eval", epilog=settings_help("eval"))
def eval_(
    policy_a: Annotated[str | None, typer.Argument(help="policy A (local dir or hub id)")] = None,
    policy_b: Annotated[
        str | None, typer.Argument(help="policy B, the baseline (local dir or hub id)")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option("--reference", help="measure each policy's KL to this model (default: eval.reference)"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the JSON summary here")] = None,
    collect: Annotated[
        Path | None,
        typer.Option("--collect", help="judge=people: read the votes on the pairs this summary pushed"),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="accepted as by the other stages: eval logs plain lines anyway"),
    ] = False,
) -> None:
    """Win rate of policy A over policy B under a judge (gold, reward_model, local, endpoint or people), with a
    bootstrap 95% CI, KL to a reference and, on the demo's prompts, its gold metrics (docs/eval.md)."""
    cfg = load_config(config, list(sets or [])).eval
    from rlhf.data.jsonl import check_output_file, write_json
    from rlhf.eval.judges import make_judge
    from rlhf.stages.eval import collect_from_people, compare, format_table, push_to_people

    if reference:
        cfg.reference = reference
    setup_logging(quiet=True)  # no progress bars here, with --quiet or without
    if out is not None:
        check_output_file(out, "--out")
    if collect is not None:
        if policy_a is not None:
            raise ConfigError(
                "--collect completes the evaluation its summary names: give no POLICY_A or POLICY_B"
            )
        if not collect.is_file():
            raise ConfigError(f"--collect: no such file: {collect}")
        try:
            pending = json.loads(collect.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--collect: {collect}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(pending, dict):
            raise ConfigError(f"--collect: {collect} is not the summary that `rlhf eval` wrote")
        summary = collect_from_people(pending, cfg)
        write_json(out or collect, summary, strict=True)
        typer.echo(format_table(summary))
        return
    if policy_a is None or policy_b is None:
        raise ConfigError("rlhf eval needs POLICY_A and POLICY_B (or --collect SUMMARY)")
    if cfg.judge == "people":
        if out is None:
            raise ConfigError("judge=people needs --out: the summary that --collect completes later")
        pending = push_to_people(policy_a, policy_b, cfg)
        write_json(out, pending, strict=True)
        typer.echo(f"eval: {pending['pushed'].get('tasks', 0)} pairs are in project {cfg.judge_project} for "
                   f"people to judge; afterwards: rlhf eval --collect {out} (with the same eval.judge_* settings)")  # fmt: skip
        return
    judge = make_judge(cfg)
    summary = compare(policy_a, policy_b, cfg, judge)
    if out:
        write_json(out, summary, strict=True)
    typer.echo(format_table(summary))
