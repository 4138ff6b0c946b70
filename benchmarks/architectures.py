"""PPO, reward-model training and generation on several architectures, each against the usual tool for it.

    python -m benchmarks.architectures [--archs llama qwen2 gpt_neox gemma] [--sizes 4M 30M] [--reps 3]
                                       [--parts ppo reward generation] [--iterations 4] [--threads 1]

For each Hugging Face model type and size (benchmarks/common.py: SIZES "4M" and "30M", the same width, depth and
heads for every type; random weights; the demo tokenizer, vocab 512):
  ppo         an iteration of benchmarks/ppo_bench.py's workload (64 prompts, 48 new tokens, 2 epochs over 2
              minibatches, bf16 autocast where the CPU has it) by `rlhf ppo` vs TRL 0.29's PPOTrainer
  reward      reward-model training (pairs/s) by `rlhf reward` vs TRL's RewardTrainer on the `pairs` setting of
              benchmarks/reward_throughput.py (one pair per prompt, the same pairs per step, the same precision)
  generation  tokens/s of `rlhf.engine.decoding.generate` vs transformers' `generate()`, batch 64, 48 new tokens,
              the same precision (benchmarks/generation.py)
Every type generates through its own transformers forward (on a CPU over rlhf.engine.decode_cache's KV cache and
attention); only a plain Llama or Qwen2 on a CPU trains and scores through the lean forward (rlhf.engine.lean_llama), every
other type through its own forward inside our loops, so the ratios per type show what the generic path costs.
The systems alternate (each going first every other repetition; PPO and reward runs are fresh processes) and
the median of the repetitions is reported. MFU: model FLOPs (2 per weight per token forward, 6 trained, plus
attention; real tokens only) over the matmul peak measured at the start and the end of this run
(benchmarks/matmul_peak.py), bf16 where the CPU has native bf16. The load average before each block is kept.
Results: benchmarks/results/architectures.json and a table in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import generation, matmul_peak, ppo_bench, reward_throughput
from benchmarks.common import (
    ARCHS,
    RESULTS,
    SIZES,
    build_model,
    capabilities,
    cpu_generation,
    machine,
    save_result,
    update_doc,
)
from rlhf.engine import lean_llama

PARTS = ("ppo", "reward", "generation")
TITLE = "Architectures: PPO, reward-model training and generation vs TRL and transformers"


def mean_peak(before: dict[str, Any], after: dict[str, Any], dtype: str, key: str) -> float:
    """The mean of the two peaks' `key` (flops: per wall-clock second; flops_cpu: per CPU second)."""
    return statistics.fmean([before[dtype][key], after[dtype][key]])


def bench_ppo(
    arch: str, size: str, work: Path, args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any]:
    paths = ppo_bench.prepare(work, size, sft_steps=0, arch=arch)
    python = None if args.no_trl else ppo_bench.ensure_trl_venv()
    ours, trl = ppo_bench.compare(paths, size, work, args.reps, args.iterations, python, args.threads, env)
    return ppo_bench.summarise(ours, trl, {})


