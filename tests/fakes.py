"""A text model for tests: rlhf.text_models' interface, with replies written by a function."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rlhf.engine.decoding import SamplingParams
from rlhf.text_models import Reply


class ScriptedModel:
    """Replies `answer(text, i)` to the i-th text of each call (every reply ends); remembers every text."""

    def __init__(self, name: str, answer: Callable[[str, int], str]) -> None:
        self.name, self.answer = name, answer
        self.prompts: list[str] = []

    def prompt_of(self, message: str) -> str:
        return message

    def reseed(self, seed: int) -> None:
        """Replies are scripted: there is nothing to seed."""

    def reply_all(self, messages: Sequence[str], params: SamplingParams) -> list[Reply]:
        return self.complete_all(messages, params)

    def complete_all(self, texts: Sequence[str], params: SamplingParams) -> list[Reply]:
        self.prompts += texts
        return [Reply(self.answer(t, i), True) for i, t in enumerate(texts)]
