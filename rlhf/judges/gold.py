"""The demo task's hidden utility as a judge: only meaningful on the demo world's prompts."""

from __future__ import annotations

from collections.abc import Sequence

from rlhf.judges.base import JudgeBase, Pair
from rlhf.labelers import gold


class GoldJudge(JudgeBase):
    """The higher gold utility wins, equal utilities tie; the principle is ignored."""

    name = "gold"

    def compare_all(self, pairs: Sequence[Pair], principle: str | None = None) -> list[float]:
        out = []
        for prompt, first, second in pairs:
            a = gold.utility(prompt, first.text, first.ended)
            b = gold.utility(prompt, second.text, second.ended)
            out.append(1.0 if a > b else 0.0 if a < b else 0.5)
        return out


def is_demo_prompt(prompt: str) -> bool:
    """A prompt of the demo world: a User/Assistant turn whose question the gold utility recognises."""
    from rlhf.data import demo_task

    if demo_task.USER not in prompt or not prompt.rstrip().endswith(demo_task.ASSISTANT):
        return False
    q = gold.parse_question(prompt)
    return q.family != "greeting" or q.text in demo_task.GREETINGS  # anything unknown parses as a greeting
