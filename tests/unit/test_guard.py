"""The reward-hacking guard's decisions (rlhf.train.guard.Guard) on hand-made evaluation sequences."""

from __future__ import annotations

import math

from rlhf.train.guard import Guard


def evaluation(kl: float, proxy: float, gold: float | None = None) -> dict[str, float]:
    m = {"ppo/guard_kl": kl, "ppo/guard_proxy": proxy}
    return m if gold is None else m | {"ppo/guard_gold": gold}


def test_stops_after_patience_evaluations_of_proxy_up_gold_down() -> None:
    guard = Guard()
    history = [(0.0, 0.0, 1.0), (1.0, 0.5, 1.5), (2.0, 0.9, 1.2), (3.0, 1.4, 1.0), (4.0, 1.8, 0.7)]
    best = [guard.observe(i, evaluation(*h), patience=3, kl_budget=None) for i, h in enumerate(history)]
    assert best == [True, True, False, False, False]
    assert guard.best_iteration == 1 and guard.best_score == 1.5
    assert guard.streak == 3
    assert guard.stop_reason is not None and guard.stop_reason.startswith("reward hacking")


def test_a_gold_gain_resets_the_streak() -> None:
    guard = Guard()
    for i, h in enumerate([(0, 0.0, 1.0), (1, 0.5, 0.8), (2, 0.9, 0.9), (3, 1.4, 0.7)]):
        guard.observe(i, evaluation(*h), patience=2, kl_budget=None)
    assert guard.streak == 1 and guard.stop_reason is None


def test_without_gold_the_best_is_by_proxy_and_only_kl_can_stop() -> None:
    guard = Guard()
    for i, (kl, proxy) in enumerate([(0.0, 0.1), (2.0, 0.5), (5.0, 0.4), (9.0, 0.3)]):
        guard.observe(i, evaluation(kl, proxy), patience=1, kl_budget=10.0)
    assert guard.best_iteration == 1 and math.isclose(guard.best_score, 0.5)
    assert guard.stop_reason is None
    assert not guard.observe(4, evaluation(12.5, 0.2), patience=1, kl_budget=10.0)
    assert guard.stop_reason == "KL budget: 12.5 nats > kl_budget 10"


def test_a_policy_over_the_kl_budget_is_never_the_best() -> None:
    guard = Guard()
    assert guard.observe(0, evaluation(0.0, 0.0, 0.1), patience=3, kl_budget=2.0)
    assert guard.observe(1, evaluation(1.5, 0.4, 0.3), patience=3, kl_budget=2.0)
    assert not guard.observe(2, evaluation(2.5, 0.9, 0.8), patience=3, kl_budget=2.0)
    assert guard.best_iteration == 1 and guard.stop_reason is not None
