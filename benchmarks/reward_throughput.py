"""Reward-model training throughput (pairs/s): rlhf-loop's `rlhf reward` vs TRL's RewardTrainer.

    python -m benchmarks.reward_throughput [--reps 3] [--groups 240]

Same model (a demo-size Llama, saved as a Hugging Face checkpoint), same comparisons, same pairs per optimiser
step, same max length, the same precision for both (bf16 autocast where the CPU has native bf16, else fp32: bf16 is
emulated on AVX2-only CPUs), one epoch; the two systems alternate, each run in a fresh
process, and the median of the repetitions is reported. Two settings:
  rankings  K=4 answers per prompt ranked by the simulated panel: C(4,2)=6 pairs per prompt. We forward each
            answer once per ranking (InstructGPT grouping); TRL takes the 6 pairs as 12 sequences.
  pairs     K=2: one pair per prompt, the same pairs for both. Ours forwards the prompt once per pair and
            packs rows (reward.shared_prefix); TRL forwards chosen and rejected as two padded rows.
TRL 1.x is installed into its own venv, .bench-venvs/trl1 (torch first, the local CPU build, then trl).
Results: benchmarks/results/reward_throughput.json and a table in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import build_arch, replace_doc_section
from rlhf.config import ArchConfig, PanelConfig
from rlhf.data import demo_task
from rlhf.data.jsonl import write_json, write_jsonl
from rlhf.data.preferences import Ranking, group_to_pairs, ranking_to_group, record_to_json
from rlhf.labelers.panel import Panel
from rlhf.models.loading import load_tokenizer
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.runs import read_metrics
from rlhf.train.common import resolve_precision

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".bench-venvs" / "trl1"
RESULTS = ROOT / "benchmarks" / "results" / "reward_throughput.json"
START, END = "<!-- reward_throughput:start -->", "<!-- reward_throughput:end -->"
ARCH = ArchConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256)  # fmt: skip
MAX_LEN = 128
# both systems in the precision the stages choose on this machine (rlhf.train.common: bf16 on a GPU with it or a CPU
# with native bf16, else fp32)
PRECISION = "bf16" if resolve_precision("auto") == "bf16" else "fp32"
GRAD_ACCUM = 4
ENV = dict(os.environ)  # the threads setting (--threads) is added in main()


def ensure_trl_venv() -> Path:
    """A plain venv with torch==2.13.0 (installed first, so pip never pulls a CUDA build) and trl 1.x."""
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "trl>=1,<2"], check=True)
    return python


def prepare(
    work: Path, n_prompts: int, seed: int = 0, arch: str = "llama", cfg: ArchConfig = ARCH,
    names: tuple[str, ...] = ("rankings", "pairs"),
) -> dict[str, Any]:  # fmt: skip
    """Model + tokenizer (a model of Hugging Face type `arch`, sized by `cfg`), and the comparisons of the
    settings `names` in both systems' formats."""
    data = work / "demo"
    demo_task.generate(data, seed=seed, n_pretrain=3000, n_sft=10, n_rl_prompts=10, n_eval_prompts=10)
    corpus = (data / "pretrain.txt").read_text().split("\n\n")
    train_bpe_tokenizer(corpus, vocab_size=512).save_pretrained(work / "model")
    tokenizer = load_tokenizer(str(work / "model"))
    build_arch(arch, cfg, tokenizer, seed).save_pretrained(work / "model")
    panel = Panel.from_config(PanelConfig(seed=seed))
    rng = random.Random(seed)
    settings: dict[str, Any] = {}
    for name, k in (("rankings", 4), ("pairs", 2)):
        if name not in names:
            continue
        prompts = n_prompts if k == 4 else n_prompts * 6  # the same number of pairs in both settings
        rankings = []
        for _ in range(prompts):
            q = demo_task.sample_question(rng)
            answers = [" " + demo_task.make_response(q, rng, wrong=rng.random() < 0.3, rude=rng.random() < 0.25,
                                                      ramble=rng.random() < 0.3) for _ in range(k)]  # fmt: skip
            prompt = demo_task.render_prompt(q.text)
            rankings.append(Ranking(prompt, answers, panel.rank(prompt, answers), None))
        groups = [g for g in map(ranking_to_group, rankings) if g is not None]
        pairs = [p for g in groups for p in group_to_pairs(g)]
        write_jsonl(work / f"{name}.ours.jsonl", [record_to_json(r) for r in rankings])
        write_jsonl(
            work / f"{name}.trl.jsonl",
            [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs],
        )
        # the same pairs per optimiser step and per forward pass for both: 4 micro-batches per step
        per_group = len(pairs) / len(groups)
        batch_groups = 16 if k == 4 else 96
        settings[name] = {"k": k, "groups": len(groups), "pairs": len(pairs), "ours_batch_groups": batch_groups,
                          "ours_micro_groups": batch_groups // GRAD_ACCUM, "grad_accum": GRAD_ACCUM,
                          "trl_micro_pairs": round(batch_groups * per_group / GRAD_ACCUM)}  # fmt: skip
    return settings


