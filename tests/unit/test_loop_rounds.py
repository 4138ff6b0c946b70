"""The per-round table of docs/loop.md is read from what the loop wrote, round by round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import loop_rounds


def side(correct: float, toxic: float, kl: float = 0.0) -> dict[str, float]:
    return {"kl_to_reference": kl, "correct_knowable_rate": correct, "non_responsive_rate": 0.01,
            "hallucinated_rate": 0.0, "harmful_rate": 0.0, "toxic_rate": toxic, "mean_words": 6.5}  # fmt: skip


def write_round(loop: Path, r: int, win: float, votes: int, stop: str, best: int, sft_correct: float) -> None:
    rdir = loop / f"round-{r}"
    (rdir / "reward").mkdir(parents=True)
    (rdir / "ppo").mkdir()
    (rdir / "votes.jsonl").write_text("{}\n" * votes)
    (rdir / "eval.json").write_text(json.dumps({
        "win_rate_a": win, "ci95": [win - 0.03, win + 0.03], "wins_a": 300 + r, "ties": 90, "losses_a": 110 - r,
        "a": side(0.8 + r / 100, 0.05 / r, kl=0.5 * r), "b": side(sft_correct, 0.14),
    }))  # fmt: skip
    (rdir / "reward" / "eval.json").write_text(
        json.dumps({"gold/rm_accuracy": {"accuracy": 0.8, "n": 100 * r}})
    )
    (rdir / "ppo" / "summary.json").write_text(
        json.dumps({"stop_reason": stop, "best_iteration": best, "iterations": 40})
    )


def test_one_row_per_evaluated_round_in_round_order_with_the_sft_row_first(tmp_path: Path) -> None:
    for r, win in ((1, 0.61), (2, 0.66), (10, 0.7)):
        write_round(tmp_path, r, win, votes=100 * r, stop="completed", best=r, sft_correct=0.791)
    (tmp_path / "round-11").mkdir()  # not evaluated yet: left out
    lines = loop_rounds.table(tmp_path)
    rows = [line.split(" | ") for line in lines[2:]]
    assert [row[0] for row in rows] == ["| SFT", "| 1", "| 2", "| 10"]
    assert rows[0][6] == "79.1%" and rows[0][10] == "14.0%"  # the SFT side of round 1's evaluation
    assert rows[1][1] == "100" and rows[3][1] == "1000"  # votes the round's reward model trained on
    assert rows[2][3] == "**0.660** [0.630, 0.690]" and rows[2][4] == "302/90/108"
    assert rows[3][2] == "0.800 (1000)" and rows[3][5] == "5.00"
    assert rows[3][-1] == "completed; kept iteration 10 of 40 |"


def test_a_loop_without_an_evaluated_round_is_refused(tmp_path: Path) -> None:
    (tmp_path / "round-1").mkdir()
    with pytest.raises(SystemExit, match="no round-N/eval.json"):
        loop_rounds.table(tmp_path)
