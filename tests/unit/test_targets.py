"""benchmarks.targets: the targets table of docs/performance.md is read from the results files, a row per target
per file, and a figure below its threshold reads "no"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import targets
from benchmarks.common import replace_doc_section

OLD_EPYC = {"cpu": "AMD EPYC", "cores": 2, "torch": "2.13.0+cpu", "avx512_bf16": True, "amx_bf16": False,
            "device": "cpu"}  # fmt: skip
XEON = {
    **OLD_EPYC,
    "cpu": "Intel(R) Xeon(R) Processor",
    "cpu_family": "6",
    "cpu_model": "167",
    "amx_bf16": True,
}
GPU = {**XEON, "cpu_model": "207", "cores": 16, "device": "cuda", "gpu": "NVIDIA H200"}


def ppo_tiny(speedup: float, ours_score: float, trl_score: float) -> dict[str, Any]:
    return {"speedup_vs_trl": speedup, "cpu_speedup_vs_trl": speedup, "pair_speedups": [speedup],
            "ours_iteration_s": 1.0, "trl_iteration_s": speedup, "ours_final_score": ours_score,
            "trl_final_score": trl_score, "ours_first_score": -0.6, "trl_first_score": -0.6}  # fmt: skip


def block(arch: str, size: str, ppo: float, reward: float, generation: float, mfu: float) -> dict[str, Any]:
    return {"arch": arch, "size": size,
            "ppo": {"speedup_vs_trl": ppo, "cpu_speedup_vs_trl": ppo, "ours_mfu": mfu, "ours_mfu_cpu": mfu},
            "reward": {"ratio": reward}, "generation": {"ratio": generation, "cpu_ratio": generation}}  # fmt: skip


def write_results(results: Path) -> None:
    files: dict[str, dict[str, Any]] = {
        "ppo.json": {"date": "2026-11-21 21:03", "machine": OLD_EPYC, "iterations": 6, "sizes": {
            "tiny": ppo_tiny(6.45, -0.36, -0.41),
            "small": {"ours_mfu": {"training": 0.70, "scoring": 0.55, "generation": 0.45}, "peak_bf16_flops": 5.08e11},
        }},
        "ppo_tiny.amx.json": {"date": "2026-12-04 12:44", "machine": XEON, "iterations": 6,
                              "sizes": {"tiny": ppo_tiny(2.78, -0.70, -0.66)}},
        "ppo.quick.json": {"date": "2026-12-05 10:00", "machine": XEON, "sizes": {"tiny": ppo_tiny(0.5, -1, 0)}},
        "architectures.json": {"date": "2026-12-03 15:50", "machine": OLD_EPYC, "results": {
            "llama/4M": block("llama", "4M", 2.07, 2.53, 2.10, 0.50),
            "gemma/4M": block("gemma", "4M", 1.50, 3.71, 2.20, 0.40),
            "llama/30M": block("llama", "30M", 2.24, 2.00, 2.05, 0.66),
        }},
        "reward_throughput.json": {"date": "2026-11-21", "machine": {"cpu": "AMD EPYC", "avx512_bf16": True},
                                   "settings": {"rankings": {"k": 4, "ratio": 9.38}, "pairs": {"k": 2, "ratio": 5.06}}},
        "generation.cuda.json": {"date": "2026-12-04 12:57", "machine": GPU, "batch": 64,
                                 "sizes": {"tiny": {"hf_median": 1.0, "ratio": 0.96}}},
    }  # fmt: skip
    results.mkdir()
    for name, contents in files.items():
        (results / name).write_text(json.dumps(contents))


def test_a_row_per_target_per_results_file_with_the_verdict_the_figures_give(tmp_path: Path) -> None:
    write_results(tmp_path / "results")
    rows = targets.rows(tmp_path / "results")
    verdicts = [(row.target.label.split(",")[0], row.file, row.cells()[-1]) for row in rows]
    assert verdicts == [
        ("PPO iteration vs TRL PPOTrainer", "ppo.json", "**yes**"),
        ("PPO iteration vs TRL PPOTrainer", "ppo_tiny.amx.json", "**no**"),  # 2.78x against 3x
        ("PPO score after the same iterations as TRL", "ppo.json", "**yes**"),
        (
            "PPO score after the same iterations as TRL",
            "ppo_tiny.amx.json",
            "**no**",
        ),  # -0.70 below TRL's -0.66
        ("small PPO workload's training and scoring", "ppo.json", "**no**"),  # scoring at 55%
        ("PPO vs TRL PPOTrainer", "architectures.json", "**no**"),  # gemma 4M 1.50x against 1.6x
        (
            "PPO MFU at 30M (against the matmul peak of the same run)",
            "architectures.json",
            "**yes**",
        ),  # 30M only
        ("reward-model training vs TRL RewardTrainer", "reward_throughput.json", "**yes**"),
        ("reward-model training vs RewardTrainer", "architectures.json", "**yes**"),  # 2.00x meets ">= 2x"
        ("generation vs transformers `generate()`", "generation.cuda.json", "**no**"),
        ("generation vs `generate()` at batch 64", "architectures.json", "**yes**"),
    ]  # the smoke pass's file (ppo.quick.json) left out
    by_file = {(row.target.label.split(",")[0], row.file): row for row in rows}
    small = by_file[("small PPO workload's training and scoring", "ppo.json")]
    assert small.measured.startswith("training 70%, scoring 55%, generation 45%")
    assert small.measured.endswith(
        "of 508 GFLOP/s, the bf16 matmul peak measured in the run; below: scoring 55%"
    )
    ppo_arch = by_file[("PPO vs TRL PPOTrainer", "architectures.json")]
    assert ppo_arch.measured == (
        "4M (llama, gemma): **1.50-2.07x** (1.50-2.07x CPU time); 30M (llama): **2.24x** (2.24x CPU time); "
        "below: gemma 4M 1.50x"
    )
    assert ppo_arch.cells()[1] == ">= 1.6x"
    assert by_file[("PPO iteration vs TRL PPOTrainer", "ppo.json")].measured.startswith(
        "**6.45x** wall, 6.45x CPU"
    )


def test_the_machine_is_what_the_file_records_and_not_recorded_where_it_lacks_a_field(tmp_path: Path) -> None:
    write_results(tmp_path / "results")
    machines = {row.file: row.machine for row in targets.rows(tmp_path / "results")}
    assert machines["ppo.json"] == ("AMD EPYC, family and model not recorded, 2 cores, AVX512-BF16 yes, AMX no, "
                                    "run on the CPU, torch 2.13.0+cpu; 2026-11-21 21:03")  # fmt: skip
    assert machines["ppo_tiny.amx.json"].startswith("Intel(R) Xeon(R) Processor, family 6 model 167, 2 cores")
    assert machines["reward_throughput.json"] == (
        "AMD EPYC, family and model not recorded, cores not recorded, AVX512-BF16 yes, AMX not recorded, "
        "device not recorded, torch not recorded; 2026-11-21"
    )
    assert ", GPU NVIDIA H200, torch" in machines["generation.cuda.json"]


def test_the_doc_section_is_replaced_between_its_markers_and_the_text_around_it_kept(tmp_path: Path) -> None:
    write_results(tmp_path / "results")
    doc = tmp_path / "performance.md"
    before = "# Performance\n\n## Where the targets stand\n\nWhy the rows differ.\n\n"
    after = "\n\n### Where the tiny workload's speed went\n\nIt went into generation.\n"
    doc.write_text(f"{before}{targets.START}\n| a hand-typed 9.99x |\n{targets.END}{after}")
    section = targets.section(targets.rows(tmp_path / "results"))
    replace_doc_section(targets.START, targets.END, section, doc)
    text = doc.read_text()
    assert text == before + section + after
    assert (
        "9.99x" not in text
        and "| PPO iteration vs TRL PPOTrainer, tiny workload | >= 3x | `ppo.json` |" in text
    )
    assert "No results file holds a GPU run of: PPO iteration vs TRL PPOTrainer, tiny workload;" in text
    assert (
        "generation vs transformers `generate()`, batch 64;" not in text
    )  # generation.cuda.json ran on the GPU
    replace_doc_section(targets.START, targets.END, section, doc)
    assert doc.read_text() == text
