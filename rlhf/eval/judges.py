"""Judges that compare two answers to one prompt, and the demo task's gold scores.

A judge sees the two answers in the order the caller chose (the caller randomises it, so a judge with a
position bias, as people and AI judges have, cannot favour one policy). Only the demo task's gold judge exists
for now; people in the labeling app or an AI judge plug in by implementing `Judge`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


def demo_metrics(prompts: list[str], responses: list[str], ended: list[bool]) -> dict[str, float]:
    """What a user of the demo reads: correctness, rudeness, repetition, words and mean gold utility."""
    judged = [gold.judge(p, r, e) for p, r, e in zip(prompts, responses, ended, strict=True)]
    n = max(1, len(judged))
    return {
        "correct_rate": sum(j.correct for j in judged) / n,
        "rude_rate": sum(j.rude for j in judged) / n,
        "repetitive_rate": sum(j.repetitive for j in judged) / n,
        "mean_words": sum(j.n_words for j in judged) / n,
        "gold_utility": sum(j.utility for j in judged) / n,
    }
