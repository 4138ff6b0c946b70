"""Where the performance targets stand: a table in docs/performance.md read from every results file that
measures one, so that the doc says what the JSON says.

    python -m benchmarks.targets [--no-doc]

One row per target per results file (benchmarks/results/*.json, smoke passes left out), so per machine and
build, with the machine as that file records it. A file that measures several architectures or sizes gives the
range of their median ratios and names those below the threshold. Older files record less (no CPU family and
model, no AMX flag); the table says "not recorded" there. Nothing is measured here: `python -m benchmarks.run`
runs this last, after the benchmarks have written their files.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from benchmarks.common import DOC, RESULTS, SIZES, cpu_generation, replace_doc_section

START, END = "<!-- targets:start -->", "<!-- targets:end -->"
GENERATION_BATCH = 64  # the batch the generation targets are set at

# What a check makes of one results file: None where the file does not measure the target, else the measured
# cell's text and the figures held to the threshold, by what they measure ('tiny', 'gemma 30M'); no figures
# where the file measured nothing comparable (TRL failed, another batch).
Measured = tuple[str, dict[str, float]] | None


@dataclass(frozen=True)
class Target:
    label: str
    threshold: float
    unit: Literal["x", "%", "score"]  # a speed ratio, a share of the matmul peak, ours minus TRL's score
    files: str  # the glob of the results files that may measure it
    check: Callable[[dict[str, Any]], Measured]

    def show(self, value: float) -> str:
        return {"x": f"{value:.2f}x", "%": f"{value:.0%}", "score": f"{value:+.3f}"}[self.unit]

    def threshold_text(self) -> str:
        if self.unit == "score":
            return "ours >= TRL"
        return f">= {self.threshold:g}x" if self.unit == "x" else f">= {self.threshold:.0%}"


@dataclass(frozen=True)
class Row:
    target: Target
    file: str
    machine: str
    measured: str
    met: bool | None  # None: no figure to hold to the threshold
    on_gpu: bool

    def cells(self) -> list[str]:
        met = "-" if self.met is None else "**yes**" if self.met else "**no**"
        return [
            self.target.label,
            self.target.threshold_text(),
            f"`{self.file}`",
            self.machine,
            self.measured,
            met,
        ]


def span(values: list[float], fmt: str) -> str:
    """'2.17-2.24x' for several values, '2.24x' for one (fmt '{:.2f}x' or '{:.0%}')."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo.rstrip('x%')}-{hi}"


def ppo_tiny(r: dict[str, Any]) -> dict[str, Any] | None:
    """The tiny workload of a ppo_bench file, where TRL ran (or failed) beside it."""
    tiny = r.get("sizes", {}).get("tiny")
    return tiny if tiny and ("speedup_vs_trl" in tiny or "trl_error" in tiny) else None


def ppo_speedup(r: dict[str, Any]) -> Measured:
    t = ppo_tiny(r)
    if t is None:
        return None
    if "speedup_vs_trl" not in t:
        return f"TRL failed: {t['trl_error'][:80]}", {}
    cpu = f"{t['cpu_speedup_vs_trl']:.2f}x CPU time" if "cpu_speedup_vs_trl" in t else "CPU time not recorded"
    pairs = ", ".join(f"{x:.2f}" for x in t.get("pair_speedups", [])) or "not recorded"
    text = (f"**{t['speedup_vs_trl']:.2f}x** wall, {cpu} ({t['ours_iteration_s']:.2f} s vs "
            f"{t['trl_iteration_s']:.2f} s per iteration; pairs {pairs})")  # fmt: skip
    return text, {"tiny": t["speedup_vs_trl"]}


def ppo_score(r: dict[str, Any]) -> Measured:
    t = ppo_tiny(r)
    if t is None or "trl_final_score" not in t:
        return None
    text = (f"ours {t['ours_final_score']:.3f}, TRL {t['trl_final_score']:.3f}: mean score of the last 2 of "
            f"{r.get('iterations', '(not recorded)')} iterations (first iteration {t['ours_first_score']:.3f} "
            f"and {t['trl_first_score']:.3f})")  # fmt: skip
    return text, {"tiny": t["ours_final_score"] - t["trl_final_score"]}


