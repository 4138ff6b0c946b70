"""The reward-KL frontier of every method on the demo world: PPO, RLOO, GRPO, REINFORCE++, DPO, IPO, ORPO, KTO and
best-of-n.

    rlhf demo --fast --out runs/demo_fast             # the SFT policy, reward model and votes they all start from
    python -m benchmarks.method_frontier --demo runs/demo_fast [--seeds 0 1 2]

Every method starts from the same SFT policy; the RL methods train against the same reward model with the demo's
PPO settings (RUN/ppo/config.yaml: the same prompts, answers per iteration, KL coefficient and learning rate),
the critic-free ones sampling k answers per prompt instead of training a critic; DPO, IPO, ORPO and KTO train on
the votes the reward model learned from (KTO on their winners and losers, each judged alone); best-of-n needs no training. Each resulting policy answers the held-out prompts
(`rlhf eval` against the SFT policy with the gold judge): gold utility, win rate against SFT, KL to SFT in nats
(the exact per-token KL along the samples; for best-of-n the analytic bound log n - (n - 1) / n), and the proxy,
the reward model's mean score of the answers. Wall time and peak memory (max RSS) are those of the training
process. Results: benchmarks/results/method_frontier.json, a plot in docs/images/methods_frontier.png and a
table in docs/methods.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.common import replace_doc_section
from benchmarks.reward_throughput import machine
from rlhf.config import EvalConfig
from rlhf.data.jsonl import write_json
from rlhf.data.prompts import read_prompts
from rlhf.engine.best_of_n import best_of_n
from rlhf.engine.decoding import SamplingParams
from rlhf.eval.judges import GoldJudge
from rlhf.models.heads import load_scalar_model
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.stages.eval import compare

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "method_frontier.json"
PLOT = ROOT / "docs" / "images" / "methods_frontier.png"
DOC = ROOT / "docs" / "methods.md"
START, END = "<!-- method_frontier:start -->", "<!-- method_frontier:end -->"
ENV = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

# RL variants: settings laid over the demo's ppo section
RL: dict[str, dict[str, Any]] = {
    "ppo": {},
    "rloo": {"advantage_estimator": "rloo", "samples_per_prompt": 4},
    "grpo": {"advantage_estimator": "grpo", "samples_per_prompt": 4, "grpo_scale_by_std": False, "kl_in": "loss",
             "kl_estimator": "k3", "clip_eps_high": 0.28, "loss_aggregation": "seq_mean_token_sum_norm"},
    "reinforce_pp": {"advantage_estimator": "reinforce_pp", "kl_estimator": "k1"},
}  # fmt: skip
DPO: dict[str, dict[str, Any]] = {
    "dpo": {"loss": "sigmoid", "beta": 0.1},
    "ipo": {"loss": "ipo", "beta": 0.1},
    "orpo": {"loss": "orpo", "beta": 0.1},
    "kto": {"loss": "kto", "beta": 0.1},
}
BON_N = [1, 2, 4, 8, 16, 32, 64]


def run_stage(stage: str, section: dict[str, Any], work: Path) -> dict[str, float]:
    """One training run in its own process: (seconds, peak RSS in MiB)."""
    config = work / f"{stage}-{Path(section['out_dir']).name}.yaml"
    config.write_text(yaml.safe_dump({stage: section}))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", stage, "-q", "-c", str(config)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{stage} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024}


@torch.no_grad()
def proxy_score(
    policy: str, reward_model: str, prompts: list[str], n: int, cfg: EvalConfig, seed: int
) -> float:
    """The reward model's mean score of the policy's (best-of-n) answers to the held-out prompts."""
    picked = best_of_n(load_causal_lm(policy).eval(), load_scalar_model(reward_model).eval(), load_tokenizer(policy),
                       prompts, n, SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p),
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return sum(r.scores[r.best] for r in picked) / len(picked)


def evaluate(policy: str, sft: str, rm: str, cfg: EvalConfig, n: int = 1) -> dict[str, float]:
    cfg = cfg.model_copy(update={"best_of_n": n, "reward_model": rm if n > 1 else None})
    summary = compare(policy, sft, cfg, GoldJudge())
    prompts = read_prompts(cfg.prompts_file, cfg.n_prompts)
    return {"gold": summary["a"]["gold_utility"], "kl": summary["a"]["kl_to_reference"],
            "win_rate": summary["win_rate_a"], "proxy": proxy_score(policy, rm, prompts, n, cfg, cfg.seed)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--demo", type=Path, default=Path("runs/demo_fast"), help="a finished `rlhf demo` run"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: DEMO/frontier)")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/methods.md and the plot")
    args = parser.parse_args()
    demo = args.demo
    work = args.work or demo / "frontier"
    work.mkdir(parents=True, exist_ok=True)
    ppo_base = yaml.safe_load((demo / "ppo" / "config.yaml").read_text())
    sft, rm = ppo_base["policy"], ppo_base["reward_model"]
    eval_base = EvalConfig(prompts_file=str(demo / "data" / "eval_prompts.jsonl"), n_prompts=100, reference=sft,
                           max_new_tokens=ppo_base["max_new_tokens"], temperature=ppo_base["temperature"],
                           precision="fp32", bootstrap=200)  # fmt: skip
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        eval_cfg = eval_base.model_copy(update={"seed": seed})
        for name, settings in RL.items():
            out = work / f"{name}-s{seed}"
            section = ppo_base | settings | {"out_dir": str(out), "seed": seed, "guard_gold": False,
                                             "eval_prompts_file": None, "save_every": 10_000}  # fmt: skip
            cost = run_stage("ppo", section, work)
            rows.append(
                {"method": name, "seed": seed, **cost, **evaluate(str(out / "final"), sft, rm, eval_cfg)}
            )
            print(json.dumps(rows[-1]), flush=True)
        for name, settings in DPO.items():
            out = work / f"{name}-s{seed}"
            section = {"out_dir": str(out), "policy": sft, "train_file": str(demo / "votes.jsonl"), "seed": seed,
                       "lr": 2e-4, "epochs": 2, "batch_size": 32, "micro_batch_size": 32, "warmup_steps": 5,
                       "precision": "fp32", "eval_fraction": 0.1, "save_every": 10_000, **settings}  # fmt: skip
            cost = run_stage("dpo", section, work)
            rows.append(
                {"method": name, "seed": seed, **cost, **evaluate(str(out / "final"), sft, rm, eval_cfg)}
            )
            print(json.dumps(rows[-1]), flush=True)
        for n in BON_N:
            start = time.perf_counter()
            result = evaluate(sft, sft, rm, eval_cfg, n)
            rows.append({"method": f"bon-{n}", "seed": seed, "seconds": time.perf_counter() - start,
                         "peak_mib": None, **result})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    summary = summarise(rows)
    result = {"command": "python -m benchmarks.method_frontier " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "machine": machine() | {"torch_threads": int(ENV["OMP_NUM_THREADS"])},
              "demo": str(demo), "seeds": args.seeds, "rows": rows, "summary": summary}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS, result)
    if not args.no_doc:
        plot(summary)
        update_doc(result)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method: the mean and the spread (min, max) over seeds of each measure."""
    out: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out[method] = {}
        for key in ("gold", "proxy", "kl", "win_rate", "seconds", "peak_mib"):
            values = [r[key] for r in mine if r[key] is not None]
            if values:
                out[method] |= {
                    key: statistics.mean(values),
                    f"{key}_min": min(values),
                    f"{key}_max": max(values),
                }
    return out