def bench_reward(arch: str, size: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    reward_throughput.ENV["OMP_NUM_THREADS"] = str(args.threads)
    setting = reward_throughput.prepare(work, args.groups, arch=arch, cfg=SIZES[size], names=("pairs",))[
        "pairs"
    ]
    python = None if args.no_trl else reward_throughput.ensure_trl_venv()
    ours: list[float] = []
    trl: list[float] = []
    trl_error = None
    for rep in range(args.reps):
        for system in ("ours", "trl") if rep % 2 == 0 else ("trl", "ours"):
            if system == "ours":
                ours.append(reward_throughput.run_ours(work, "pairs", setting, rep)["pairs_per_s"])
            elif python is not None:
                try:
                    trl.append(reward_throughput.run_trl(python, work, "pairs", setting)["pairs_per_s"])
                except subprocess.CalledProcessError as e:  # e.g. a model type TRL cannot train
                    error = (e.stderr or "").strip().splitlines()[-1:] or [str(e)]
                    print(f"{arch} {size} reward: TRL failed: {error[0]}", flush=True)
                    python, trl_error = None, error[0]
        print(f"{arch} {size} reward rep {rep}: ours {ours[-1]:.0f} pairs/s"
              + (f", TRL {trl[-1]:.0f}" if trl else ""), flush=True)  # fmt: skip
    r: dict[str, Any] = {**setting, "ours": ours, "ours_median": statistics.median(ours)}
    if trl_error is not None:
        r["trl_error"] = trl_error
    elif trl:
        r |= {
            "trl": trl,
            "trl_median": statistics.median(trl),
            "ratio": r["ours_median"] / statistics.median(trl),
        }
    return r


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="*", default=["llama", "qwen2", "gpt_neox", "gemma"], choices=ARCHS)
    parser.add_argument("--sizes", nargs="*", default=["4M"], choices=["4M", "30M"])
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions (median reported)")
    parser.add_argument(
        "--iterations", type=int, default=3, help="PPO iterations per run (the first dropped)"
    )
    parser.add_argument(
        "--groups", type=int, default=32, help="reward: prompts x 6 pairs, one per prompt (>= 16)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every system")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where generation runs and the matmul peak is measured (the training stages and TRL "
                             "take the GPU by themselves when there is one); results of a GPU run go to "
                             "NAME.cuda.json and their own section of docs/performance.md")  # fmt: skip
    parser.add_argument("--no-trl", action="store_true", help="ours only")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--doc-only", action="store_true", help="rewrite the docs table from the saved JSON")
    parser.add_argument("--name", default="architectures", help="results file: benchmarks/results/NAME.json")
    parser.add_argument("--merge", nargs="*", default=[], help="with --doc-only: add the blocks of these results "
                        "files (runs side by side) to architectures.json")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the saved blocks this run does not measure "
                        "(their MFU then against this run's matmul peak)")  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="smoke pass: Llama and GPT-NeoX, 1 repetition, no TRL"
    )
    args = parser.parse_args()
    if args.quick:
        args.archs, args.sizes, args.reps, args.iterations, args.groups = ["llama", "gpt_neox"], ["4M"], 1, 2, 24  # fmt: skip
        args.no_trl = args.no_doc = True
    name = "architectures.quick" if args.quick else args.name  # a smoke pass keeps the real results
    on_gpu = args.device.startswith("cuda")
    if on_gpu:
        name += ".cuda"
    if args.doc_only:
        saved = merged([json.loads((RESULTS / f"{n}.json").read_text()) for n in [name, *args.merge]],
                       args.threads)  # fmt: skip
        save_result(name, saved)
        update_doc(name.replace(".", "_"), title(saved), saved, doc_section(saved))
        return
    torch.set_num_threads(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONPATH=str(ppo_bench.ROOT), TOKENIZERS_PARALLELISM="false")  # fmt: skip
    work = args.work or Path(tempfile.mkdtemp(prefix="arch-bench-"))
    peak_before = matmul_peak.load_or_measure(args.device, args.threads)
    result: dict[str, Any] = {"command": "python -m benchmarks.architectures " + " ".join(sys.argv[1:]),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(args.threads, args.device),
                              "capabilities": capabilities(), "reps": args.reps, "iterations": args.iterations,
                              "ppo_workload": {"batch": ppo_bench.BATCH, "minibatch": ppo_bench.MINIBATCH,
                                               "epochs": ppo_bench.EPOCHS, "max_new_tokens": ppo_bench.NEW_TOKENS},
                              "results": {}, "matmul_peak": {"before": peak_before}}  # fmt: skip
    saved_path = RESULTS / f"{name}.json"
    if args.keep and saved_path.exists():  # the blocks of earlier runs, each with its own settings
        saved = json.loads(saved_path.read_text())
        for entry in saved["results"].values():
            entry.setdefault("iterations", saved["iterations"])
            entry.setdefault("reps", saved["reps"])
        result["results"] = saved["results"]
        result["command"] = f"{saved['command']}; then {result['command']}"
    for size in args.sizes:
        for arch in args.archs:
            key = f"{arch}/{size}"
            model, _ = build_model(size, arch=arch)
            entry: dict[str, Any] = {"arch": arch, "size": size, "params": sum(p.numel() for p in model.parameters()),
                                     "matmul_weights": ppo_bench.linear_weights(model),
                                     "lean_path": not on_gpu and lean_llama.supports(model),  # the stages take it on a CPU only
                                     "iterations": args.iterations, "reps": args.reps,
                                     "load_average_before": round(os.getloadavg()[0], 1)}  # fmt: skip
            if "generation" in args.parts:
                entry["generation"] = generation.bench_size(
                    size, 64, ppo_bench.NEW_TOKENS, args.reps, args.device, arch
                )
            if "reward" in args.parts:
                entry["reward"] = bench_reward(arch, size, work / key / "reward", args)
            if "ppo" in args.parts:
                entry["ppo"] = bench_ppo(arch, size, work / key / "ppo", args, env)
            entry["load_average_after"] = round(os.getloadavg()[0], 1)
            result["results"][key] = entry
            save_result(name, result)  # what is done so far survives an interrupted run
    finish(result, matmul_peak.load_or_measure(args.device, args.threads, quick=True))
    save_result(name, result)
    print(json.dumps({k: summary(e) for k, e in result["results"].items()}, indent=1))
    if not args.no_doc:
        update_doc(name.replace(".", "_"), title(result), result, doc_section(result))