def ppo_small_mfu(r: dict[str, Any]) -> Measured:
    """The small workload's phases: training and scoring (the phases that run forward and backward over packed
    rows) are held to the threshold; generation is shown beside them."""
    s = r.get("sizes", {}).get("small")
    if not s or "ours_mfu" not in s:
        return None
    phases = ("training", "scoring", "generation")
    wall = ", ".join(f"{p} {s['ours_mfu'][p]:.0%}" for p in phases)
    cpu = ", ".join(f"{s['ours_mfu_cpu'][p]:.0%}" for p in phases) if "ours_mfu_cpu" in s else "not recorded"
    peak = f"{s['peak_bf16_flops'] / 1e9:.0f} GFLOP/s" if "peak_bf16_flops" in s else "a peak not recorded"
    text = f"{wall} (CPU time {cpu}) of {peak}, the bf16 matmul peak measured in the run"
    return text, {p: s["ours_mfu"][p] for p in ("training", "scoring")}


def reward_ratio(r: dict[str, Any]) -> Measured:
    settings = {k: s for k, s in r.get("settings", {}).items() if "ratio" in s}
    if not settings:
        return None
    text = ", ".join(
        f"{k} (K={s.get('k', 'not recorded')}) **{s['ratio']:.2f}x**" for k, s in settings.items()
    )
    return text, {k: s["ratio"] for k, s in settings.items()}


def generation_ratio(r: dict[str, Any]) -> Measured:
    sizes = {k: s for k, s in r.get("sizes", {}).items() if "hf_median" in s}
    if not sizes:
        return None
    batch = r.get("batch")
    text = f"batch {batch if batch is not None else 'not recorded'}: " + ", ".join(
        f"{k} **{s['ratio']:.2f}x**" + (f" ({s['cpu_ratio']:.2f}x CPU time)" if "cpu_ratio" in s else "")
        for k, s in sizes.items()
    )
    return text, ({k: s["ratio"] for k, s in sizes.items()} if batch == GENERATION_BATCH else {})


def per_architecture(part: str, key: str, cpu_key: str | None = None, size: str | None = None,
                     fmt: str = "{:.2f}x") -> Callable[[dict[str, Any]], Measured]:  # fmt: skip
    """The check of an architectures file: `part`'s `key` in every block (of `size` only, where given), by size,
    with the range of `cpu_key` (the same figure by CPU time) beside it where the blocks record it."""

    def check(r: dict[str, Any]) -> Measured:
        blocks = [e for e in r.get("results", {}).values() if part in e and size in (None, e.get("size"))]
        if not blocks:
            return None
        measured = [e for e in blocks if key in e[part]]
        texts = []
        for s in sorted({e["size"] for e in measured}, key=list(SIZES).index):
            here = [e for e in measured if e["size"] == s]
            archs, figure = ", ".join(e["arch"] for e in here), span([e[part][key] for e in here], fmt)
            cell = f"{s} ({archs}): **{figure}**"
            if cpu_key and all(cpu_key in e[part] for e in here):
                cell += f" ({span([e[part][cpu_key] for e in here], fmt)} CPU time)"
            texts.append(cell)
        if failed := [f"{e['arch']} {e['size']}" for e in blocks if key not in e[part]]:
            texts.append(f"no TRL figure for {', '.join(failed)}")
        return "; ".join(texts), {f"{e['arch']} {e['size']}": e[part][key] for e in measured}

    return check


