"""`rlhf demo`: every stage of the pipeline on the built-in demo task, in one run directory, resumable.

Each stage writes into RUN/<stage>/ and is recorded in RUN/stages.json when it finishes (with its wall time);
started again, the demo skips the finished stages and resumes an unfinished training stage from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf.config import RootConfig, load_config
from rlhf.data.jsonl import write_json

log = logging.getLogger(__name__)

# --fast: the same pipeline, reduced everywhere, for CI and a first look.
FAST_OVERRIDES = [
    "data.n_pretrain=6000",
    "data.n_sft=800",
    "data.n_rl_prompts=400",
    "data.n_eval_prompts=100",
    "pretrain.arch.hidden_size=64",
    "pretrain.arch.intermediate_size=192",
    "pretrain.arch.num_hidden_layers=2",
    "pretrain.block_size=96",
    "pretrain.batch_size=16",
    "pretrain.micro_batch_size=16",
    "sft.epochs=1",
    "generate.max_prompts=160",
    "reward.normalise.n_prompts=64",
    "ppo.iterations=12",
    "ppo.guard_every=4",
    "ppo.guard_prompts=32",
    "ppo.save_every=6",
    "eval.n_prompts=100",
]


def default_config_path() -> Path | None:
    """configs/demo.yaml of a source checkout, or the copy shipped in the package."""
    for candidate in (
        Path(__file__).parents[1] / "configs" / "demo.yaml",
        Path(__file__).parent / "_configs" / "demo.yaml",
    ):
        if candidate.is_file():
            return candidate
    return None


def demo_config(out: Path, fast: bool, config: Path | None, overrides: list[str]) -> RootConfig:
    """The demo's config with every path pointed into the run directory."""
    data = out / "data"
    paths = [
        f"pretrain.out_dir={out / 'pretrain'}",
        f"pretrain.train_file={data / 'pretrain.txt'}",
        f"sft.out_dir={out / 'sft'}",
        f"sft.model={out / 'pretrain' / 'final'}",
        f"sft.train_file={data / 'sft.jsonl'}",
        f"generate.model={out / 'sft' / 'final'}",
        f"generate.prompts_file={data / 'rl_prompts.jsonl'}",
        f"generate.out={out / 'candidates.jsonl'}",
        "generate.policy_version=sft",
        f"reward.out_dir={out / 'reward'}",
        f"reward.model={out / 'sft' / 'final'}",
        f"reward.train_file={out / 'votes.jsonl'}",
        f"ppo.out_dir={out / 'ppo'}",
        f"ppo.policy={out / 'sft' / 'final'}",
        f"ppo.reward_model={out / 'reward' / 'final'}",
        f"ppo.prompts_file={data / 'rl_prompts.jsonl'}",
        f"ppo.eval_prompts_file={data / 'eval_prompts.jsonl'}",
        f"eval.prompts_file={data / 'eval_prompts.jsonl'}",
        f"eval.reference={out / 'sft' / 'final'}",
    ]
    return load_config(
        config or default_config_path(), [*(FAST_OVERRIDES if fast else []), *overrides, *paths]
    )


class Stages:
    """RUN/stages.json: which stages finished, and how long each took."""

    def __init__(self, out: Path) -> None:
        self.path = out / "stages.json"
        self.done: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        if name in self.done:
            log.info("demo: %s already finished, skipped", name)
            return
        t0 = time.perf_counter()
        result = fn() or {}
        self.done[name] = {
            "seconds": round(time.perf_counter() - t0, 2),
            **{k: v for k, v in result.items() if isinstance(v, int | float | str)},
        }
        write_json(self.path, self.done)


PROJECT = "demo"


