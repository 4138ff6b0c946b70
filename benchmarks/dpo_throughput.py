"""DPO training throughput (pairs/s) and held-out reward accuracy: rlhf-loop's `rlhf dpo` vs TRL's DPOTrainer.

    python -m benchmarks.dpo_throughput [--reps 3] [--pairs 480]

Same model (a demo-size Llama, saved as a Hugging Face checkpoint), same pairs (two demo answers per prompt,
ordered by the simulated panel), same pairs per optimiser step and per forward pass, same max length, beta,
learning rate and schedule, bf16 autocast for both, one epoch; the two systems alternate, each run in a fresh
process, and the median of the repetitions is reported. Both cache the reference's log-probs before training and
checkpoint no activations; ours counts the caching time, TRL's train_runtime does not (it precomputes when the
trainer is built), so the ratio favours TRL. Held-out reward accuracy: the share of held-out pairs
whose chosen answer gets the larger implicit reward, after training, from each system's own evaluation.
TRL 1.x runs in its own venv, .bench-venvs/trl1 (benchmarks.reward_throughput.ensure_trl_venv).
Results: benchmarks/results/dpo_throughput.json and a table in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import replace_doc_section
from benchmarks.reward_throughput import ARCH, ENV, ROOT, ensure_trl_venv, machine
from rlhf.config import PanelConfig
from rlhf.data import demo_task
from rlhf.data.jsonl import write_json, write_jsonl
from rlhf.labelers.panel import Panel
from rlhf.models.loading import build_causal_lm, load_tokenizer
from rlhf.models.tokenizer import train_bpe_tokenizer

RESULTS = ROOT / "benchmarks" / "results" / "dpo_throughput.json"
START, END = "<!-- dpo_throughput:start -->", "<!-- dpo_throughput:end -->"
MAX_LEN = 128
BATCH, GRAD_ACCUM = 32, 4  # pairs per optimiser step; forward passes per step
LR, BETA = 1e-4, 0.1


def prepare(work: Path, n_pairs: int, seed: int = 0) -> dict[str, int]:
    """Model + tokenizer, and n_pairs training pairs plus a quarter as many held out, one per prompt."""
    data = work / "demo"
    demo_task.generate(data, seed=seed, n_pretrain=3000, n_sft=10, n_rl_prompts=10, n_eval_prompts=10)
    corpus = (data / "pretrain.txt").read_text().split("\n\n")
    train_bpe_tokenizer(corpus, vocab_size=512).save_pretrained(work / "model")
    build_causal_lm(ARCH, load_tokenizer(str(work / "model")), seed=seed).save_pretrained(work / "model")
    panel = Panel.from_config(PanelConfig(seed=seed))
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    while len(rows) < n_pairs + n_pairs // 4:
        q = demo_task.sample_question(rng)
        a, b = (" " + demo_task.make_response(q, rng, wrong=rng.random() < 0.3, rude=rng.random() < 0.25,
                                              ramble=rng.random() < 0.3) for _ in range(2))  # fmt: skip
        prompt = demo_task.render_prompt(q.text)
        ranks = panel.rank(prompt, [a, b])
        if a != b and ranks[0] != ranks[1]:
            chosen, rejected = (a, b) if ranks[0] < ranks[1] else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    write_jsonl(work / "train.jsonl", rows[:n_pairs])
    write_jsonl(work / "eval.jsonl", rows[n_pairs:])
    return {"pairs": n_pairs, "held_out": len(rows) - n_pairs}


def run_ours(work: Path, rep: int) -> dict[str, float]:
    out = work / "runs" / f"ours-{rep}"
    sets = [f"dpo.policy={work / 'model'}", f"dpo.train_file={work / 'train.jsonl'}",
            f"dpo.eval_file={work / 'eval.jsonl'}", f"dpo.batch_size={BATCH}",
            f"dpo.micro_batch_size={BATCH // GRAD_ACCUM}", f"dpo.lr={LR}", f"dpo.beta={BETA}", "dpo.warmup_steps=10",
            "dpo.min_lr_ratio=0", "dpo.betas=[0.9, 0.999]", "dpo.save_every=100000", "dpo.log_every=100000",
            "dpo.eval_every=100000", "dpo.precision=bf16", f"dpo.max_seq_len={MAX_LEN}"]  # fmt: skip
    cmd = [
        sys.executable,
        "-m",
        "rlhf.cli",
        "dpo",
        "-q",
        "--out",
        str(out),
        *[a for s in sets for a in ("--set", s)],
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env=ENV)
    summary = json.loads((out / "summary.json").read_text())
    seconds = summary["train_pairs"] / summary["dpo/pairs_per_s"] + summary["reference_s"]
    return {"pairs_per_s": summary["train_pairs"] / seconds, "eval_accuracy": summary["dpo/eval_accuracy"]}


def run_trl(python: Path, work: Path) -> dict[str, Any]:
    cmd = [str(python), str(ROOT / "benchmarks" / "trl_dpo_worker.py"), "--model", str(work / "model"),
           "--data", str(work / "train.jsonl"), "--eval-data", str(work / "eval.jsonl"),
           "--batch-size", str(BATCH // GRAD_ACCUM), "--grad-accum", str(GRAD_ACCUM),
           "--max-length", str(MAX_LEN), "--lr", str(LR), "--beta", str(BETA), "--bf16"]  # fmt: skip
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=ENV)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def update_doc(result: dict[str, Any]) -> None:
    m, r = result["machine"], result
    runs = lambda xs, digits=1: ", ".join(f"{v:.{digits}f}" for v in xs)  # noqa: E731
    section = "\n".join([
        START, "## DPO training throughput: `rlhf dpo` vs TRL DPOTrainer", "",
        f"Command: `{r['command']}` ({r['date']}).", "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared; load average {m['load_average_at_start']:.1f} at the "
        f"start), torch {m['torch']}, TRL {r['trl_version']}, bf16 autocast, {m['torch_threads']} torch thread(s) "
        f"each, {r['reps']} alternating repetitions, each run a fresh process.", "",
        f"Model: demo-size Llama (hidden {ARCH.hidden_size}, {ARCH.num_hidden_layers} layers, vocab 512), max length "
        f"{MAX_LEN}; {r['pairs']} training pairs, one epoch, {BATCH} pairs per optimiser step in {GRAD_ACCUM} "
        f"forward passes, beta {BETA}, lr {LR} with 10 warm-up steps and cosine decay; {r['held_out']} held-out "
        "pairs.", "",
        "| | ours (median) | TRL (median) | ours / TRL | runs (ours; TRL) |", "|---|---|---|---|---|",
        f"| pairs/s | {r['ours_median']:.1f} | {r['trl_median']:.1f} | **{r['ratio']:.2f}x** | "
        f"{runs(r['ours'])}; {runs(r['trl'])} |",
        f"| held-out reward accuracy | {r['ours_accuracy']:.3f} | {r['trl_accuracy']:.3f} | | "
        f"{runs(r['ours_accuracies'], 3)}; {runs(r['trl_accuracies'], 3)} |", "",
        "Both compute the reference's log-probs once before training: TRL with `precompute_ref_log_probs`, when "
        "the trainer is built, outside its train_runtime; ours inside the time above, so the comparison favours "
        "TRL. Neither checkpoints activations (TRL's DPOConfig "
        "turns it on by default; the worker turns it off). Ours forwards a pair's prompt once with its two answers "
        "as branches under a tree attention mask, packs pairs into rows, and runs the lean Llama forward with the "
        "LM head only at answer tokens; TRL forwards chosen and rejected as right-padded rows through "
        "transformers' forward with the LM head at every position.", END,
    ])  # fmt: skip
    replace_doc_section(START, END, section)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per system (median reported)")
    parser.add_argument("--pairs", type=int, default=480, help="training pairs (a quarter as many held out)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both systems")
    args = parser.parse_args()
    ENV["OMP_NUM_THREADS"] = str(args.threads)
    python = ensure_trl_venv()
    work = args.work or Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    sizes = prepare(work, args.pairs)
    print(f"data and model in {work}: {json.dumps(sizes)}", flush=True)
    ours: list[dict[str, float]] = []
    trl: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for system in ("ours", "trl") if rep % 2 == 0 else ("trl", "ours"):  # alternate who goes first
            result = run_ours(work, rep) if system == "ours" else run_trl(python, work)
            (ours if system == "ours" else trl).append(result)  # type: ignore[arg-type]
            print(f"rep {rep} {system}: {result['pairs_per_s']:.1f} pairs/s, held-out accuracy "
                  f"{result['eval_accuracy']:.3f}", flush=True)  # fmt: skip
    o = statistics.median(r["pairs_per_s"] for r in ours)
    t = statistics.median(r["pairs_per_s"] for r in trl)
    summary: dict[str, Any] = {
        "command": "python -m benchmarks.dpo_throughput " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
        "machine": machine(), "reps": args.reps, **sizes, "trl_version": trl[0]["trl"],
        "ours": [r["pairs_per_s"] for r in ours], "trl": [r["pairs_per_s"] for r in trl],
        "ours_median": o, "trl_median": t, "ratio": o / t,
        "ours_accuracies": [r["eval_accuracy"] for r in ours], "trl_accuracies": [r["eval_accuracy"] for r in trl],
        "ours_accuracy": statistics.median(r["eval_accuracy"] for r in ours),
        "trl_accuracy": statistics.median(r["eval_accuracy"] for r in trl),
    }  # fmt: skip
    print(f"ours {o:.1f} pairs/s, TRL {t:.1f} pairs/s, ratio {o / t:.2f}x; held-out accuracy "
          f"{summary['ours_accuracy']:.3f} vs {summary['trl_accuracy']:.3f}", flush=True)  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS, summary)
    if not args.no_doc:
        update_doc(summary)


if __name__ == "__main__":
    main()