TARGETS = [
    Target("PPO iteration vs TRL PPOTrainer, tiny workload", 3.0, "x", "ppo*.json", ppo_speedup),
    Target("PPO score after the same iterations as TRL, tiny workload", 0.0, "score", "ppo*.json", ppo_score),
    Target("small PPO workload's training and scoring, share of the bf16 matmul peak", 0.6, "%", "ppo*.json",
           ppo_small_mfu),
    Target("PPO vs TRL PPOTrainer, per architecture", 1.6, "x", "architectures*.json",
           per_architecture("ppo", "speedup_vs_trl", "cpu_speedup_vs_trl")),
    Target("PPO MFU at 30M (against the matmul peak of the same run), per architecture", 0.6, "%",
           "architectures*.json", per_architecture("ppo", "ours_mfu", "ours_mfu_cpu", size="30M", fmt="{:.0%}")),
    Target("reward-model training vs TRL RewardTrainer", 2.0, "x", "reward_throughput*.json", reward_ratio),
    Target("reward-model training vs RewardTrainer, per architecture (`pairs` setting)", 2.0, "x",
           "architectures*.json", per_architecture("reward", "ratio")),
    Target("generation vs transformers `generate()`, batch 64", 2.0, "x", "generation*.json", generation_ratio),
    Target("generation vs `generate()` at batch 64, per architecture", 2.0, "x", "architectures*.json",
           per_architecture("generation", "ratio", "cpu_ratio")),
]  # fmt: skip


def yes_no(flag: bool | None) -> str:
    return "not recorded" if flag is None else "yes" if flag else "no"


def machine_cell(r: dict[str, Any]) -> str:
    """The machine as the file records it, and when it ran."""
    m = r.get("machine", {})
    if m.get("gpu"):
        where = f"GPU {m['gpu']}"
    elif m.get("device"):
        where = "run on the CPU" if m["device"] == "cpu" else f"device {m['device']}"
    else:
        where = "device not recorded"
    parts = [
        m.get("cpu", "CPU not recorded"),
        cpu_generation(m) or "family and model not recorded",
        f"{m['cores']} cores" if "cores" in m else "cores not recorded",
        f"AVX512-BF16 {yes_no(m.get('avx512_bf16'))}",
        f"AMX {yes_no(m.get('amx_bf16'))}",
        where,
        f"torch {m.get('torch', 'not recorded')}",
    ]
    when = r.get("date") or (f"`{r['command']}`" if r.get("command") else "date not recorded")
    return ", ".join(parts) + f"; {when}"


def load_results(results: Path, pattern: str) -> list[tuple[str, dict[str, Any]]]:
    """(file name, contents) of the results files matching `pattern`, oldest first; smoke passes left out."""
    found = [
        (p.name, json.loads(p.read_text())) for p in sorted(results.glob(pattern)) if ".quick" not in p.name
    ]
    return sorted(found, key=lambda f: str(f[1].get("date", "")))


def rows(results: Path = RESULTS) -> list[Row]:
    out = []
    for target in TARGETS:
        for name, r in load_results(results, target.files):
            measured = target.check(r)
            if measured is None:
                continue
            text, figures = measured
            below = sorted((v, k) for k, v in figures.items() if v < target.threshold)
            if len(figures) > 1 and below:  # a file of several figures names those that miss, lowest first
                missed = (
                    "all"
                    if len(below) == len(figures)
                    else ", ".join(f"{k} {target.show(v)}" for v, k in below)
                )
                text += f"; below: {missed}"
            met = not below if figures else None
            on_gpu = str(r.get("machine", {}).get("device", "")).startswith("cuda")
            out.append(Row(target, name, machine_cell(r), text, met, on_gpu))
    return out


def section(table_rows: list[Row]) -> str:
    """The doc's text between the markers: the table, and the targets no GPU run has measured."""
    head = ["target", "threshold", "results file", "machine", "measured (median ratios)", "met?"]
    on_gpu = {row.target.label for row in table_rows if row.on_gpu}
    lines = [
        START,
        "Generated by `python -m benchmarks.targets` from `benchmarks/results/*.json` (the last step of "
        "`make bench`): one row per target per results file, oldest first within a target. Ratios are ours over "
        "theirs in throughput, wall clock unless marked CPU time; where a file holds several architectures or "
        "sizes, the range of their medians, and those below the threshold by name.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row.cells()) + " |" for row in table_rows),
        "",
        f"No results file holds a GPU run of: {'; '.join(t.label for t in TARGETS if t.label not in on_gpu)}.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="the directory of the results files")
    parser.add_argument("--no-doc", action="store_true", help="print the table, do not update the doc")
    args = parser.parse_args()
    text = section(rows(args.results))
    print(text)
    if not args.no_doc:
        replace_doc_section(START, END, text, DOC)


if __name__ == "__main__":
    main()