def plot(summary: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "gold", "gold utility"),
        (axes[1], "proxy", "proxy reward (reward model)"),
    ):
        bon = [m for m in summary if m.startswith("bon-")]
        ax.plot([summary[m]["kl"] ** 0.5 for m in bon], [summary[m][key] for m in bon], "o-", color="grey",
                label="best-of-n (n = 1...64)")  # fmt: skip
        for m in summary:
            if not m.startswith("bon-"):
                s = summary[m]
                ax.errorbar(s["kl"] ** 0.5, s[key], yerr=[[s[key] - s[f"{key}_min"]], [s[f"{key}_max"] - s[key]]],
                            fmt="s", capsize=3, label=m)  # fmt: skip
        ax.set_xlabel("sqrt(KL to the SFT policy), sqrt(nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)


def update_doc(result: dict[str, Any]) -> None:
    m = result["machine"]
    rows = ["| method | gold utility | proxy | KL (nats) | win rate vs SFT | train wall s | peak RSS MiB |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for method, s in result["summary"].items():
        gold = f"{s['gold']:.3f} ({s['gold_min']:.3f}-{s['gold_max']:.3f})"
        mem = f"{s['peak_mib']:.0f}" if "peak_mib" in s else "-"
        rows.append(f"| {method} | {gold} | {s['proxy']:.3f} | {s['kl']:.3f} | {s['win_rate']:.3f} | "
                    f"{s['seconds']:.1f} | {mem} |")  # fmt: skip
    section = "\n".join([
        START, f"Command: `{result['command']}` ({result['date']}), on `{result['demo']}` (`rlhf demo --fast`), "
        f"seeds {', '.join(map(str, result['seeds']))}; mean over seeds, (min-max) for gold. Machine: {m['cpu']}, "
        f"{m['cores']} cores shared with other work (load average {m['load_average_at_start']:.1f} at the start), "
        f"{m['torch_threads']} torch thread. Best-of-n's time is its evaluation (sampling n answers per prompt and "
        "scoring them), not training; its KL is the bound log n - (n - 1) / n.", "", *rows, "",
        "![gold and proxy against sqrt KL](images/methods_frontier.png)", END,
    ])  # fmt: skip
    replace_doc_section(START, END, section, DOC)


if __name__ == "__main__":
    main()
