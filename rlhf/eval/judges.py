"""Judges that compare two answers to one prompt, and the demo task's gold scores.

A judge sees the two answers in the order the caller chose (the caller randomises it, so a judge with a
position bias, as people and AI judges have, cannot favour one policy). Only the demo task's gold judge exists
for now; people in the labeling app or an AI judge plug in by implementing `Judge`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from rlhf.eval.reward_metrics import wilson_interval
from rlhf.labelers import gold


@dataclass
class Answer:
    """One response as a judge sees it."""

    text: str
    ended: bool  # the model stopped with EOS


class Judge(Protocol):
    """Compares two answers to a prompt: 1.0 if the first is better, 0.0 if the second is, 0.5 for a tie."""

    name: str

    def compare(self, prompt: str, first: Answer, second: Answer) -> float: ...


class GoldJudge:
    """The demo task's hidden utility: the higher gold utility wins, equal utilities tie."""

    name = "gold"

    def compare(self, prompt: str, first: Answer, second: Answer) -> float:
        a = gold.utility(prompt, first.text, first.ended)
        b = gold.utility(prompt, second.text, second.ended)
        return 1.0 if a > b else 0.0 if a < b else 0.5


def make_judge(name: str) -> Judge:
    if name == "gold":
        return GoldJudge()
    raise ValueError(f"unknown judge {name!r}; expected 'gold'")


def gold_utilities(prompts: list[str], responses: list[str], ended: list[bool]) -> list[float]:
    """Gold utility of each answer: the `gold_fn` that the CLI hands to PPO's reward-hacking guard on the demo."""
    return [gold.utility(p, r, e) for p, r, e in zip(prompts, responses, ended, strict=True)]


# Per-criterion rates: (metric key, the judgement's flag, the families it is counted on; None = every answer).
RATES: list[tuple[str, str, tuple[str, ...] | None]] = [
    ("correct_rate", "correct", None),
    ("correct_knowable_rate", "correct", ("arithmetic", "fact", "yesno", "greeting", "thanks")),
    ("non_responsive_rate", "non_responsive", None),
    ("idk_on_unknowable_rate", "correct", ("unknown",)),
    ("hallucinated_rate", "hallucinated", ("unknown",)),
    ("refusal_rate", "correct", ("harm",)),
    ("harmful_rate", "harmful", ("harm",)),
    ("polite_on_provocation_rate", "correct", ("provocation",)),
    ("toxic_rate", "toxic", None),
    ("repetitive_rate", "repetitive", None),
]


def demo_metrics(prompts: list[str], responses: list[str], ended: list[bool]) -> dict[str, Any]:
    """What a user of the demo reads, per criterion: correct, non-responsive, hallucinated on unknowable
    questions, harmful compliance on harm requests, toxic, words and mean gold utility; each rate with its 95%
    Wilson interval under "ci95" (the mean words with a normal-approximation interval)."""
    judged = [gold.judge(p, r, e) for p, r, e in zip(prompts, responses, ended, strict=True)]
    out: dict[str, Any] = {}
    ci: dict[str, list[float]] = {}
    for key, flag, families in RATES:
        counted = [j for j in judged if families is None or j.family in families]
        k = sum(bool(getattr(j, flag)) for j in counted)
        out[key] = k / len(counted) if counted else float("nan")
        ci[key] = list(wilson_interval(k, len(counted)))
        out[key.removesuffix("_rate") + "_n"] = len(counted)
    words = np.asarray([j.n_words for j in judged], dtype=np.float64)
    out["mean_words"] = float(words.mean()) if len(words) else float("nan")
    half = 1.96 * float(words.std(ddof=1)) / math.sqrt(len(words)) if len(words) > 1 else float("nan")
    ci["mean_words"] = [out["mean_words"] - half, out["mean_words"] + half]
    out["gold_utility"] = sum(j.utility for j in judged) / max(1, len(judged))
    out["ci95"] = ci
    return out
