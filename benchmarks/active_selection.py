"""Active vs random selection of comparisons: reward-model accuracy against gold as a function of votes.

    python -m benchmarks.active_selection --run runs/demo --out runs/active_selection --seeds 0 1 2
    python -m benchmarks.active_selection --run runs/demo --out runs/active_selection --strategies active --l2 0.01

A second call with the same --out adds its curves to RESULTS.json (strategies are labelled with --l2).

From a finished demo run (its SFT policy and prompt files): the SFT policy answers `--pool-prompts` RL prompts
K=4 times (the pool of candidate pairs) and the held-out evaluation prompts K=4 times (the test pairs). Both
strategies start from the same `--start` random pairs; each step adds `--step` pairs, chosen
- random: uniformly from the unlabeled pool;
- active: as `rlhf loop` does (rlhf.active): 25% at random, the rest where bootstrap heads (L2 penalty --l2)
  on the current reward model's features disagree most;
labels them with the simulated panel (the member is fixed per pair, so a pair gets the same vote whichever
strategy picks it), and trains a reward model from the SFT policy on all labels so far (same config each time,
configs/demo.yaml's reward section with 2 epochs, no normalisation). Accuracy: how often the reward model orders
a held-out pair as the gold utility does (pairs gold rates equal skipped). Writes RESULTS.json and a PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from rlhf.active import select_pairs
from rlhf.config import load_config
from rlhf.data.jsonl import iter_jsonl, write_json, write_jsonl
from rlhf.engine.decoding import left_pad
from rlhf.labelers.panel import Panel, gold_order
from rlhf.models.heads import load_scalar_model, sequence_rewards
from rlhf.models.loading import load_tokenizer
from rlhf.stages.loop import candidate_pairs, disagreement_scores

log = logging.getLogger("active_selection")
ROOT = Path(__file__).resolve().parents[1]


def candidates(
    run: Path, out: Path, name: str, prompts_file: Path, n: int, seed: int
) -> list[dict[str, Any]]:
    """K=4 answers of the SFT policy to the first n prompts (cached in OUT)."""
    from rlhf.stages import generate

    path = out / f"{name}.jsonl"
    if not path.exists():
        cfg = load_config(ROOT / "configs" / "demo.yaml").generate.model_copy(update={
            "model": str(run / "sft" / "final"), "prompts_file": str(prompts_file), "out": str(path),
            "policy_version": "sft", "k": 4, "max_prompts": n, "seed": seed,
        })  # fmt: skip
        generate.run(cfg)
    return [row for _, row in iter_jsonl(path)]


@torch.no_grad()
def rm_accuracy(rm_path: str, test: list[tuple[str, str, str]]) -> float:
    """Share of held-out (prompt, gold-better, gold-worse) pairs the reward model orders the same way."""
    tokenizer, model = load_tokenizer(rm_path), load_scalar_model(rm_path).eval()
    texts = sorted({(p, c) for p, a, b in test for c in (a, b)})
    scores: dict[tuple[str, str], float] = {}
    for s in range(0, len(texts), 128):
        chunk = texts[s : s + 128]
        ids = [tokenizer(p + c, add_special_tokens=False)["input_ids"][-127:] + [tokenizer.eos_token_id]
               for p, c in chunk]  # fmt: skip
        batch, mask = left_pad(ids, tokenizer.pad_token_id)
        scores.update(zip(chunk, sequence_rewards(model, batch, mask, normalise=False).tolist(), strict=True))
    return sum(scores[(p, a)] > scores[(p, b)] for p, a, b in test) / len(test)


def train_rm(run: Path, votes: list[dict[str, Any]], out: Path, seed: int) -> str:
    from rlhf.stages import reward

    write_jsonl(out / "votes.jsonl", votes)
    cfg = load_config(ROOT / "configs" / "demo.yaml").reward.model_copy(update={
        "out_dir": str(out), "model": str(run / "sft" / "final"), "train_file": str(out / "votes.jsonl"),
        "eval_fraction": 0.0, "epochs": 2, "seed": seed, "save_every": 10_000, "gold_eval": False,
    })  # fmt: skip
    cfg.normalise.enabled = False
    reward.run(cfg, quiet=True)
    return str(out / "final")


def curve(
    strategy: str, run: Path, out: Path, pool: list[dict[str, Any]], test: list[tuple[str, str, str]],
    args: argparse.Namespace, seed: int,
) -> list[dict[str, Any]]:  # fmt: skip
    cfg = load_config(
        ROOT / "configs" / "demo.yaml", [f"loop.ensemble_size={args.heads}", f"loop.ensemble_l2={args.l2}"]
    )
    panel = Panel.from_config(cfg.panel)
    pairs = candidate_pairs(pool)
    rng = random.Random(seed)
    labeled = set(rng.sample(range(len(pairs)), args.start))  # the same start for both strategies

    def vote(idx: int) -> dict[str, Any]:
        p, i, j = pairs[idx]
        row = pool[p]
        a, b = row["completions"][i]["text"], row["completions"][j]["text"]
        member = panel.members[idx % len(panel.members)]
        return {"prompt": row["prompt"], "completion_a": a, "completion_b": b, "labeler": member.name,
                "choice": panel.compare(row["prompt"], a, b, member=member)}  # fmt: skip

    points = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        votes = [vote(idx) for idx in sorted(labeled)]
        tag = strategy if strategy == "random" else f"{strategy}-l2_{args.l2:g}"
        rm = train_rm(run, votes, out / f"{tag}-s{seed}-{step}", seed)
        acc = rm_accuracy(rm, test)
        points.append({"votes": len(labeled), "accuracy": acc})
        log.info("%s seed %d: %d votes -> accuracy %.4f (%.0f s)", strategy, seed, len(labeled), acc,
                 time.perf_counter() - t0)  # fmt: skip
        if step == args.steps:
            break
        rest = [idx for idx in range(len(pairs)) if idx not in labeled]
        scores = None
        if strategy == "active":
            scores = disagreement_scores(
                cfg, rm, pool, [pairs[idx] for idx in rest], votes, seed * 1000 + step
            )
        chosen = select_pairs([pairs[idx] for idx in rest], scores, args.step,
                              cfg.loop.random_share if scores is not None else 1.0, seed * 1000 + step)  # fmt: skip
        picked = {(p, i, j) for p, sel in chosen.items() for i, j in sel.pairs}
        labeled |= {idx for idx in rest if pairs[idx] in picked}
    return points


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (strategy, runs), color in zip(
        results["curves"].items(), ["tab:gray", "tab:blue", "tab:orange", "tab:green"], strict=False
    ):
        votes = [p["votes"] for p in runs[0]]
        mean = [sum(r[k]["accuracy"] for r in runs) / len(runs) for k in range(len(votes))]
        for r in runs:
            ax.plot(votes, [p["accuracy"] for p in r], color=color, alpha=0.25, lw=1)
        ax.plot(votes, mean, color=color, lw=2, marker="o", label=f"{strategy} (mean of {len(runs)} seeds)")
    ax.set_xlabel("votes (labeled pairs)")
    ax.set_ylabel("reward model accuracy vs gold (held-out pairs)")
    ax.set_title("Active vs random selection of comparisons (demo task)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(results: dict[str, Any], targets: tuple[float, ...] = (0.78, 0.80, 0.82)) -> str:
    """Markdown: mean accuracy per vote count for each strategy, and the votes each needs to reach a target
    (first vote count whose seed-mean accuracy is at or above it)."""
    labels = list(results["curves"])
    votes = [p["votes"] for p in results["curves"][labels[0]][0]]
    means = {
        label: [sum(r[k]["accuracy"] for r in runs) / len(runs) for k in range(len(votes))]
        for label, runs in results["curves"].items()
    }
    lines = ["| votes | " + " | ".join(f"{label} ({len(results['curves'][label])} seeds)" for label in labels) + " |",
             "|---|" + "---|" * len(labels)]  # fmt: skip
    for k, v in enumerate(votes):
        lines.append(f"| {v} | " + " | ".join(f"{means[label][k]:.3f}" for label in labels) + " |")
    for target in targets:
        reach = [next((f"{v}" for v, m in zip(votes, means[label], strict=True) if m >= target), "not reached")
                 for label in labels]  # fmt: skip
        lines.append(f"| votes to reach {target:.2f} | " + " | ".join(reach) + " |")
    for label in labels[1:]:
        diffs = [
            a["accuracy"] - r["accuracy"]
            for run_a, run_r in zip(results["curves"][label], results["curves"][labels[0]], strict=False)
            for a, r in list(zip(run_a, run_r, strict=True))[1:]
        ]  # paired: same seed, same start, same vote count (the shared starting point left out)
        wins = sum(d > 0 for d in diffs)
        lines.append(f"\n{label} - {labels[0]}, paired by seed and vote count: mean {sum(diffs) / len(diffs):+.3f}, "
                     f"ahead at {wins} of {len(diffs)} points")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished `rlhf demo` run")
    parser.add_argument("--out", type=Path, default=Path("runs/active_selection"))
    parser.add_argument("--pool-prompts", type=int, default=400)
    parser.add_argument("--test-prompts", type=int, default=300)
    parser.add_argument("--start", type=int, default=150, help="random pairs both strategies start from")
    parser.add_argument("--step", type=int, default=150, help="pairs added per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--heads", type=int, default=6, help="bootstrap heads")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=["random", "active"], choices=["random", "active"])
    parser.add_argument(
        "--l2", type=float, default=0.01, help="L2 penalty of the bootstrap heads (loop.ensemble_l2)"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "images" / "active_selection.png")
    parser.add_argument(
        "--report", action="store_true", help="only plot and print the table of --out's results"
    )
    parser.add_argument(
        "--labels", nargs="+", help="with --report: only these curves (the first is the baseline)"
    )
    args = parser.parse_args()
    if args.report:
        results = json.loads((args.out / "results.json").read_text())
        if args.labels:  # e.g. --labels random "active (l2=0.01)"
            results["curves"] = {label: results["curves"][label] for label in args.labels}
        plot(results, args.plot)
        print(table(results))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("rlhf", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    pool = candidates(
        args.run, args.out, "pool", args.run / "data" / "rl_prompts.jsonl", args.pool_prompts, 1
    )
    held = candidates(
        args.run, args.out, "test", args.run / "data" / "eval_prompts.jsonl", args.test_prompts, 2
    )
    test = []
    for row in held:
        for _, i, j in candidate_pairs([row]):
            a, b = row["completions"][i]["text"], row["completions"][j]["text"]
            order = gold_order(row["prompt"], a, b, None, None)
            if order:
                test.append((row["prompt"], a, b) if order > 0 else (row["prompt"], b, a))
    log.info("pool: %d pairs; test: %d gold-ordered held-out pairs", len(candidate_pairs(pool)), len(test))
    path = args.out / "results.json"
    results: dict[str, Any] = (
        json.loads(path.read_text()) if path.exists() else {"test_pairs": len(test), "curves": {}}
    )
    results.setdefault("runs", []).append({k: str(v) for k, v in vars(args).items()})
    for seed in args.seeds:
        for strategy in args.strategies:
            label = strategy if strategy == "random" else f"active (l2={args.l2:g})"
            results["curves"][label] = results["curves"].get(label, []) + [
                curve(strategy, args.run, args.out, pool, test, args, seed)
            ]
            write_json(path, results)
    plot(results, args.plot)
    log.info("wrote %s and %s", args.out / "results.json", args.plot)
    print(table(results))


if __name__ == "__main__":
    main()
