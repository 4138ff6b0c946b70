"""Reward-model evaluation metrics against hand-computed values; the report files; the gold comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhf.data.preferences import PairwiseVote, Ranking
from rlhf.eval.reward_eval import ended_lookup, gold_comparison
from rlhf.eval.reward_metrics import (
    ScoredPair,
    calibration,
    clustered_wilson_interval,
    margin_edges,
    read_scored_pairs,
    reward_report,
    wilson_interval,
    write_reward_eval,
)

PROMPT = "User: What is 2 plus 3?\nAssistant:"
GOOD, RUDE, WRONG = " 2 plus 3 is 5.", " 2 plus 3 is 5. Obviously, you fool.", " 2 plus 3 is 6."


def pair(delta: float, labeler: str | None = "ann", margin: float | None = None) -> ScoredPair:
    return ScoredPair(PROMPT, GOOD, RUDE, delta, 0.0, labeler, margin)


def test_wilson_interval_matches_hand_computation() -> None:
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_clustered_wilson_interval_widens_by_the_design_effect() -> None:
    """Ten attacks of ten answers each. Attacks that all succeed or all fail carry the information of ten
    answers, not a hundred: the design effect is 10 by hand (cluster-robust variance 10 * 25 / 100^2 over the
    binomial 0.25 / 100), so the interval is Wilson's at an effective n of 10. Attacks that each succeed 5 times
    in 10 vary less than independent answers would, and answers one to an attack are independent: Wilson's own
    interval."""
    alike = [(10, 10)] * 5 + [(0, 10)] * 5
    assert clustered_wilson_interval(alike) == pytest.approx(wilson_interval(5, 10))
    assert clustered_wilson_interval(alike)[0] < wilson_interval(50, 100)[0] - 0.1
    assert clustered_wilson_interval([(5, 10)] * 10) == pytest.approx(wilson_interval(50, 100))
    assert clustered_wilson_interval([(1, 1)] * 3 + [(0, 1)] * 7) == pytest.approx(wilson_interval(3, 10))
    # no success: nothing shows how alike an attack's answers are, so each attack counts once
    assert clustered_wilson_interval([(0, 10)] * 3) == pytest.approx(wilson_interval(0, 3))
    assert clustered_wilson_interval([(4, 4)] * 5) == pytest.approx(wilson_interval(5, 5))
    assert clustered_wilson_interval([(0, 1)] * 30) == pytest.approx(wilson_interval(0, 30))
    assert all(math.isnan(x) for x in clustered_wilson_interval([]))


def test_expected_calibration_error_by_hand() -> None:
    # confidences 0.5 (wrong: delta 0 is no win), 0.75 (right), 0.75 (wrong), 0.9 (right)
    deltas = [0.0, math.log(3), -math.log(3), math.log(9)]
    result = calibration(deltas, n_bins=10)
    # 1/4 * |0 - 0.5| + 2/4 * |0.5 - 0.75| + 1/4 * |1 - 0.9| = 0.125 + 0.125 + 0.025
    assert result["ece"] == pytest.approx(0.275, abs=1e-9)
    assert [b["n"] for b in result["bins"]] == [1, 2, 1]


def test_report_accuracy_by_labeler_confidence_and_margin() -> None:
    pairs = [pair(2.0, "ann", 1.0), pair(-1.0, "ann", 1.0), pair(0.5, "bob", 3.0), pair(3.0, None, 3.0)]
    report = reward_report(pairs, shift=1.0, scale=2.0)
    assert report["rm/accuracy"]["accuracy"] == 0.75 and report["rm/accuracy"]["n"] == 4
    assert report["rm/by_labeler"]["ann"]["accuracy"] == 0.5
    assert report["rm/by_labeler"]["bob"]["accuracy"] == 1.0
    assert report["rm/by_labeler"]["(anonymous)"]["n"] == 1
    # chosen rewards 2, -1, 0.5, 3 normalised: (r - 1) / 2 -> mean 0.0625
    assert report["rm/mean_reward_chosen"] == pytest.approx(
        ((2 - 1) + (-1 - 1) + (0.5 - 1) + (3 - 1)) / 2 / 4
    )
    by_margin = {b["low"]: b["accuracy"] for b in report["rm/by_margin"]}
    assert by_margin == {1.0: 0.5, 3.0: 1.0}
    assert sum(b["n"] for b in report["rm/by_confidence"]) == 4


def test_margin_edges_cover_every_margin() -> None:
    margins = [0.0, 0.0, 1.0, 2.0, 5.0, 5.0]
    edges = margin_edges(margins)
    assert edges[0] == 0.0 and edges[-1] > 5.0
    assert all(any(lo <= m < hi for lo, hi in zip(edges[:-1], edges[1:], strict=True)) for m in margins)


def test_write_reward_eval_files(tmp_path: Path) -> None:
    pairs = [pair(1.0), pair(-0.5, "bob")]
    report = write_reward_eval(tmp_path, pairs, train_pairs=10)
    assert json.loads((tmp_path / "eval.json").read_text())["train_pairs"] == 10
    assert report["rm/accuracy"]["accuracy"] == 0.5
    png = (tmp_path / "reward_eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert read_scored_pairs(tmp_path) == pairs


def test_gold_comparison_counts_rm_and_label_agreement() -> None:
    pairs = [
        ScoredPair(PROMPT, GOOD, RUDE, 1.0, 0.0),  # label right, RM right
        ScoredPair(PROMPT, RUDE, GOOD, 1.0, 0.0),  # label wrong, RM follows label: wrong
        ScoredPair(PROMPT, RUDE, GOOD, -1.0, 0.0),  # label wrong, RM right
        ScoredPair(PROMPT, WRONG, GOOD, -2.0, 0.0),  # label wrong, RM right
        ScoredPair(PROMPT, GOOD, " 2 plus 3 is 5!", 1.0, 0.0),  # gold-equal: skipped
    ]
    result = gold_comparison(pairs)
    assert result["gold/pairs"] == 4 and result["gold/skipped_equal"] == 1
    assert result["gold/rm_accuracy"]["accuracy"] == 0.75
    assert result["gold/label_agreement"]["accuracy"] == 0.25
    # GOOD without EOS loses 2 and falls below a wordier answer: the ended flag flips gold's order
    wordy = ScoredPair(PROMPT, GOOD, " Sure! 2 plus 3 is 5.", 1.0, 0.0)
    assert gold_comparison([wordy])["gold/rm_accuracy"]["accuracy"] == 1.0
    assert gold_comparison([wordy], {(PROMPT, GOOD): False})["gold/rm_accuracy"]["accuracy"] == 0.0


def test_gold_agreement_intervals_count_the_pairs_of_one_prompt_as_alike() -> None:
    """307 held-out pairs came from 24 prompts, yet the intervals treated them as independent. Pairs of one
    prompt that agree alike widen the interval (by the design effect); one pair a prompt gives Wilson's."""
    prompts = [f"User: What is {i} plus 1?\nAssistant:" for i in range(4)]
    alike = [ScoredPair(p, f" {i + 1}.", f" {i + 5}.", 1.0 if i < 3 else -1.0, 0.0)
             for i, p in enumerate(prompts) for _ in range(5)]  # fmt: skip
    result = gold_comparison(alike)["gold/rm_accuracy"]
    assert result["accuracy"] == 0.75 and result["n"] == 20
    plain = wilson_interval(15, 20)
    assert result["ci95"][1] - result["ci95"][0] > plain[1] - plain[0]
    one_each = [
        ScoredPair(p, f" {i + 1}.", f" {i + 5}.", 1.0 if i < 3 else -1.0, 0.0) for i, p in enumerate(prompts)
    ]
    assert gold_comparison(one_each)["gold/rm_accuracy"]["ci95"] == list(wilson_interval(3, 4))


def test_ended_lookup_reads_vote_and_ranking_meta() -> None:
    records = [
        PairwiseVote(PROMPT, GOOD, RUDE, "A", meta={"ended_a": True, "ended_b": False}),
        Ranking("q", ["x", "y"], [1, 2], meta={"ended": [False, True]}),
        PairwiseVote(PROMPT, WRONG, GOOD, "B"),
    ]
    assert ended_lookup(records) == {
        (PROMPT, GOOD): True,
        (PROMPT, RUDE): False,
        ("q", "x"): False,
        ("q", "y"): True,
    }


def test_an_eval_with_nothing_held_out_is_strict_json(tmp_path: Path) -> None:
    """Every labeler of the held-out prompts weighted 0: means of nothing are null, not NaN, which Python's
    JSON writer emits and strict readers (and `json.loads(..., parse_constant=...)`) refuse."""
    write_reward_eval(tmp_path, [])
    text = (tmp_path / "eval.json").read_text()
    assert "NaN" not in text
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in eval.json"))
    assert report["rm/mean_reward_chosen"] is None
