"""rlhf/feedback/leaderboard.py: the Bradley-Terry fit recovers known strengths, counts ties as half a win,
keeps unbeaten versions finite, and its bootstrap intervals hold the estimate."""

from __future__ import annotations

import math
import random

from rlhf.feedback.leaderboard import Judgement, fit_bradley_terry, format_leaderboard, leaderboard


def simulated(strengths: dict[str, float], n: int, seed: int = 0) -> list[Judgement]:
    rng = random.Random(seed)
    names = list(strengths)
    out = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        p = 1 / (1 + math.exp(strengths[b] - strengths[a]))
        out.append(Judgement(a, b, 1.0 if rng.random() < p else 0.0, "votes"))
    return out


def test_fit_recovers_known_log_strengths() -> None:
    truth = {"sft": 0.0, "r1": 1.0, "r2": 2.0}
    scores = fit_bradley_terry(list(truth), simulated(truth, 6000))
    assert scores[0] == 0.0
    assert abs(scores[1] - 1.0) < 0.15 and abs(scores[2] - 2.0) < 0.2


def test_ties_count_half_and_an_even_record_scores_zero() -> None:
    even = [Judgement("r1", "sft", 0.5, "eval")] * 10 + [
        Judgement("r1", "sft", 1.0, "eval"),
        Judgement("r1", "sft", 0.0, "eval"),
    ]
    assert abs(fit_bradley_terry(["sft", "r1"], even)[1]) < 1e-6


def test_an_unbeaten_version_gets_a_finite_score() -> None:
    wins = [Judgement("r1", "sft", 1.0, "votes")] * 5
    score = fit_bradley_terry(["sft", "r1"], wins)[1]
    assert math.isfinite(score) and score > 1.0


def test_leaderboard_is_sorted_with_intervals_around_the_estimate() -> None:
    truth = {"sft": 0.0, "r1": 0.5, "r2": 1.5}
    rows = leaderboard(list(truth), simulated(truth, 800), n_boot=100)
    assert [r.policy for r in rows] == ["r2", "r1", "sft"]
    for r in rows:
        assert r.ci95[0] <= r.score <= r.ci95[1]
    assert rows[-1].ci95 == (0.0, 0.0)  # the anchor
    assert sum(r.n for r in rows) == 2 * 800
    assert format_leaderboard(rows).splitlines()[1].startswith("r2")
