"""The `rlhf` command: one entry, a sub-command per stage."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rlhf.config import RootConfig, load_config
from rlhf.errors import ConfigError, RlhfError
from rlhf.feedback.cli import app as label_app

if TYPE_CHECKING:
    from rlhf.feedback.db import Database
    from rlhf.feedback.models import PolicyVersion


def settings_help(section: str, also: tuple[str, str] | None = None) -> str:
    """A stage's --help epilog: every setting of its config section, with its default and what it does; `also`:
    (another section, the prefix of its keys the stage reads too), e.g. the judge settings of eval."""
    from rich.markup import escape

    def listed(part: str, prefix: str = "") -> list[str]:
        fields = RootConfig.model_fields[part].annotation.model_fields  # type: ignore[union-attr]
        return [f"[bold]{name}[/bold] = {escape(repr(field.get_default(call_default_factory=True)))}: "
                f"{escape(field.description or '')}" for name, field in fields.items() if name.startswith(prefix)]  # fmt: skip

    lines = [
        f"[bold]Settings[/bold]: the {section}: section of a config file (-c), or --set {section}.KEY=VALUE",
        *listed(section),
    ]
    if also is not None:
        other, prefix = also
        lines += [
            f"[bold]Also read[/bold]: from the {other}: section, --set {other}.KEY=VALUE",
            *listed(other, prefix),
        ]
    return "\n\n".join(lines)


app = typer.Typer(
    help="rlhf-loop: pretrain, SFT, collect human feedback, train a reward model, PPO with KL, serve, iterate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Generate or convert data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(label_app, name="label", help="The labeling web app and its feedback store.")

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


def _summary(line: str) -> None:
    """A training stage's closing line, printed once: by the main process where `accelerate launch` or torchrun
    started several (they set RANK)."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(line)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "urllib3", "accelerate", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _config(config: Path | None, sets: list[str] | None, section: str, out: str | None) -> RootConfig:
    # Commands read their config before importing their stage (torch, transformers): a bad key or value is
    # reported at once, not after seconds of imports.
    overrides = list(sets or [])
    if out:
        overrides.append(f"{section}.out_dir={out}")
    return load_config(config, overrides, section)


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

    paths = demo_task.generate(
        out, seed=cfg.seed if seed is None else seed, n_pretrain=cfg.n_pretrain, n_sft=cfg.n_sft,
        n_rl_prompts=cfg.n_rl_prompts, n_eval_prompts=cfg.n_eval_prompts, sft_rude_rate=cfg.sft_rude_rate,
        sft_wrong_rate=cfg.sft_wrong_rate, sft_ramble_rate=cfg.sft_ramble_rate,
        sft_nonanswer_rate=cfg.sft_nonanswer_rate,
        sft_template_weights=cfg.sft_template_weights, n_tune_prompts=cfg.n_tune_prompts, n_cai_docs=cfg.n_cai_docs,
    )  # fmt: skip
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
    cfg = _config(config, sets, "pretrain", out).pretrain
    from rlhf.stages import pretrain as stage

    _setup_logging(quiet)
    result = stage.run(cfg, resume=resume, quiet=quiet)
    _summary(
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
    cfg = _config(config, sets, "sft", out).sft
    from rlhf.stages import sft as stage

    _setup_logging(quiet)
    result = stage.run(cfg, resume=resume, quiet=quiet)
    _summary(
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
    _setup_logging(quiet)
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
    quiet: QuietOpt = False,
) -> None:
    """Sample K candidate answers per prompt from a policy (nucleus sampling) for labelers to compare."""
    from rlhf.stages import generate as stage

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
    cfg = load_config(config, list(sets or [])).panel
    from rlhf.data.preferences import write_preferences
    from rlhf.labelers.panel import Panel, agreement_with_gold, label_offline, read_candidates

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
    cfg = _config(config, sets, "reward", out).reward
    from rlhf.stages import reward as stage

    _setup_logging(quiet)
    result = stage.run(cfg, resume=resume, quiet=quiet)
    if "eval" not in result:
        return  # another process of a distributed run: the main one reports
    acc = result["eval"]["rm/accuracy"]
    line = f"reward: {result['train_pairs']} pairs in {result['train_groups']} groups; "
    if acc.get("n"):
        low, high = acc["ci95"]
        line += f"held-out accuracy {acc['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}, {acc['n']} pairs); "
    _summary(line + f"model in {cfg.out_dir}/final")
    if cfg.gold_eval:
        from rlhf.eval.reward_eval import add_gold_eval

        files = [cfg.train_file, *([cfg.eval_file] if cfg.eval_file else [])]
        gold = add_gold_eval(cfg.out_dir, files, cfg.format)
        if not gold["gold/pairs"]:
            _summary("reward vs gold: no held-out pairs that gold orders (set reward.eval_fraction > 0)")
            return
        _summary(
            f"reward vs gold on {gold['gold/pairs']} held-out pairs: reward model "
            f"{gold['gold/rm_accuracy']['accuracy']:.3f}, labels (panel) {gold['gold/label_agreement']['accuracy']:.3f}"
        )


@app.command()
def serve(
    model_dir: Annotated[str, typer.Argument(help="policy to serve: model dir, LoRA adapter dir or hub id")],
    feedback_db: Annotated[
        str | None,
        typer.Option(help="feedback store URL (sqlite:///FILE or postgresql://...) that records A/B votes"),
    ] = None,
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 for the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    max_batch_size: Annotated[int | None, typer.Option(help="most sequences decoded together")] = None,
    batch_wait_ms: Annotated[
        float | None, typer.Option(help="when idle, how long a request waits for others to batch with")
    ] = None,
    ab_rate: Annotated[
        float | None, typer.Option(help="share of opted-in requests answered with an A/B pair (0..1)")
    ] = None,
    candidate_model: Annotated[
        str | None, typer.Option(help="second policy: A/B pairs compare it with MODEL_DIR")
    ] = None,
    model_name: Annotated[str | None, typer.Option(help="model id clients ask for")] = None,
    candidate_name: Annotated[
        str | None, typer.Option(help="model id of --candidate-model (default: from its directory)")
    ] = None,
    max_n: Annotated[int | None, typer.Option(help="most choices per request")] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (default 1; 0 = torch's default)")
    ] = None,
    log_level: Annotated[str, typer.Option(help="log level of the server")] = "info",
) -> None:
    """Serve a policy with an OpenAI-compatible API (chat, completions, streaming), batching and A/B feedback.

    Other settings come from RLHF_SERVE_* variables (see docs/serving.md).
    """
    import uvicorn

    from rlhf.serve.main import create_app, open_state
    from rlhf.serve.settings import Settings

    settings = Settings.from_env(
        model_dir=model_dir, feedback_db=feedback_db, host=host, port=port, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, ab_rate=ab_rate, candidate_model=candidate_model, model_name=model_name,
        candidate_name=candidate_name, max_n=max_n, threads=threads,
    )  # fmt: skip
    _setup_logging(quiet=True)
    state = open_state(settings)  # load the models first: a bad path is one line on stderr, not a traceback
    uvicorn.run(create_app(state=state), host=settings.host, port=settings.port, log_level=log_level)


@app.command()
def gateway(
    upstream: Annotated[
        str, typer.Option(help="the engine's OpenAI API base URL, e.g. http://127.0.0.1:8000/v1")
    ],
    feedback_db: Annotated[
        str | None, typer.Option(help="feedback store URL (sqlite:///FILE or postgresql://...) for A/B votes")
    ] = None,
    ab_rate: Annotated[
        float | None, typer.Option(help="share of opted-in requests answered with an A/B pair (0..1)")
    ] = None,
    candidate_model: Annotated[
        str | None, typer.Option(help="model id of the candidate side of A/B pairs (default: the same model)")
    ] = None,
    candidate_upstream: Annotated[
        str | None, typer.Option(help="base URL of the engine serving the candidate (default: --upstream)")
    ] = None,
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 for the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    workers: Annotated[
        int, typer.Option(min=1, help="gateway processes (A/B draws and limits are per process)")
    ] = 1,
    log_level: Annotated[str, typer.Option(help="log level of the server")] = "info",
) -> None:
    """A/B feedback in front of any OpenAI-compatible engine (vLLM, TGI, SGLang, Ollama, llama.cpp, rlhf serve).

    Other settings come from RLHF_GATEWAY_* variables (see docs/scaling.md).
    """
    import uvicorn

    from rlhf.serve.gateway import ENV_PREFIX, GatewaySettings, create_app

    settings = GatewaySettings.from_env(
        upstream=upstream, feedback_db=feedback_db, ab_rate=ab_rate, candidate_model=candidate_model,
        candidate_upstream=candidate_upstream, host=host, port=port,
    )  # fmt: skip
    _setup_logging(quiet=True)
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
        return
    for name, value in settings.model_dump(exclude_none=True).items():  # each worker reads the environment
        os.environ[ENV_PREFIX + name.upper()] = str(value)
    uvicorn.run(
        "rlhf.serve.gateway:app", host=host, port=port, workers=workers, log_level=log_level, access_log=False
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
    cfg = _config(config, sets, "ppo", out).ppo
    from rlhf.stages import ppo as stage

    _setup_logging(quiet)
    gold_fn = None
    if cfg.guard_gold:  # the demo's hidden judge reaches training only here, as the guard's yardstick
        from rlhf.eval.judges import gold_utilities

        gold_fn = gold_utilities
    result = stage.run(cfg, resume=resume, quiet=quiet, gold_fn=gold_fn)
    _summary(
        f"ppo: {result['stop_reason']}; score {result.get('ppo/score', float('nan')):.3f}, "
        f"KL {result.get('ppo/kl', float('nan')):.3f}; model in {cfg.out_dir}/final"
    )


@app.command(epilog=settings_help("dpo"))
def dpo(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Direct preference optimisation (DPO, IPO, conservative DPO, SimPO) of the SFT policy on preference data."""
    cfg = _config(config, sets, "dpo", out).dpo
    from rlhf.stages import dpo as stage

    _setup_logging(quiet)
    result = stage.run(cfg, resume=resume, quiet=quiet)
    line = f"dpo ({cfg.loss}): {result['train_pairs']} pairs in {result['train_judgements']} judgements; "
    if "dpo/eval_accuracy" in result:
        line += (f"held-out reward accuracy {result['dpo/eval_accuracy']:.3f}, "
                 f"margin {result['dpo/eval_margin']:.3f}; ")  # fmt: skip
    _summary(line + f"model in {cfg.out_dir}/final")


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
        *([f"bon.out={out}"] if out else []),
        *([f"bon.n={n}"] if n is not None else []),
    ]
    cfg = load_config(config, overrides).bon
    _setup_logging(quiet)
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
) -> None:
    """Win rate of policy A over policy B under a judge (gold, reward_model, local, endpoint or people), with a
    bootstrap 95% CI, KL to a reference and, on the demo's prompts, its gold metrics (docs/eval.md)."""
    cfg = load_config(config, list(sets or [])).eval
    from rlhf.data.jsonl import write_json
    from rlhf.eval.judges import make_judge
    from rlhf.stages.eval import collect_from_people, compare, format_table, push_to_people

    if reference:
        cfg.reference = reference
    _setup_logging(quiet=True)
    if collect is not None:
        if not collect.is_file():
            raise ConfigError(f"--collect: no such file: {collect}")
        try:
            pending = json.loads(collect.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--collect: {collect}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(pending, dict):
            raise ConfigError(f"--collect: {collect} is not the summary that `rlhf eval` wrote")
        summary = collect_from_people(pending, cfg)
        write_json(out or collect, summary)
        typer.echo(format_table(summary))
        return
    if policy_a is None or policy_b is None:
        raise ConfigError("rlhf eval needs POLICY_A and POLICY_B (or --collect SUMMARY)")
    if cfg.judge == "people":
        if out is None:
            raise ConfigError("judge=people needs --out: the summary that --collect completes later")
        pending = push_to_people(policy_a, policy_b, cfg)
        write_json(out, pending)
        typer.echo(f"eval: {pending['pushed'].get('tasks', 0)} pairs are in project {cfg.judge_project} for "
                   f"people to judge; afterwards: rlhf eval --collect {out} (with the same eval.judge_* settings)")  # fmt: skip
        return
    judge = make_judge(cfg)
    summary = compare(policy_a, policy_b, cfg, judge)
    if out:
        write_json(out, summary)
    typer.echo(format_table(summary))


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
    config: ConfigOpt = None,
    sets: SetOpt = None,
    out: OutOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Red-team a policy: seed attacks per harm category, mutations of those that work, an optional red-team
    model; a classifier flags harmful answers; attack success rate per category with 95% CIs, and preference
    pairs, an SFT filter list and PPO prompts from what was flagged (docs/cai.md). Resumable."""
    cfg = _config(config, sets, "redteam", out).redteam
    from rlhf.stages import redteam as stage

    _setup_logging(quiet)
    if filter_file is None and (filter_list is not None or filter_out is not None):
        raise ConfigError("--filter-list and --filter-out go with --filter FILE (the SFT data to filter)")
    if filter_file is not None:
        listed = filter_list or Path(cfg.out_dir) / "filter.jsonl"
        target = filter_out or Path(cfg.out_dir) / "sft_filtered.jsonl"
        for path in (filter_file, listed):
            if not path.is_file():
                raise ConfigError(f"--filter: no such file: {path}")
        kept, removed = stage.apply_filter(str(filter_file), str(listed), str(target))
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
    cfg = _config(config, sets, "cai", out).cai
    from rlhf.stages import cai as stage

    _setup_logging(quiet)
    summary = stage.revise(cfg, quiet=quiet)
    typer.echo(f"cai revise: {summary['sft_rows']} SFT rows, {summary['pairs']} pairs in {cfg.out_dir}"
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
    root = _config(config, sets, "cai", out)
    from rlhf.stages import cai as stage

    _setup_logging(quiet)
    summary = stage.label(root.cai, root.eval, quiet=quiet)
    typer.echo(f"cai label: {summary['records']} AI labels ({summary['ties']} ties) by {summary['labeler']} in {root.cai.out_dir}"
               + (f", {summary['unrouted_prompts']} prompts no principle applies to left out"
                  if summary["unrouted_prompts"] else "")
               + (f"; {summary['pushed']} votes pushed to project {root.cai.project}" if "pushed" in summary else ""))  # fmt: skip


loop_app = typer.Typer(
    help="Iterative refinement: rounds of generate -> votes -> reward model -> PPO -> eval (docs/loop.md).",
    invoke_without_command=True,
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
    overrides = [*(sets or []), *([f"loop.out_dir={out}"] if out else [])]
    overrides += [f"loop.feedback_url={feedback_url}"] if feedback_url else []
    ctx.obj = (config, overrides)
    if ctx.invoked_subcommand is not None:
        return
    cfg = load_config(config, overrides)
    from rlhf.feedback.loop_state import format_lineage, get_loop, lineage
    from rlhf.stages import loop as stage

    _setup_logging(quiet)
    versions = stage.run(cfg, quiet=quiet)
    for v in versions[1:]:
        typer.echo(_round_line(v))
    store = _loop_db(cfg, None)
    try:
        with store.session() as session:
            typer.echo(format_lineage(lineage(session, get_loop(session, cfg.loop.name), versions[-1].name)))
    finally:
        store.dispose()


def _round_line(v: PolicyVersion) -> str:
    """One line per finished round; online DPO rounds (no reward model) trained the policy on the votes."""
    low, high = v.metrics["ci95"]
    trained = "reward model trained on" if v.reward_model is not None else "online DPO on"
    judge = v.metrics.get("judge", "gold")  # the eval judge's name (rounds recorded before it: gold)
    return (f"round {v.round}: policy {v.name}, {judge} win rate vs SFT {v.metrics['win_rate_vs_sft']:.3f} "
            f"[{low:.3f}, {high:.3f}], {trained} {v.metrics['reward_model_votes']} votes")  # fmt: skip


def _loop_db(cfg: RootConfig, url: str | None) -> Database:
    """The loop's feedback store, migrated."""
    from rlhf.feedback.cli import open_database
    from rlhf.stages.loop import db_url

    return open_database(url or db_url(cfg))


@loop_app.command("status")
def loop_status(ctx: typer.Context, db: LoopDbOpt = None) -> None:
    """Rounds and their phases, versions, vote counts, metrics and the leaderboard (reads the store only)."""
    cfg = load_config(*ctx.obj)
    from rlhf.feedback.loop_state import get_loop, status_text

    store = _loop_db(cfg, db)
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

    store = _loop_db(cfg, db)
    try:
        with store.session() as session:
            typer.echo(format_lineage(lineage(session, get_loop(session, cfg.loop.name), version)))
    finally:
        store.dispose()


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


if __name__ == "__main__":
    main()
