"""The reward-hacking guard's memory, which PPO keeps in its checkpoints: it stops a run whose proxy reward rises
while the gold score falls (`patience` evaluations in a row) or whose KL to the reference leaves the budget, and
tells which evaluation was the best so far."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Guard:
    """The reward-hacking guard's memory (saved in checkpoints): the last evaluation, the streak, the best."""

    last_proxy: float | None = None
    last_gold: float | None = None
    streak: int = 0
    best_score: float = -math.inf
    best_iteration: int = -1
    stop_reason: str | None = None

    def observe(self, iteration: int, m: dict[str, float], patience: int, kl_budget: float | None) -> bool:
        """Record one evaluation; returns True when it is the best so far (by gold if known, else proxy)."""
        proxy, gold = m["ppo/guard_proxy"], m.get("ppo/guard_gold")
        if gold is not None and self.last_proxy is not None and self.last_gold is not None:
            hacking = proxy > self.last_proxy and gold < self.last_gold
            self.streak = self.streak + 1 if hacking else 0
        self.last_proxy, self.last_gold = proxy, gold
        if self.streak >= patience:
            self.stop_reason = (
                f"reward hacking: proxy rose while gold fell in {self.streak} evaluations in a row"
            )
        if kl_budget is not None and m["ppo/guard_kl"] > kl_budget:
            self.stop_reason = f"KL budget: {m['ppo/guard_kl']:.3g} nats > kl_budget {kl_budget:.3g}"
            return False  # a policy outside the budget is never kept as the best
        score = proxy if gold is None else gold
        if score > self.best_score:
            self.best_score, self.best_iteration = score, iteration
            return True
        return False