def train_reward(cfg: RootConfig, quiet: bool) -> dict[str, Any]:
    """The reward model on the exported votes, then its accuracy against gold beside the panel's."""
    from rlhf.eval.reward_eval import add_gold_eval
    from rlhf.train import reward

    result = reward.run(cfg.reward, resume=True, quiet=quiet)
    gold = add_gold_eval(cfg.reward.out_dir, [cfg.reward.train_file], cfg.reward.format)
    return {
        "pairs": result["train_pairs"],
        "rm_gold_accuracy": gold["gold/rm_accuracy"]["accuracy"],
        "panel_gold_agreement": gold["gold/label_agreement"]["accuracy"],
    }


def train_ppo(cfg: RootConfig, quiet: bool) -> dict[str, Any]:
    """PPO with the KL penalty; the guard watches held-out KL, proxy reward and gold utility."""
    from rlhf.eval.judges import gold_utilities
    from rlhf.train import ppo

    result = ppo.run(
        cfg.ppo, resume=True, quiet=quiet, gold_fn=gold_utilities if cfg.ppo.guard_gold else None
    )
    return {"stop_reason": result["stop_reason"]}


def ppo_policy(out: Path) -> Path:
    """The PPO policy to evaluate: the guard's best checkpoint (by gold on held-out prompts) when it kept one."""
    best = out / "ppo" / "best"
    return best if best.exists() else out / "ppo" / "final"


def evaluate(out: Path, cfg: RootConfig) -> dict[str, Any]:
    """PPO vs SFT and pretrained vs SFT under the gold judge, on the held-out prompts."""
    from rlhf.eval.compare import compare
    from rlhf.eval.judges import make_judge

    judge = make_judge(cfg.eval.judge)
    sft = str(out / "sft" / "final")
    results = {}
    for name, policy in (
        ("ppo_vs_sft", str(ppo_policy(out))),
        ("pretrained_vs_sft", str(out / "pretrain" / "final")),
    ):
        summary = compare(policy, sft, cfg.eval, judge)
        write_json(out / "eval" / f"{name}.json", summary)
        results[f"{name}_win_rate"] = summary["win_rate_a"]
        if name == "ppo_vs_sft":
            write_json(
                out / "eval" / "examples.json",
                score_examples(summary["samples"][:12], out / "reward" / "final"),
            )
    return results