def run_ours(work: Path, name: str, setting: dict[str, Any], rep: int) -> dict[str, float]:
    out = work / "runs" / f"ours-{name}-{rep}"
    sets = [f"reward.model={work / 'model'}", f"reward.train_file={work / f'{name}.ours.jsonl'}",
            "reward.group_sessions=false", f"reward.batch_size={setting['ours_batch_groups']}",
            f"reward.micro_batch_size={setting['ours_micro_groups']}", "reward.eval_fraction=0",
            "reward.normalise.enabled=false", "reward.save_every=100000", "reward.log_every=100000",
            f"reward.precision={PRECISION}", f"reward.max_seq_len={MAX_LEN}", "reward.lr=1e-4"]  # fmt: skip
    cmd = [
        sys.executable,
        "-m",
        "rlhf.cli",
        "reward",
        "-q",
        "--out",
        str(out),
        *[a for s in sets for a in ("--set", s)],
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env=ENV)
    last = [row for row in read_metrics(out / "metrics.jsonl") if "rm/pairs_per_s" in row][-1]
    return {"pairs_per_s": float(last["rm/pairs_per_s"])}


def run_trl(python: Path, work: Path, name: str, setting: dict[str, Any]) -> dict[str, float]:
    cmd = [str(python), str(ROOT / "benchmarks" / "trl_reward_worker.py"), "--model", str(work / "model"),
           "--data", str(work / f"{name}.trl.jsonl"), "--batch-size", str(setting["trl_micro_pairs"]),
           "--grad-accum", str(setting["grad_accum"]),
           "--max-length", str(MAX_LEN), "--lr", "1e-4"] + (["--bf16"] if PRECISION == "bf16" else [])  # fmt: skip
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=ENV)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["pairs"] != setting["pairs"]:
        raise RuntimeError(
            f"TRL dropped pairs ({result['pairs']} of {setting['pairs']}): raise the max length"
        )
    return {"pairs_per_s": float(result["pairs_per_s"]), "trl": result["trl"]}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    flags = Path("/proc/cpuinfo").read_text()
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "torch": torch.__version__,
            "torch_threads": int(ENV.get("OMP_NUM_THREADS", torch.get_num_threads())), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()[0]}  # fmt: skip


