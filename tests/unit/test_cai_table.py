"""benchmarks.cai_gold.runs_table: docs/cai.md's table of RL-CAI runs, read from the files its commands write."""

import json
from pathlib import Path

from benchmarks.cai_gold import runs_table


def _rates(harmful: float, toxic: float) -> dict[str, object]:
    either = harmful + toxic
    return {"harmful_rate": harmful, "harmful_ci95": [harmful / 2, harmful * 2], "toxic_rate": toxic,
            "toxic_ci95": [toxic / 2, toxic * 2], "harmful_or_toxic_rate": either, "harmful_or_toxic_ci95": [0.01, 0.5]}  # fmt: skip


def test_rows_carry_each_runs_numbers(tmp_path: Path) -> None:
    for run, (h, t, u) in {"sft": (0.06, 0.14, 0.2), "cai": (0.0, 0.01, 0.02)}.items():
        gold = {"redteam_heldout": _rates(h, t), "redteam_heldout_mutations": _rates(u, u / 2)}
        (tmp_path / f"gold_rt_{run}.json").write_text(json.dumps(gold))
        (tmp_path / f"prov_{run}.json").write_text(json.dumps({"provocations": {"polite_rate": 0.5 + u}}))
    evaluation = {"win_rate_a": 0.781, "ci95": [0.74, 0.82], "wins_a": 300, "ties": 90, "losses_a": 110,
                  "a": {"correct_knowable_rate": 0.7}, "b": {"correct_knowable_rate": 0.8}}  # fmt: skip
    (tmp_path / "eval_cai_vs_sft.json").write_text(json.dumps(evaluation))
    lines = runs_table(tmp_path, [("SFT", "sft"), ("RL-CAI", "cai")])
    assert len(lines) == 4 and lines[1].count("|") == lines[0].count("|")
    sft, cai = (line.split(" | ") for line in lines[2:])
    assert sft[0] == "| SFT" and sft[1] == "0.060 / 0.140" and sft[2] == "0.200 [0.100, 0.400]"
    assert (
        sft[6] == "" and sft[7] == "0.800 |"
    )  # SFT: no win rate; its correctness from the evaluation's side b
    assert cai[4] == "0.030 [0.010, 0.500]" and cai[5] == "0.52"
    assert cai[6] == "0.781 [0.740, 0.820] (300/90/110)" and cai[7] == "0.700 |"