def score_examples(samples: list[dict[str, Any]], reward_model: Path) -> list[dict[str, Any]]:
    """Example answers of PPO (a) and SFT (b) with their gold utility and reward-model score."""
    import torch

    from rlhf.generation import left_pad
    from rlhf.labelers import gold
    from rlhf.models.heads import load_scalar_model, sequence_rewards
    from rlhf.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(reward_model))
    rm = load_scalar_model(str(reward_model)).eval()
    rows = []
    for s in samples:
        texts = [s["a"], s["b"]]
        ids = [
            tokenizer(s["prompt"] + t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for t in texts
        ]
        batch, mask = left_pad(ids, tokenizer.pad_token_id)
        with torch.no_grad():
            scores = sequence_rewards(rm, batch, mask).tolist()
        rows.append({
            "prompt": s["prompt"], "ppo": s["a"], "sft": s["b"],
            "gold_ppo": gold.utility(s["prompt"], s["a"]), "gold_sft": gold.utility(s["prompt"], s["b"]),
            "rm_ppo": scores[0], "rm_sft": scores[1],
        })  # fmt: skip
    return rows


def label(out: Path, cfg: RootConfig) -> dict[str, Any]:
    """Candidates -> comparison tasks in the feedback store (SQLite) -> the simulated panel votes through the
    labeling app's HTTP API -> exported votes."""
    from rlhf.data.jsonl import write_jsonl
    from rlhf.feedback.db import Database, upgrade
    from rlhf.feedback.export import export_records
    from rlhf.feedback.importer import import_candidates, read_rows
    from rlhf.feedback.schemas import CandidateRow
    from rlhf.feedback.testing import run_server
    from rlhf.labelers.api_panel import label_through_api, panel_tokens
    from rlhf.labelers.panel import Panel

    db_url = f"sqlite:///{out / 'feedback.db'}"
    db = Database(db_url)
    panel = Panel.from_config(cfg.panel)
    try:
        upgrade(db)
        with db.session() as session:
            rows = read_rows(cfg.generate.out, CandidateRow, 1 << 30)
            imported = import_candidates(session, PROJECT, rows, task_kind="pairwise", overlap=1)
        tokens = panel_tokens(db, panel, "demo panel")
        with run_server(db_url, votes_per_minute=0) as base_url:
            counts = label_through_api(base_url, tokens, panel, PROJECT)
        with db.session() as session:
            n = write_jsonl(cfg.reward.train_file, export_records(session, PROJECT, "votes"))
    finally:
        db.dispose()
    return {"tasks": imported.tasks, "votes": n, "votes_this_run": sum(counts.values())}


def summary_lines(out: Path) -> list[str]:
    """The terminal's closing summary: stage times, then the headline results, read from the run's files."""
    lines = [f"{'stage':>10}  seconds"]
    stages = Stages(out).done
    lines += [f"{name:>10}: {info['seconds']:7.1f}" for name, info in stages.items()]
    reward = stages.get("reward", {})
    if "rm_gold_accuracy" in reward:
        lines.append(f"reward model agrees with gold on {reward['rm_gold_accuracy']:.3f} of held-out pairs "
                     f"(the panel's own votes: {reward['panel_gold_agreement']:.3f})")  # fmt: skip
    comparison = out / "eval" / "ppo_vs_sft.json"
    if comparison.exists():
        e = json.loads(comparison.read_text())
        (low, high), ppo, sft = e["ci95"], e["a"], e["b"]
        lines += [
            f"PPO vs SFT under the gold judge, {e['n_prompts']} held-out prompts: win rate {e['win_rate_a']:.3f} "
            f"(95% CI {low:.3f}-{high:.3f}), KL to SFT {ppo['kl_to_reference']:.2f} nats",
            f"{'':>10}  {'SFT':>7}  {'PPO':>7}",
            *(f"{label:>10}  {sft[key]:7.3f}  {ppo[key]:7.3f}" for label, key in
              [("correct", "correct_rate"), ("rude", "rude_rate"), ("words", "mean_words"), ("EOS", "eos_rate")]),
        ]  # fmt: skip
    if (out / "report.html").exists():
        lines.append(f"report: {out / 'report.html'}")
    return lines


def run(
    out: Path,
    fast: bool = False,
    config: Path | None = None,
    overrides: list[str] | None = None,
    quiet: bool = False,
) -> Stages:
    from rlhf import generate
    from rlhf.data import demo_task
    from rlhf.eval import report
    from rlhf.train import pretrain, sft

    cfg = demo_config(out, fast, config, overrides or [])
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    d = cfg.data

    def data() -> dict[str, Any]:
        demo_task.generate(out / "data", seed=d.seed, n_pretrain=d.n_pretrain, n_sft=d.n_sft, n_rl_prompts=d.n_rl_prompts,
                           n_eval_prompts=d.n_eval_prompts, sft_rude_rate=d.sft_rude_rate, sft_wrong_rate=d.sft_wrong_rate,
                           sft_ramble_rate=d.sft_ramble_rate)  # fmt: skip
        return {"pretrain_docs": d.n_pretrain, "sft_demonstrations": d.n_sft}

    stages.run("data", data)
    stages.run("pretrain", lambda: pretrain.run(cfg.pretrain, resume=True, quiet=quiet))
    stages.run("sft", lambda: sft.run(cfg.sft, resume=True, quiet=quiet))
    stages.run("generate", lambda: generate.run(cfg.generate))
    stages.run("label", lambda: label(out, cfg))
    stages.run("reward", lambda: train_reward(cfg, quiet))
    stages.run("ppo", lambda: train_ppo(cfg, quiet))
    stages.run("eval", lambda: evaluate(out, cfg))
    stages.run("report", lambda: {"path": str(report.write_demo_report(out))})
    return stages
