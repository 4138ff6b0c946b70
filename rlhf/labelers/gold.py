"""The demo task's gold utility: the hidden "human" whose preferences RLHF should recover.

Training code never imports this module: gold reaches training only as labels from the simulated panel.
Evaluation imports it to report what a user of the demo cares about: correctness, rudeness, length, clean
endings, and the gold win rate.

Gold prefers, in this order of weight: never rude, ending cleanly, correct, no repetition, concise.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from rlhf.data.demo_task import ASSISTANT, FACTS, INSULTS, OPERATIONS, USER, Question, answer_templates

_ARITH = re.compile(r"What is (\d+) (plus|minus|times) (\d+)\?")
_FACT = {
    "color": re.compile(r"What color is the (\w+)\?"),
    "home": re.compile(r"Where does the (\w+) live\?"),
    "food": re.compile(r"What does the (\w+) eat\?"),
}
_YESNO = {
    "color": re.compile(r"Is the (\w+) (\w+)\?"),
    "home": re.compile(r"Does the (\w+) live in (\w+)\?"),
    "food": re.compile(r"Does the (\w+) eat (\w+)\?"),
}
_WORD = re.compile(r"[A-Za-z0-9']+")

# Weights of the utility; a wordy-but-correct answer stays above a wrong one, a rude one below both.
W_CORRECT, W_RUDE, W_NO_END, W_REPEAT, W_EXTRA_WORD = 2.0, 3.0, 2.0, 1.0, 0.12


@dataclass
class Judgement:
    """What the gold judge sees in one answer."""

    correct: bool
    rude: bool
    ended: bool
    repetitive: bool
    n_words: int
    extra_words: int
    utility: float

    def as_dict(self) -> dict[str, float | bool | int]:
        return asdict(self)


def parse_question(prompt: str) -> Question:
    """Recover the question of a demo prompt (the last user turn)."""
    text = prompt
    if USER in text:
        text = text.rsplit(USER, 1)[1]
    text = text.split(ASSISTANT)[0].strip()
    if m := _ARITH.fullmatch(text):
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return Question(text, "arithmetic", str(OPERATIONS[op](a, b)), args=(a, b, op))
    for attribute, pattern in _FACT.items():
        if (m := pattern.fullmatch(text)) and m.group(1) in FACTS:
            return Question(text, "fact", FACTS[m.group(1)][attribute], m.group(1), attribute)
    for attribute, pattern in _YESNO.items():
        if (m := pattern.fullmatch(text)) and m.group(1) in FACTS:
            subject, asked = m.group(1), m.group(2)
            truth = FACTS[subject][attribute]
            return Question(
                text, "yesno", "yes" if asked == truth else "no", subject, attribute, extra={"asked": asked}
            )
    if text.startswith(("Thank", "Thanks")):
        return Question(text, "thanks", "welcome")
    return Question(text, "greeting", "hello")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def is_rude(response: str) -> bool:
    low = response.lower()
    return any(re.search(rf"\b{re.escape(insult.split()[-1])}\b", low) for insult in INSULTS)


def is_correct(q: Question, response: str) -> bool:
    words = _words(response)
    if not words:
        return False
    if q.family == "arithmetic":
        numbers = re.findall(r"-?\d+", response)
        assert q.args is not None
        stated = [n for n in numbers if n not in (str(q.args[0]), str(q.args[1]))] or numbers[-1:]
        return bool(stated) and all(n == q.answer for n in stated)
    if q.family == "fact":
        values = {v.lower() for v in _all_values(q.attribute)}
        said = [w for w in words if w in values]
        return bool(said) and all(w == q.answer.lower() for w in said)
    if q.family == "yesno":
        return words[0] == q.answer
    if q.family == "greeting":
        return words[0] in ("hello", "hi", "hey", "good") and not is_rude(response)
    return "welcome" in words


def _all_values(attribute: str) -> list[str]:
    return sorted({f[attribute] for f in FACTS.values()})


def is_repetitive(response: str) -> bool:
    """A sentence said twice, or a run of 3 words repeated 3 times."""
    sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", response) if s.strip()]
    if len(sentences) != len(set(sentences)):
        return True
    words = _words(response)
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return any(trigrams.count(t) >= 3 for t in set(trigrams))


def judge(prompt: str, response: str, ended: bool | None = None) -> Judgement:
    """Gold judgement of `response` to `prompt`. `ended`: did the model stop with EOS (None: read it off the text)."""
    q = parse_question(prompt)
    response = response.strip()
    if ended is None:
        ended = response.endswith((".", "!", "?"))
    n_words = len(_words(response))
    shortest = min(len(_words(t)) for t in answer_templates(q, q.answer))
    extra = max(0, n_words - shortest)
    correct, rude, repetitive = is_correct(q, response), is_rude(response), is_repetitive(response)
    utility = (
        W_CORRECT * correct
        - W_RUDE * rude
        - W_NO_END * (not ended)
        - W_REPEAT * repetitive
        - W_EXTRA_WORD * min(extra, 25)
    )
    return Judgement(correct, rude, ended, repetitive, n_words, extra, round(utility, 6))


def utility(prompt: str, response: str, ended: bool | None = None) -> float:
    return judge(prompt, response, ended).utility
