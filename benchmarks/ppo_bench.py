"""PPO iteration time, per phase, with MFU and peak memory; and the same workload under TRL's PPOTrainer.

    python -m benchmarks.ppo_bench [--reps 3] [--iterations 6] [--sizes tiny small] [--quick]

Workloads (fixed): batch 64 prompts, responses of up to 48 tokens, 2 PPO epochs over 2 minibatches of 32,
bf16 autocast where the CPU has it. tiny = the demo model (hidden 128, 4 layers), briefly SFT-trained so
that answers end with EOS; small = hidden 512, 8 layers (random weights: a timing workload). The reward model
is the policy with a fresh scalar head (normalised to shift 0, scale 1); the critic starts from it.

Ours runs `rlhf.stages.ppo.run` in a worker process that wraps the stage's own functions with timers:
generation (`generate`), scoring (`score_rollout`, split into policy, reference, critic and reward-model
forwards) and training (the rest of the iteration: PPO epochs). Time per iteration is the median over the
iterations after the first (which pays one-off allocation). FLOPs: 2·N·tokens per forward, 6·N·tokens per
trained token, N = weights of the Linear layers (LM head included, embeddings not), plus attention
(4·layers·hidden·context per token forward); tokens = the rollouts' real tokens (prompt and response, each once),
so padding and finished rows that ride along in generation count as lost time, not as work.
MFU = FLOP rate / the bf16 (or fp32) matmul peak measured in the same run (benchmarks/matmul_peak.py).
Peak memory per phase: the largest resident set size (/proc/self/statm, sampled every 5 ms by a thread) while
the phase runs, and its rise over the RSS at the phase's start; torch's CPU allocator has no peak counter.

TRL (0.29.x, `trl.experimental.ppo.PPOTrainer`; trl 1.x has no PPO) runs in its own venv
(.bench-venvs/trl029), fed the same checkpoints and hyper-parameters (benchmarks/trl_ppo_worker.py). The two
systems alternate; each repetition is a fresh process. Results: benchmarks/results/ppo.json, docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks import matmul_peak
from benchmarks.common import ROOT, SIZES, build_model, machine, save_result, update_doc
from rlhf.config import ArchConfig, PPOConfig, SFTConfig
from rlhf.data import demo_task
from rlhf.models.heads import build_scalar_model, set_normalisation
from rlhf.runs import read_metrics
from rlhf.train.common import resolve_precision

VENV = ROOT / ".bench-venvs" / "trl029"
BATCH, MINIBATCH, MICRO, EPOCHS, NEW_TOKENS = 64, 32, 32, 2, 48
HPARAMS = {"lr": 3e-5, "kl_coef": 0.05, "clip_eps": 0.2, "value_clip": 0.2, "vf_coef": 0.1, "gamma": 1.0,
           "lam": 0.95, "temperature": 1.0, "max_grad_norm": 1.0, "seed": 0}  # fmt: skip
# TRL in the precision that `precision: auto` gives ours here: bf16 autocast on a GPU with it or a CPU with native
# bf16, else fp32 (bf16 emulated on an AVX2-only CPU would slow TRL down, not the work)
BF16 = resolve_precision("auto") == "bf16"


def ensure_trl_venv() -> Path:
    """A plain venv with torch==2.13.0 (first, so pip keeps the local CPU build) and trl 0.29.x."""
    python = VENV / "bin" / "python"
    probe = [python, "-c", "from trl.experimental.ppo import PPOTrainer"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "trl>=0.29,<0.30"], check=True)
    return python


# ---------------------------------------------------------------- workload set-up


def prepare(work: Path, size: str, sft_steps: int, arch: str = "llama") -> dict[str, str]:
    """Prompts, the policy (SFT checkpoint) and the reward model, as Hugging Face checkpoints under `work`;
    the model of Hugging Face type `arch` (benchmarks.common.ARCHS)."""
    from rlhf.stages import sft

    data = work / "data"
    demo_task.generate(data, seed=0, n_pretrain=200, n_sft=600, n_rl_prompts=512, n_eval_prompts=10)
    model, tokenizer = build_model(size, arch=arch)
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    policy = work / "base"
    if sft_steps:
        cfg = SFTConfig(out_dir=str(work / "sft"), model=str(work / "base"), train_file=str(data / "sft.jsonl"),
                        max_seq_len=96, batch_size=32, micro_batch_size=32, lr=2e-3, warmup_steps=0,
                        max_steps=sft_steps, epochs=10, precision="auto", eval_fraction=0.05, save_every=10_000,
                        log_every=10_000)  # fmt: skip
        sft.run(cfg, quiet=True)
        policy = work / "sft" / "final"
    reward = build_scalar_model(str(policy), seed=1)
    set_normalisation(reward, 0.0, 1.0)
    reward.save_pretrained(work / "reward")
    tokenizer.save_pretrained(work / "reward")
    return {
        "policy": str(policy),
        "reward_model": str(work / "reward"),
        "prompts": str(data / "rl_prompts.jsonl"),
    }


def ppo_config(paths: dict[str, str], out: Path, iterations: int) -> PPOConfig:
    h = HPARAMS
    return PPOConfig(out_dir=str(out), policy=paths["policy"], reward_model=paths["reward_model"],
                     prompts_file=paths["prompts"], iterations=iterations, batch_size=BATCH, minibatch_size=MINIBATCH,
                     micro_batch_size=MICRO, epochs=EPOCHS, max_new_tokens=NEW_TOKENS, lr=h["lr"], critic_lr=h["lr"],
                     warmup_steps=0, min_lr_ratio=1.0, betas=(0.9, 0.999), weight_decay=0.0, kl_coef=h["kl_coef"],
                     kl_estimator="k1", clip_eps=h["clip_eps"], value_clip=h["value_clip"], vf_coef=h["vf_coef"],
                     gamma=h["gamma"], lam=h["lam"], temperature=h["temperature"], top_p=1.0, top_k=0,
                     no_eos_penalty=None, max_grad_norm=h["max_grad_norm"], seed=h["seed"], precision="auto",
                     log_every=1, save_every=100_000, guard_every=100_000)  # fmt: skip


# ---------------------------------------------------------------- our worker: timers, FLOPs, memory


PHASES = ("whole run", "generation", "scoring", "training")


def _sample_rss(pid: int, phase: Any, peaks: Any, interval: float) -> None:
    """In a separate process (a thread would take the GIL from the training loop): the peak RSS per phase."""
    page = os.sysconf("SC_PAGE_SIZE")
    path = f"/proc/{pid}/statm"
    while True:
        try:
            with open(path) as f:
                rss = int(f.read().split()[1]) * page
        except OSError:
            return
        current = phase.value
        if current >= 0:
            peaks[current] = max(peaks[current], rss)
        time.sleep(interval)


class RSSMonitor:
    """Peak resident set size per phase, sampled every `interval` s by a child process via /proc/PID/statm.

    Only a phase's first occurrence (the first iteration: generation, scoring, training in that order) is
    sampled: the allocator keeps freed memory, so later occurrences would inherit earlier peaks. A phase's
    "added" memory is its peak minus the RSS when it started.
    """

    def __init__(self, interval: float = 0.02) -> None:
        ctx = multiprocessing.get_context("fork")
        self.phase = ctx.Value("i", -1, lock=False)
        self.peaks = ctx.Array("q", len(PHASES), lock=False)
        self.start: dict[str, int] = {}
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.proc = ctx.Process(
            target=_sample_rss, args=(os.getpid(), self.phase, self.peaks, interval), daemon=True
        )
        self.proc.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    @contextmanager
    def track(self, phase: str) -> Any:
        previous = self.phase.value
        self.enter(phase)
        try:
            yield
        finally:
            if self.phase.value >= 0:
                self.peaks[self.phase.value] = max(self.peaks[self.phase.value], self.rss())
            self.phase.value = previous

    def enter(self, phase: str) -> None:
        """Switch to `phase` (also without a block: training runs from the end of scoring to the log)."""
        if phase in self.start and phase != "whole run":
            self.phase.value = -1  # a later occurrence: not sampled
            return
        index = PHASES.index(phase)
        self.start.setdefault(phase, self.rss())
        self.peaks[index] = max(self.peaks[index], self.rss())
        self.phase.value = index

    def report(self) -> tuple[dict[str, float], dict[str, float]]:
        """(peak MiB, rise over the RSS at the phase's first start MiB) per phase seen."""
        peak = {p: self.peaks[i] / 2**20 for i, p in enumerate(PHASES) if p in self.start}
        return peak, {p: peak[p] - self.start[p] / 2**20 for p in peak}


def linear_weights(model: torch.nn.Module) -> int:
    """Weights that multiply activations: the 2-D weights outside embedding tables (Linear layers, GPT-2's
    Conv1D), and the output layer, tied to the input embeddings or not."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in tables)
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return n + (output.weight.numel() if output is not None and id(output.weight) in tables else 0)


def forward_flops(n_linear: int, arch: ArchConfig, lengths: list[int]) -> float:
    """A forward of sequences of these lengths (real tokens): 2·N per token, plus QK^T and AV over the causal
    context (on average length / 2)."""
    per_layer = 4 * arch.num_hidden_layers * arch.hidden_size
    return sum(n * (2 * n_linear + per_layer * n / 2) for n in lengths)


def worker_ours(args: argparse.Namespace) -> None:
    """One PPO run in this process, with the stage's functions wrapped by timers; prints a JSON line."""
    from rlhf.models import wrappers
    from rlhf.stages import ppo

    torch.set_num_threads(args.threads)
    paths = json.loads(args.paths)
    arch = SIZES[args.size]
    mon = RSSMonitor()
    times: dict[str, list[float]] = defaultdict(list)
    shapes: list[tuple[int, int, int]] = []
    lengths: list[list[int]] = []  # real tokens (prompt + response) of each rollout, per iteration
    orig_generate, orig_score = ppo.generate, ppo.score_rollout
    orig_policy_forward, orig_values, orig_rewards = (
        ppo.policy_forward,
        ppo.response_values,
        wrappers.reward_scores,
    )
    state = {"scoring": False, "calls": 0}
    n_linear: dict[str, int] = {}

    def generate(model: Any, prompts: Any, *a: Any, **k: Any) -> Any:
        n_linear.setdefault("policy", linear_weights(model))
        with mon.track("generation"):
            t0, c0 = time.perf_counter(), time.process_time()
            gen = orig_generate(model, prompts, *a, **k)
            times["generation"].append(time.perf_counter() - t0)
            times["generation_cpu"].append(time.process_time() - c0)
        shapes.append((gen.prompt_ids.size(0), gen.prompt_ids.size(1), gen.response_ids.size(1)))
        lengths.append((gen.prompt_mask.sum(1) + gen.response_mask.sum(1)).tolist())
        return gen

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            if not state["scoring"]:
                return fn(*a, **k)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            times[name][-1] += time.perf_counter() - t0
            return out

        return wrapper

    def policy_forward(*a: Any, **k: Any) -> Any:
        if not state["scoring"]:
            return orig_policy_forward(*a, **k)
        state["calls"] += 1  # per micro-batch: the policy first, then the reference
        name = "score_policy" if state["calls"] % 2 == 1 else "score_reference"
        return timed(name, orig_policy_forward)(*a, **k)

    def score_rollout(
        gen: Any, policy: Any, reference: Any, critic: Any, reward_model: Any, *a: Any, **k: Any
    ) -> Any:
        n_linear.setdefault("critic", linear_weights(critic))
        for name in ("score_policy", "score_reference", "score_critic", "score_reward"):
            times[name].append(0.0)
        state["scoring"], state["calls"] = True, 0
        with mon.track("scoring"):
            t0, c0 = time.perf_counter(), time.process_time()
            out = orig_score(gen, policy, reference, critic, reward_model, *a, **k)
            times["scoring"].append(time.perf_counter() - t0)
            times["scoring_cpu"].append(time.process_time() - c0)
        state["scoring"] = False
        mon.enter("training")  # the rest of the iteration: rewards, advantages, PPO epochs
        return out

    ppo.generate, ppo.score_rollout, ppo.policy_forward = generate, score_rollout, policy_forward  # type: ignore[assignment]
    ppo.response_values = timed("score_critic", orig_values)  # type: ignore[assignment]
    # each function replaced in the module that calls it: reward_scores is called by wrappers.RewardScores
    wrappers.reward_scores = timed("score_reward", orig_rewards)  # type: ignore[assignment]
    out = Path(args.out)
    cfg = ppo_config(paths, out, args.iterations)
    # one Run.log per iteration (log_every=1): the clock between two calls is one whole iteration, as TRL's is
    clock: list[tuple[float, float]] = []
    orig_log = ppo.Run.log

    def log(self: Any, step: int, metrics: dict[str, Any]) -> None:
        if "ppo/iteration_s" in metrics:
            clock.append((time.perf_counter(), time.process_time()))
            mon.enter("whole run")
        orig_log(self, step, metrics)

    ppo.Run.log = log  # type: ignore[method-assign]
    with mon.track("whole run"):
        ppo.run(cfg, quiet=True)
    ppo.Run.log = orig_log  # type: ignore[method-assign]
    wall_between = [b[0] - a[0] for a, b in zip(clock, clock[1:], strict=False)]
    cpu_between = [b[1] - a[1] for a, b in zip(clock, clock[1:], strict=False)]
    peak_rss, rss_rise = mon.report()
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "ppo/iteration_s" in r]
    iteration = [r["ppo/iteration_s"] for r in rows]
    rollout = [r["ppo/rollout_s"] for r in rows]
    training = [i - r for i, r in zip(iteration, rollout, strict=True)]
    keep = slice(1, None) if len(rows) > 1 else slice(None)  # the first iteration pays one-off allocation

    def med(xs: list[float]) -> float:
        return statistics.median(xs[keep])

    # model FLOPs: the real tokens' (padding and finished rows riding along in generation are not useful work)
    flops: dict[str, list[float]] = defaultdict(list)
    for n in lengths:
        f_policy = forward_flops(n_linear["policy"], arch, n)
        f_critic = forward_flops(n_linear["critic"], arch, n)
        flops["generation"].append(f_policy)  # the prompt's prefill, then each response token once
        flops["scoring"].append(2 * f_policy + 2 * f_critic)  # policy, reference, critic, reward model
        # forward + backward (2x) for policy and critic, each epoch
        flops["training"].append(EPOCHS * 3 * (f_policy + f_critic))
    phase_times = {"generation": times["generation"], "scoring": times["scoring"], "training": training}
    phase_s = {k: med(v) for k, v in phase_times.items()}
    # CPU time: iteration i+1 runs between the logs of iterations i and i+1
    gen_cpu, score_cpu = times["generation_cpu"][1:], times["scoring_cpu"][1:]
    train_cpu = [c - g - sc for c, g, sc in zip(cpu_between, gen_cpu, score_cpu, strict=False)]
    phase_cpu = {"generation": gen_cpu, "scoring": score_cpu, "training": train_cpu}
    phase_cpu_s = {k: statistics.median(v) for k, v in phase_cpu.items()}
    # rates per iteration (each iteration's own FLOPs over its own time), then the median
    rate = {k: med([f / t for f, t in zip(flops[k], phase_times[k], strict=True)]) for k in phase_times}
    rate_cpu = {k: statistics.median([f / t for f, t in zip(flops[k][1:], phase_cpu[k], strict=False)])
                for k in phase_cpu}  # fmt: skip
    b, p, t = shapes[-1]
    result = {
        "iteration_s": statistics.median(wall_between), "iteration_cpu_s": statistics.median(cpu_between),
        "stage_iteration_s": med(iteration), "phase_s": phase_s,
        "scoring_split_s": {k: med(times[k]) for k in ("score_policy", "score_reference", "score_critic", "score_reward")},
        "flops": {k: med(v) for k, v in flops.items()},
        "flop_rate": rate, "phase_cpu_s": phase_cpu_s,
        "flop_rate_cpu": rate_cpu, "shape": {"batch": b, "prompt": p, "response": t},
        "real_tokens": [sum(n) for n in lengths], "padded_tokens": [b_ * (p_ + t_) for b_, p_, t_ in shapes],
        "linear_weights": n_linear, "iterations": len(rows),
        "score": [r["ppo/score"] for r in rows], "kl": [r["ppo/kl"] for r in rows],
        "response_length": [r["ppo/response_length"] for r in rows],
        "peak_rss_mib": peak_rss, "rss_rise_mib": rss_rise,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- driver


def run_worker(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions (median reported)")
    parser.add_argument("--iterations", type=int, default=6, help="PPO iterations per run, tiny workload")
    parser.add_argument("--sizes", nargs="*", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument(
        "--small-reps", type=int, default=1, help="repetitions of the small workload (ours only)"
    )
    parser.add_argument(
        "--small-iterations", type=int, default=3, help="PPO iterations per run, small workload"
    )
    parser.add_argument("--no-trl", action="store_true", help="skip TRL")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both systems")
    parser.add_argument("--quick", action="store_true", help="smoke pass: tiny, 2 iterations, 1 repetition")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--name", default="ppo", help="results file: benchmarks/results/NAME.json")
    parser.add_argument("--worker", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_ours(args)
        return
    if args.quick:
        args.sizes, args.iterations, args.reps = ["tiny"], 2, 1
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")  # fmt: skip
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    python = None if args.no_trl else ensure_trl_venv()
    peak_before = matmul_peak.load_or_measure("cpu", args.threads, quick=args.quick)
    result: dict[str, Any] = {"command": "python -m benchmarks.ppo_bench " + " ".join(sys.argv[1:]),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(args.threads),
                              "workload": {"batch": BATCH, "minibatch": MINIBATCH, "micro_batch": MICRO,
                                           "epochs": EPOCHS, "max_new_tokens": NEW_TOKENS, **HPARAMS},
                              "iterations": args.iterations, "reps": args.reps, "sizes": {}}  # fmt: skip
    for size in args.sizes:
        paths = prepare(work / size, size, sft_steps=40 if size == "tiny" else 0)
        with_trl = python is not None and size == "tiny"
        reps = args.reps if size == "tiny" else args.small_reps
        iterations = args.iterations if size == "tiny" else args.small_iterations
        ours, trl = compare(
            paths, size, work / size, reps, iterations, python if with_trl else None, args.threads, env
        )
        result["sizes"][size] = summarise(ours, trl, peak_before)
    peak_after = matmul_peak.load_or_measure("cpu", args.threads, quick=True)
    result["matmul_peak"] = {"before": peak_before, "after": peak_after}
    for r in result["sizes"].values():
        add_mfu(r, peak_before, peak_after)
    save_result(args.name + (".quick" if args.quick else ""), result)  # a smoke pass keeps the real results
    print(json.dumps({s: {k: v for k, v in r.items() if k not in ("ours", "trl")} for s, r in result["sizes"].items()},
                     indent=1))  # fmt: skip
    if not args.no_doc and not args.quick:
        update_doc(args.name.replace(".", "_"), "PPO iteration: `rlhf ppo` per phase, MFU, memory; vs TRL PPOTrainer", result,
                   doc_section(result))  # fmt: skip


def compare(
    paths: dict[str, str], size: str, work: Path, reps: int, iterations: int, python: Path | None, threads: int,
    env: dict[str, str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    """(ours, TRL) results of `reps` runs each, alternating (each going first every other repetition), each a
    fresh process; TRL skipped where `python` (its venv's) is None, and from its first failure on (the error is
    then TRL's one result, under "error")."""
    ours: list[dict[str, Any]] = []
    trl: list[dict[str, Any]] = []
    for rep in range(reps):
        for system in ("ours", "trl") if rep % 2 == 0 else ("trl", "ours"):
            if system == "ours":
                cmd = [sys.executable, "-m", "benchmarks.ppo_bench", "--worker", "ours", "--size", size,
                       "--paths", json.dumps(paths), "--out", str(work / f"ours-{rep}"),
                       "--iterations", str(iterations), "--threads", str(threads)]  # fmt: skip
                ours.append(run_worker(cmd, env))
                print(f"{size} rep {rep} ours: {ours[-1]['iteration_s']:.2f} s/iteration "
                      f"(CPU {ours[-1]['iteration_cpu_s']:.2f} s) "
                      f"{json.dumps({k: round(v, 2) for k, v in ours[-1]['phase_s'].items()})}", flush=True)  # fmt: skip
            elif python is not None:
                cmd = [str(python), str(ROOT / "benchmarks" / "trl_ppo_worker.py"), "--paths", json.dumps(paths),
                       "--out", str(work / f"trl-{rep}"), "--iterations", str(iterations),
                       "--hparams", json.dumps({**HPARAMS, "batch": BATCH, "minibatch": MINIBATCH,
                                                "micro_batch": MICRO, "epochs": EPOCHS,
                                                "max_new_tokens": NEW_TOKENS, "bf16": BF16})]  # fmt: skip
                try:
                    trl.append(run_worker(cmd, env))
                except RuntimeError as e:  # e.g. a model type TRL's PPO cannot run
                    print(f"{size} rep {rep} TRL failed: {str(e).strip().splitlines()[-1]}", flush=True)
                    trl, python = [{"error": str(e).strip().splitlines()[-1]}], None
                    continue
                print(f"{size} rep {rep} TRL: {trl[-1]['iteration_s']:.2f} s/iteration "
                      f"(CPU {trl[-1]['iteration_cpu_s']:.2f} s)", flush=True)  # fmt: skip
    return ours, trl


def summarise(ours: list[dict[str, Any]], trl: list[dict[str, Any]], peak: dict[str, Any]) -> dict[str, Any]:
    med = statistics.median
    r: dict[str, Any] = {
        "ours": ours,
        "trl": trl,
        "ours_iteration_s": med([o["iteration_s"] for o in ours]),
        "ours_iteration_cpu_s": med([o["iteration_cpu_s"] for o in ours]),
    }
    r["ours_phase_s"] = {k: med([o["phase_s"][k] for o in ours]) for k in ours[0]["phase_s"]}
    r["ours_scoring_split_s"] = {
        k: med([o["scoring_split_s"][k] for o in ours]) for k in ours[0]["scoring_split_s"]
    }
    r["ours_flop_rate"] = {k: med([o["flop_rate"][k] for o in ours]) for k in ours[0]["flop_rate"]}
    r["ours_flop_rate_cpu"] = {
        k: med([o["flop_rate_cpu"][k] for o in ours]) for k in ours[0]["flop_rate_cpu"]
    }
    r["ours_phase_cpu_s"] = {k: med([o["phase_cpu_s"][k] for o in ours]) for k in ours[0]["phase_cpu_s"]}
    r["ours_peak_rss_mib"] = {
        k: max(o["peak_rss_mib"].get(k, 0) for o in ours) for k in ours[0]["peak_rss_mib"]
    }
    r["ours_rss_rise_mib"] = {
        k: max(o["rss_rise_mib"].get(k, 0) for o in ours) for k in ours[0]["rss_rise_mib"]
    }
    r["ours_final_score"] = med([statistics.fmean(o["score"][-2:]) for o in ours])
    r["ours_first_score"] = med([o["score"][0] for o in ours])
    r["ours_maxrss_mib"] = max(o["maxrss_mib"] for o in ours)
    if trl and "error" in trl[0]:
        r["trl_error"] = trl[0]["error"]
    elif trl:
        r["trl_iteration_s"] = med([t["iteration_s"] for t in trl])
        r["trl_final_score"] = med([statistics.fmean(t["score"][-2:]) for t in trl])
        r["trl_first_score"] = med([t["score"][0] for t in trl])
        r["trl_maxrss_mib"] = max(t["maxrss_mib"] for t in trl)
        r["trl_iteration_cpu_s"] = med([t["iteration_cpu_s"] for t in trl])
        r["speedup_vs_trl"] = r["trl_iteration_s"] / r["ours_iteration_s"]
        r["cpu_speedup_vs_trl"] = r["trl_iteration_cpu_s"] / r["ours_iteration_cpu_s"]
        # the ratio of each repetition's pair (ours and TRL measured next to each other)
        r["pair_speedups"] = [t["iteration_s"] / o["iteration_s"] for o, t in zip(ours, trl, strict=False)]
    return r


def add_mfu(r: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
    """MFU two ways: wall-clock rates over the wall-clock peak, CPU-time rates over the CPU-time peak (the
    second is blind to how much of the time other jobs held the cores)."""
    peak = statistics.fmean([before["bf16"]["flops"], after["bf16"]["flops"]])
    peak_cpu = statistics.fmean([before["bf16"]["flops_cpu"], after["bf16"]["flops_cpu"]])
    r["peak_bf16_flops"], r["peak_bf16_flops_cpu"] = peak, peak_cpu
    r["ours_mfu"] = {k: v / peak for k, v in r["ours_flop_rate"].items()}
    r["ours_mfu_cpu"] = {k: v / peak_cpu for k, v in r["ours_flop_rate_cpu"].items()}


def doc_section(result: dict[str, Any]) -> list[str]:
    w, mp = result["workload"], result["matmul_peak"]["before"]
    lines = [
        f"Workload: {w['batch']} prompts per iteration, up to {w['max_new_tokens']} new tokens, {w['epochs']} PPO epochs "
        f"over minibatches of {w['minibatch']} (micro-batch {w['micro_batch']}), lr {w['lr']}, KL coef {w['kl_coef']}, "
        f"bf16 autocast; tiny: {result['iterations']} iterations per run, {result['reps']} alternating repetitions with "
        "TRL; small: ours only; the first iteration of each run dropped. Matmul peak (bf16, 1 thread, measured in "
        f"this run): {mp['bf16']['flops'] / 1e9:.0f} GFLOP/s wall-clock, {mp['bf16']['flops_cpu'] / 1e9:.0f} GFLOP per "
        f"CPU-second (fp32: {mp['fp32']['flops'] / 1e9:.0f}, {mp['fp32']['flops_cpu'] / 1e9:.0f}).", "",
        "Time per iteration and speed-up vs TRL, wall clock and CPU time (the CPU-time ratio is steadier: it does not "
        "count the time other jobs held the cores):", "",
        "| model | ours s/iter (CPU s) | TRL s/iter (CPU s) | speed-up vs TRL, wall (target 3x) | speed-up, CPU time | per-pair wall ratios | score first -> last 2: ours; TRL |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for size, r in result["sizes"].items():
        if "trl_iteration_s" in r:
            lines.append(f"| {size} | {r['ours_iteration_s']:.2f} ({r['ours_iteration_cpu_s']:.2f}) | {r['trl_iteration_s']:.2f} "
                         f"({r['trl_iteration_cpu_s']:.2f}) | **{r['speedup_vs_trl']:.2f}x** | **{r['cpu_speedup_vs_trl']:.2f}x** | "
                         f"{', '.join(f'{x:.2f}' for x in r['pair_speedups'])} | {r['ours_first_score']:.3f} -> "
                         f"{r['ours_final_score']:.3f}; {r['trl_first_score']:.3f} -> {r['trl_final_score']:.3f} |")  # fmt: skip
        else:
            lines.append(f"| {size} | {r['ours_iteration_s']:.2f} ({r['ours_iteration_cpu_s']:.2f}) | - | - | - | - | "
                         f"{r['ours_first_score']:.3f} -> {r['ours_final_score']:.3f}; - |")  # fmt: skip
    lines += ["", "Ours per phase (median seconds; MFU = achieved FLOP rate / bf16 matmul peak, wall-clock and CPU-time; "
              "peak RSS of the phase's first occurrence and what it added):", "",
              "| model | phase | wall s | CPU s | MFU wall | MFU CPU | peak RSS MiB | added MiB |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for size, r in result["sizes"].items():
        for phase in ("generation", "scoring", "training"):
            split = ""
            if phase == "scoring":
                sp = r["ours_scoring_split_s"]
                split = f" (policy {sp['score_policy']:.2f} / ref {sp['score_reference']:.2f} / critic {sp['score_critic']:.2f} / RM {sp['score_reward']:.2f})"
            lines.append(f"| {size} | {phase}{split} | {r['ours_phase_s'][phase]:.2f} | {r['ours_phase_cpu_s'][phase]:.2f} | "
                         f"{r['ours_mfu'][phase]:.0%} | {r['ours_mfu_cpu'][phase]:.0%} | "
                         f"{r['ours_peak_rss_mib'].get(phase, 0):.0f} | {r['ours_rss_rise_mib'].get(phase, 0):.0f} |")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
