"""The simulated labeler panel: people who judge answers by the demo task's gold utility, with human noise.

Each member perceives an answer's utility as gold utility + w * n_words (w: the member's own liking for longer,
or shorter, answers) and chooses between two answers by Bradley-Terry: P(A) = sigmoid((u_A - u_B) / temperature);
then, with probability flip_prob, reports the opposite (a slip of the hand, a misread answer). With the
defaults (temperature 1, flip 0.1, bias spread 0.05) the panel agrees with the gold ordering on 73% (72.5-74%
over seeds) of the pairs of the demo SFT policy's candidates (K=4 answers to 750 prompts), inside the
65-80% band that human labelers show (Ouyang et al. 2022 report 72.6% inter-annotator agreement among
training labelers, 77.3% for held-out ones; Stiennon et al. 2020, 72-77%).

Ties: a member says "tie" only for identical texts. Two different answers of equal utility get a fair coin,
as a person forced to choose would; gold itself has no ordering for them, so agreement counts skip them.

Every judgement is a pure function of (seed, member, prompt, answers): the same question gets the same
answer whatever order the questions come in, so labeling is reproducible and resumable.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import PanelConfig
from rlhf.data.jsonl import field, iter_jsonl
from rlhf.data.preferences import Choice, PairwiseVote
from rlhf.errors import DataError
from rlhf.labelers.gold import judge


@dataclass(frozen=True)
class Member:
    """One simulated labeler."""

    name: str
    temperature: float  # Bradley-Terry noise
    flip_prob: float  # chance of reporting the opposite choice
    length_bias: float  # w: perceived utility = gold utility + w * n_words


@dataclass(frozen=True)
class Agreement:
    """How often judgements agree with the gold ordering, over pairs that gold orders strictly."""

    agree: int
    n: int

    @property
    def rate(self) -> float:
        return self.agree / self.n if self.n else float("nan")


def _rng(*parts: object) -> random.Random:
    """A generator seeded by a stable hash of `parts` (Python's hash() changes between runs)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class Panel:
    """A seeded group of members; `compare` and `rank` give one member's judgement."""

    def __init__(self, members: Sequence[Member], seed: int = 0) -> None:
        if not members:
            raise ValueError("a panel needs at least one member")
        self.members = list(members)
        self.seed = seed
        self._by_name = {m.name: m for m in self.members}

    @classmethod
    def from_config(cls, cfg: PanelConfig) -> Panel:
        """`cfg.size` members named sim-0, sim-1, ...; length biases drawn from N(0, bias_spread) by the seed."""
        rng = random.Random(cfg.seed)
        biases = [rng.gauss(0.0, cfg.bias_spread) if cfg.bias_spread else 0.0 for _ in range(cfg.size)]
        members = [Member(f"sim-{i}", cfg.temperature, cfg.flip_prob, w) for i, w in enumerate(biases)]
        return cls(members, cfg.seed)

    def member(self, who: Member | str | int | None, key: str) -> Member:
        """A member by object, name or index; None = the member assigned to `key` (e.g. a prompt id)."""
        if isinstance(who, Member):
            return who
        if isinstance(who, str):
            return self._by_name[who]
        if isinstance(who, int):
            return self.members[who]
        return self.members[_rng(self.seed, "assign", key).randrange(len(self.members))]

    def perceived_utility(self, member: Member, prompt: str, response: str, ended: bool | None) -> float:
        j = judge(prompt, response, ended)
        return j.utility + member.length_bias * j.n_words

    def compare(
        self,
        prompt: str,
        a: str,
        b: str,
        ended_a: bool | None = None,
        ended_b: bool | None = None,
        member: Member | str | int | None = None,
    ) -> Choice:
        """One member's choice between answers a and b: "A", "B", or "tie" (identical texts only).

        `ended_*`: did the policy stop with EOS (None: read off the text). `member`: name, index or None
        for the member the prompt is assigned to.
        """
        m = self.member(member, prompt)
        if a == b:
            return "tie"
        gap = self.perceived_utility(m, prompt, a, ended_a) - self.perceived_utility(m, prompt, b, ended_b)
        rng = _rng(self.seed, m.name, prompt, a, b)
        choice: Choice = "A" if rng.random() < 1.0 / (1.0 + math.exp(-gap / m.temperature)) else "B"
        if rng.random() < m.flip_prob:
            choice = "B" if choice == "A" else "A"
        return choice

    def compare_all(
        self, prompt: str, a: str, b: str, ended_a: bool | None = None, ended_b: bool | None = None
    ) -> dict[str, Choice]:
        """Every member's choice, by name."""
        return {m.name: self.compare(prompt, a, b, ended_a, ended_b, m) for m in self.members}

    def rank(
        self,
        prompt: str,
        completions: Sequence[str],
        ended: Sequence[bool | None] | None = None,
        member: Member | str | int | None = None,
    ) -> list[int]:
        """One member's ranking of K answers, ranks[i] of completions[i], 1 = best; identical texts tie.

        Plackett-Luce by Gumbel noise (perceived utility / T + Gumbel, sorted): each pair's marginal order
        is the same Bradley-Terry probability that `compare` uses. With flip_prob, one random adjacent
        pair of the order is swapped.
        """
        m = self.member(member, prompt)
        ended = list(ended) if ended is not None else [None] * len(completions)
        distinct = list(dict.fromkeys(completions))
        first = {text: completions.index(text) for text in distinct}
        rng = _rng(self.seed, m.name, "rank", prompt, *completions)
        noisy = {
            text: self.perceived_utility(m, prompt, text, ended[first[text]]) / m.temperature
            - math.log(-math.log(1.0 - rng.random()))  # + Gumbel(0, 1)
            for text in distinct
        }
        order = sorted(distinct, key=lambda text: -noisy[text])
        if len(order) > 1 and rng.random() < m.flip_prob:
            i = rng.randrange(len(order) - 1)
            order[i], order[i + 1] = order[i + 1], order[i]
        rank_of = {text: r for r, text in enumerate(order, start=1)}
        return [rank_of[text] for text in completions]


# --- offline labeling: the candidates file -> votes, without the web app -----------------------------------


def read_candidates(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a candidates JSONL (`rlhf generate`'s output), checked, with file:line errors."""
    rows = []
    for lineno, row in iter_jsonl(path):
        field(path, lineno, row, "prompt", str)
        completions = field(path, lineno, row, "completions", list)
        if not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in completions):
            raise DataError(f"{path}:{lineno}: each completion should be an object with a 'text' string")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no candidates (empty file)")
    return rows


def label_offline(
    rows: Iterable[dict[str, Any]], panel: Panel, pairs_per_prompt: int = 0
) -> list[PairwiseVote]:
    """Votes on candidate rows as labelers in the app would give them: one member per prompt (like one
    comparison task) judges all C(K,2) pairs of its answers (the pairs the row names, where it names them, as
    the app's importer takes them), or `pairs_per_prompt` of them drawn by the seed.

    Each vote's meta keeps the prompt id, whether each answer ended with EOS and the policies that wrote them,
    so that evaluation can judge the same answers the panel saw.
    """
    votes = []
    for n, row in enumerate(rows):
        prompt, completions = row["prompt"], row["completions"]
        prompt_id = str(row.get("prompt_id", n))
        named = row.get("pairs")
        pairs = (
            [(i, j) for i, j in named] if named else list(itertools.combinations(range(len(completions)), 2))
        )
        if 0 < pairs_per_prompt < len(pairs):
            pairs = sorted(_rng(panel.seed, "pairs", prompt_id).sample(pairs, pairs_per_prompt))
        member = panel.member(None, prompt_id)
        ended = [_ended(c) for c in completions]
        for i, j in pairs:
            a, b = completions[i]["text"], completions[j]["text"]
            choice = panel.compare(prompt, a, b, ended[i], ended[j], member)
            meta = {"prompt_id": prompt_id, "ended_a": ended[i], "ended_b": ended[j],
                    "policy_a": completions[i].get("policy"), "policy_b": completions[j].get("policy")}  # fmt: skip
            votes.append(
                PairwiseVote(
                    prompt, a, b, choice, member.name, meta={k: v for k, v in meta.items() if v is not None}
                )
            )
    return votes


def _ended(completion: dict[str, Any]) -> bool | None:
    reason = completion.get("finish_reason")
    return None if reason is None else reason == "stop"


def gold_order(prompt: str, a: str, b: str, ended_a: bool | None, ended_b: bool | None) -> int:
    """+1 if gold prefers a, -1 if b, 0 if their gold utilities are equal."""
    gap = judge(prompt, a, ended_a).utility - judge(prompt, b, ended_b).utility
    return (gap > 0) - (gap < 0)


def agreement_with_gold(votes: Iterable[PairwiseVote]) -> Agreement:
    """How often the votes' choices agree with the gold ordering (ties, both_bad and gold-equal pairs skipped);
    `ended` comes from each vote's meta (ended_a/ended_b) where present."""
    agree = n = 0
    for v in votes:
        if v.choice not in ("A", "B"):
            continue
        order = gold_order(
            v.prompt, v.completion_a, v.completion_b, v.meta.get("ended_a"), v.meta.get("ended_b")
        )
        if order == 0:
            continue
        n += 1
        agree += (order > 0) == (v.choice == "A")
    return Agreement(agree, n)