def title(result: dict[str, Any]) -> str:
    """The section's title names the kind of machine: a GPU, or a CPU by what its matmuls can use."""
    if result["machine"]["device"].startswith("cuda"):
        return f"{TITLE} (GPU)"
    flags = set(result["capabilities"]["flags"])
    kinds = [("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx2", "AVX2")]
    kind = next((name for flag, name in kinds if flag in flags), "other")
    generation = cpu_generation(result["machine"])
    return f"{TITLE} ({kind} CPU{', ' + generation if generation else ''})"


def merged(runs: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """The blocks of several runs in one result (the first's machine and settings, every command), each block's
    MFU against the peak of its own run; a run that was interrupted against the peak it measured at its start
    (one that saved none, against a CPU peak measured now). Merging the result again changes nothing."""
    for run in runs:
        if "after" not in run.get("matmul_peak", {}):
            before = run.get("matmul_peak", {}).get("before")
            if before is None and run["machine"]["device"].startswith("cuda"):
                sys.exit("an interrupted GPU run saved no matmul peak: its MFU cannot be computed here")
            finish(run, before or matmul_peak.load_or_measure("cpu", threads), interrupted=True)
        mp = run["matmul_peak"]
        peaks = [mean_peak(mp["before"], mp["after"], mp["dtype"], k) for k in ("flops", "flops_cpu")]
        for entry in run["results"].values():
            entry.setdefault("iterations", run["iterations"])
            entry.setdefault("reps", run["reps"])
            # a block merged before keeps the peak of the run that measured it
            entry.setdefault("matmul_peak", {"flops": peaks[0], "flops_cpu": peaks[1]})
            add_mfu(entry, entry["matmul_peak"]["flops"], entry["matmul_peak"]["flops_cpu"])
    out = runs[0]
    for run in runs[1:]:
        out["results"] |= run["results"]
        out["command"] = f"{out['command']}; and beside it {run['command']}"
    return out


def finish(result: dict[str, Any], peak_after: dict[str, Any], interrupted: bool = False) -> None:
    """The matmul peak at the end, MFU of every block, the load at the end. `interrupted`: the run stopped
    before its end, and the peak before is the one measured now too."""
    on_gpu = result["machine"]["device"].startswith("cuda")
    dtype = "bf16" if on_gpu or result["capabilities"]["native_bf16"] else "fp32"
    before = peak_after if interrupted else result["matmul_peak"]["before"]
    result["matmul_peak"] = {
        "before": before,
        "after": peak_after,
        "dtype": dtype,
        "interrupted": interrupted,
    }
    peak = mean_peak(before, peak_after, dtype, "flops")
    peak_cpu = mean_peak(before, peak_after, dtype, "flops_cpu")
    for entry in result["results"].values():
        add_mfu(entry, peak, peak_cpu)
        entry["matmul_peak"] = {"flops": peak, "flops_cpu": peak_cpu}  # the doc names each block's peak
    result["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 1)


def add_mfu(entry: dict[str, Any], peak: float, peak_cpu: float) -> None:
    """MFU of each system, by wall clock over the wall-clock peak and by CPU time over the CPU-time peak (blind
    to the time other jobs held the cores): generation at 2 FLOPs per matmul weight per new token; a PPO
    iteration at the FLOPs ppo_bench counts for ours (the same work for TRL: the same prompts, 48 tokens each
    from random weights)."""
    if "generation" in entry:
        g, per_token = entry["generation"], 2 * entry["matmul_weights"]
        for k in ("ours", "hf"):
            g[f"{k}_mfu"] = g[f"{k}_median"] * per_token / peak
            g[f"{k}_mfu_cpu"] = g[f"{k}_cpu_median"] * per_token / peak_cpu
    if "ppo" in entry:
        p = entry["ppo"]
        flops = statistics.median([sum(o["flops"].values()) for o in p["ours"]])
        p["iteration_flops"] = flops
        p["ours_mfu"] = flops / p["ours_iteration_s"] / peak
        p["ours_mfu_cpu"] = flops / p["ours_iteration_cpu_s"] / peak_cpu
        p["ours_phase_mfu"] = {k: v / peak for k, v in p["ours_flop_rate"].items()}
        if "trl_iteration_s" in p:
            p["trl_mfu"] = flops / p["trl_iteration_s"] / peak
            p["trl_mfu_cpu"] = flops / p["trl_iteration_cpu_s"] / peak_cpu


def summary(e: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"params_m": round(e["params"] / 1e6, 2)}
    if "generation" in e:
        out["generation_ratio"] = round(e["generation"]["ratio"], 2)
    if "reward" in e and "ratio" in e["reward"]:
        out["reward_ratio"] = round(e["reward"]["ratio"], 2)
    if "ppo" in e and "speedup_vs_trl" in e["ppo"]:
        out["ppo_ratio"] = round(e["ppo"]["speedup_vs_trl"], 2)
    return out


def doc_section(result: dict[str, Any]) -> list[str]:
    c, mp = result["capabilities"], result["matmul_peak"]
    dtype, w = mp["dtype"], result["ppo_workload"]
    iterations = " or ".join(
        dict.fromkeys(str(e.get("iterations", result["iterations"])) for e in result["results"].values())
    )
    lines = [
        f"CPU capabilities: torch kernels {c['torch_cpu_capability']}, flags {', '.join(c['flags'])}; precision "
        f"chosen by `precision: auto`: {c['precision']}. Matmul peak ({dtype}, 1024-2048 squares, measured in the run of "
        f"each block, at its start and its end{' (once, for a run that was stopped)' if mp.get('interrupted') else ''}; "
        "each block's in the JSON): "
        + ", ".join(f"{e['matmul_peak']['flops_cpu'] / 1e9:.0f}" for e in result["results"].values() if "matmul_peak" in e)
        + " GFLOP per CPU-second.",
        "",
        "Random-init models of each Hugging Face type with the same width, depth and heads (the demo tokenizer, "
        f"vocab 512). PPO: {w['batch']} prompts, {w['max_new_tokens']} new tokens, {w['epochs']} epochs over 2 "
        f"minibatches, {iterations} iterations per run (the first dropped), vs TRL 0.29 PPOTrainer with the "
        "same checkpoints and hyper-parameters. Reward: the `pairs` setting of the reward benchmark (one pair per "
        "prompt, the same pairs per step), vs TRL RewardTrainer. Generation: batch 64, 48 new tokens, vs transformers "
        "`generate()` in the same precision. Ratios are ours / theirs in throughput (> 1: ours faster), the median "
        f"of {result['reps']} alternating repetitions, by wall clock and (in brackets, where measured) by CPU time, "
        f"which other jobs on the machine disturb less; MFU by CPU time over the {dtype} peak per CPU-second. Path: the forward "
        "our loops train and score through (the lean Llama-family forward, or transformers' own; every type generates through its own). Load: the load average before "
        "and after the block.",
        "",
        "| model | params | path | PPO s/iter ours; TRL | **PPO ratio** (CPU) | PPO MFU (CPU) ours; TRL "
        "| reward pairs/s ours; TRL | **reward ratio** | generation tok/s ours; HF | **generation ratio** (CPU) "
        "| generation MFU (CPU) ours; HF | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for e in result["results"].values():
        cells = [
            f"{e['arch']} {e['size']}",
            f"{e['params'] / 1e6:.1f}M",
            "lean" if e["lean_path"] else "transformers",
        ]
        p = e.get("ppo")
        if p and "trl_iteration_s" in p:
            cells += [f"{p['ours_iteration_s']:.2f}; {p['trl_iteration_s']:.2f}",
                      f"**{p['speedup_vs_trl']:.2f}x** ({p['cpu_speedup_vs_trl']:.2f}x)",
                      f"{p['ours_mfu_cpu']:.1%}; {p['trl_mfu_cpu']:.1%}"]  # fmt: skip
        elif p:
            trl = f"TRL failed: {p['trl_error'][:80]}" if "trl_error" in p else "-"
            cells += [f"{p['ours_iteration_s']:.2f}; -", trl, f"{p['ours_mfu_cpu']:.1%}; -"]
        else:
            cells += ["-"] * 3
        r = e.get("reward")
        if r and "ratio" in r:
            cells += [f"{r['ours_median']:.0f}; {r['trl_median']:.0f}", f"**{r['ratio']:.2f}x**"]
        elif r:
            cells += [
                f"{r['ours_median']:.0f}; -",
                f"TRL failed: {r['trl_error'][:80]}" if "trl_error" in r else "-",
            ]
        else:
            cells += ["-"] * 2
        g = e.get("generation")
        cells += ([f"{g['ours_median']:.0f}; {g['hf_median']:.0f}", f"**{g['ratio']:.2f}x** ({g['cpu_ratio']:.2f}x)",
                   f"{g['ours_mfu_cpu']:.1%}; {g['hf_mfu_cpu']:.1%}"] if g else ["-"] * 3)  # fmt: skip
        cells.append(f"{e['load_average_before']} -> {e['load_average_after']}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