def update_doc(result: dict[str, Any]) -> None:
    rows = ["| setting | ours pairs/s (median) | TRL pairs/s (median) | ours / TRL | runs (ours; TRL) |",
            "|---|---|---|---|---|"]  # fmt: skip
    for name, r in result["settings"].items():
        rows.append(f"| {name} (K={r['k']}, {r['pairs']} pairs) | {r['ours_median']:.0f} | {r['trl_median']:.0f} | "
                    f"**{r['ratio']:.2f}x** | {', '.join(f'{v:.0f}' for v in r['ours'])}; {', '.join(f'{v:.0f}' for v in r['trl'])} |")  # fmt: skip
    m = result["machine"]
    section = "\n".join([
        START, "## Reward-model training throughput: `rlhf reward` vs TRL RewardTrainer", "",
        f"Command: `{result['command']}` ({result['date']}).", "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared; load average {m['load_average_at_start']:.1f} at the start), "
        f"torch {m['torch']}, TRL {result['trl_version']}, {result.get('precision', 'bf16')} for both, {m['torch_threads']} torch thread(s) each, "
        f"{result['reps']} alternating repetitions, each run a fresh process.", "",
        f"Model: demo-size Llama (hidden {ARCH.hidden_size}, {ARCH.num_hidden_layers} layers, vocab 512), max length "
        f"{MAX_LEN}; one epoch; the same pairs per optimiser step and per forward pass (4 micro-batches a step) for "
        "both.", "", *rows, "",
        "Both systems train the same Hugging Face model; ours runs its backbone through the lean Llama forward "
        "and its fused CPU kernels (`rlhf/engine/lean_llama.py`, the head only where rewards are read), TRL "
        "through transformers' forward with SDPA attention. They also differ in what they forward. rankings: ours forwards each of a prompt's 4 answers once and takes its 6 pairs from those rewards (one batch "
        "element); TRL forwards 12 sequences for the same 6 pairs. Both settings: ours forwards a group's prompt "
        "once, its answers as branches under a tree attention mask (`reward.shared_prefix`), and packs groups into "
        "rows no wider than the widest (first-fit decreasing), so little padding is left; TRL right-pads one row "
        "per sequence. Ours also takes SDPA's math backend for rows of at most 160 tokens (see Attention on a "
        "CPU above); TRL runs SDPA as torch picks.", END,
    ])  # fmt: skip
    replace_doc_section(START, END, section)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="repetitions per system and setting (median reported)"
    )
    parser.add_argument("--groups", type=int, default=240, help="prompts ranked in the rankings setting")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both systems (1: stable numbers on a shared 2-core machine)")  # fmt: skip
    args = parser.parse_args()
    ENV["OMP_NUM_THREADS"] = str(args.threads)
    python = ensure_trl_venv()
    work = args.work or Path(tempfile.mkdtemp(prefix="reward-bench-"))
    settings = prepare(work, args.groups)
    print(f"data and model in {work}: {json.dumps(settings)}", flush=True)
    result: dict[str, Any] = {"command": "python -m benchmarks.reward_throughput " + " ".join(sys.argv[1:]),
                              "date": time.strftime("%Y-%m-%d"), "machine": machine(), "reps": args.reps, "precision": PRECISION,
                              "settings": {}}  # fmt: skip
    for name, setting in settings.items():
        ours, trl = [], []
        for rep in range(args.reps):
            for system in ("ours", "trl") if rep % 2 == 0 else ("trl", "ours"):  # alternate who goes first
                if system == "ours":
                    ours.append(run_ours(work, name, setting, rep)["pairs_per_s"])
                else:
                    r = run_trl(python, work, name, setting)
                    trl.append(r["pairs_per_s"])
                    result["trl_version"] = r["trl"]
                print(
                    f"{name} rep {rep} {system}: {(ours if system == 'ours' else trl)[-1]:.1f} pairs/s",
                    flush=True,
                )
        o, t = statistics.median(ours), statistics.median(trl)
        result["settings"][name] = {
            **setting,
            "ours": ours,
            "trl": trl,
            "ours_median": o,
            "trl_median": t,
            "ratio": o / t,
        }
        print(f"{name}: ours {o:.1f} pairs/s, TRL {t:.1f} pairs/s, ratio {o / t:.2f}x", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS, result)
    if not args.no_doc:
        update_doc(result)


if __name__ == "__main__":
    main()
