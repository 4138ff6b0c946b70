"""Preference data: every format the labelers' judgements come in, and the groups the reward model trains on.

The reward model trains on PreferenceGroups: all comparisons from one judgement of one prompt form one batch
element, so each completion is scored once and the C(K,2) pairs of a ranking don't overfit as separate examples
(InstructGPT, Ouyang et al. 2022, sec. 3.5, https://arxiv.org/abs/2203.02155). The record types and their
JSONL reading and writing live in preference_io and are re-exported here: import everything from this module.
"""

from __future__ import annotations

import collections
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, TypeVar

from rlhf.data.preference_io import (
    CHOICES,
    HH_ASSISTANT,
    Choice,
    ConversationalPair,
    Feedback,
    Format,
    Message,
    PairwiseVote,
    PreferencePair,
    Ranking,
    Rating,
    Record,
    read_preferences,
    read_records,
    record_from_json,
    record_to_json,
    split_hh,
    write_preferences,
)
from rlhf.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "CHOICES",
    "HH_ASSISTANT",
    "PROMPT_MESSAGES",
    "Choice",
    "ConversationalPair",
    "Feedback",
    "Format",
    "Message",
    "PairwiseVote",
    "PreferenceGroup",
    "read_preference_groups",
    "split_by_prompt",
    "PreferencePair",
    "Ranking",
    "Rating",
    "Record",
    "Render",
    "chat_template",
    "read_records",
    "group_to_pairs",
    "group_to_ranking",
    "pair_to_group",
    "pair_to_hh",
    "pair_to_vote",
    "pairs_to_ranking",
    "ranking_to_group",
    "ratings_to_groups",
    "read_preferences",
    "record_from_json",
    "record_to_json",
    "render_conversational",
    "render_feedback",
    "render_judgement",
    "split_hh",
    "to_groups",
    "vote_to_pair",
    "vote_to_ranking",
    "write_preferences",
]

Render = Callable[[list[dict[str, str]], bool], str]
"""A chat template, render(messages, add_generation_prompt) -> text; with a Hugging Face tokenizer:
lambda messages, gen: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)."""

PROMPT_MESSAGES = "prompt_messages"
"""The `meta` key of a vote, ranking or rating whose prompt was a conversation (as the labeling app exports the
chats the model server and the gateway recorded, and conversational imports): its messages, which `to_groups`
renders through the chat template in place of the prompt's plain text."""


def as_content(answer: str) -> str:
    """An answer sampled after a chat template's generation prompt, as the assistant message's content: without
    the whitespace it opened with, which the template puts between the turn's header and its content itself
    (the built-in template's "Assistant:" is followed by " Hello!", and its turn renders "Assistant: Hello!")."""
    return answer.lstrip()


@dataclass
class PreferenceGroup:
    """One reward-model batch element: every pair from one judgement of one prompt (InstructGPT)."""

    prompt: str
    completions: list[str]  # the distinct completions
    pairs: list[tuple[int, int]]  # (chosen index, rejected index) into completions
    margins: list[float | None]  # one per pair
    labeler: str | None = None


def pair_to_hh(p: PreferencePair) -> dict[str, str]:
    """The HH row that reads back as `p` (margin and labeler have no place in HH and are dropped)."""
    if not p.prompt.endswith(HH_ASSISTANT) or HH_ASSISTANT in p.chosen or HH_ASSISTANT in p.rejected:
        raise ValueError(f"an HH pair needs a prompt ending in {HH_ASSISTANT!r} and replies without one")
    return {"chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected}


def render_conversational(p: ConversationalPair, render: Render) -> PreferencePair:
    """Plain-text pair for the reward model, through a chat template (as TRL's maybe_apply_chat_template).

    prompt = render(prompt, True); chosen = render(prompt + chosen, False) minus that prompt text at its front.
    ValueError if the template renders the prompt differently once a reply follows (no clean cut exists).
    """
    history = [asdict(m) for m in p.prompt]
    prompt = render(history, True)
    chosen, rejected = (
        _reply_text(render, history, prompt, [asdict(m) for m in r]) for r in (p.chosen, p.rejected)
    )
    return PreferencePair(prompt, chosen, rejected, p.margin, p.labeler)


def render_feedback(f: Feedback, render: Render | None) -> Feedback:
    """A feedback record whose prompt is messages, as plain text through a chat template (as
    `render_conversational` renders a pair); one in text as it is. ValueError where messages meet no template."""
    if isinstance(f.prompt, str) and isinstance(f.completion, str):
        return f
    if render is None:
        raise ValueError("conversational feedback records need a chat template")
    history = (
        [asdict(m) for m in f.prompt]
        if isinstance(f.prompt, list)
        else [{"role": "user", "content": f.prompt}]
    )
    prompt = render(history, True)
    reply = [asdict(m) for m in f.completion] if isinstance(f.completion, list) else [
        {"role": "assistant", "content": f.completion}]  # fmt: skip
    return replace(f, prompt=prompt, completion=_reply_text(render, history, prompt, reply))


def _reply_text(
    render: Render, history: list[dict[str, str]], prompt: str, reply: list[dict[str, str]]
) -> str:
    """The text the chat template gives `reply` after `history`, whose own rendering is `prompt`: the rendering
    of both, that prompt text cut off its front (ValueError where it is not at the front)."""
    text = render(history + reply, False)
    if not text.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently when a reply follows it")
    return text[len(prompt) :]


def render_judgement(
    r: PairwiseVote | Ranking | Rating, render: Render | None
) -> PairwiseVote | Ranking | Rating:
    """A vote, ranking or rating whose prompt was a conversation (`meta[PROMPT_MESSAGES]`), its prompt and
    answers rendered through the chat template as a conversational pair's are (`render_conversational`);
    anything else, or without a template, as it is."""
    messages = r.meta.get(PROMPT_MESSAGES)
    if render is None or not isinstance(messages, list) or not messages:
        return r
    history = [asdict(Message(**m)) for m in messages]  # a malformed message: a TypeError
    prompt = render(history, True)

    def reply(text: str) -> str:
        return _reply_text(render, history, prompt, [{"role": "assistant", "content": as_content(text)}])

    if isinstance(r, PairwiseVote):
        return replace(
            r, prompt=prompt, completion_a=reply(r.completion_a), completion_b=reply(r.completion_b)
        )
    if isinstance(r, Ranking):
        return replace(r, prompt=prompt, completions=[reply(c) for c in r.completions])
    return replace(r, prompt=prompt, completion=reply(r.completion))


def pair_to_vote(p: PreferencePair) -> PairwiseVote:
    """A vote for completion A = chosen (lossless)."""
    return PairwiseVote(p.prompt, p.chosen, p.rejected, "A", p.labeler, p.margin)


def vote_to_pair(v: PairwiseVote) -> PreferencePair | None:
    """The preferred completion as chosen; None for "tie" and "both_bad", which make no pair. meta is dropped."""
    if v.choice == "A":
        return PreferencePair(v.prompt, v.completion_a, v.completion_b, v.margin, v.labeler)
    if v.choice == "B":
        return PreferencePair(v.prompt, v.completion_b, v.completion_a, v.margin, v.labeler)
    return None


def vote_to_ranking(v: PairwiseVote) -> Ranking | None:
    """A 2-way ranking ("tie" -> equal ranks); None for "both_bad", which a ranking can't say. margin is dropped."""
    ranks = {"A": [1, 2], "B": [2, 1], "tie": [1, 1]}.get(v.choice)
    if ranks is None:
        return None
    return Ranking(v.prompt, [v.completion_a, v.completion_b], ranks, v.labeler, dict(v.meta))


def pair_to_group(p: PreferencePair) -> PreferenceGroup | None:
    """A group of one pair; None if chosen and rejected are the same text (the pair would teach nothing)."""
    if p.chosen == p.rejected:
        return None
    return PreferenceGroup(p.prompt, [p.chosen, p.rejected], [(0, 1)], [p.margin], p.labeler)


def ranking_to_group(r: Ranking) -> PreferenceGroup | None:
    """All C(K,2) pairs whose ranks differ, in one group; ties make no pair; None if no pair is left.

    Pairs come in (i, j) order for i < j over r.completions; identical completion texts count as one
    completion. Rankings carry no margin, so margins are None.
    """
    return _group_by_score(
        r.prompt, r.completions, [-rank for rank in r.ranking], r.labeler, with_margin=False
    )


def group_to_pairs(g: PreferenceGroup) -> list[PreferencePair]:
    """The group's pairs as TRL pairs, in order, margins kept."""
    return [
        PreferencePair(g.prompt, g.completions[c], g.completions[r], m, g.labeler)
        for (c, r), m in zip(g.pairs, g.margins, strict=True)
    ]


def group_to_ranking(g: PreferenceGroup) -> Ranking | None:
    """The ranking whose pairs are exactly the group's, with dense ranks 1, 2, 3...; margins are dropped.

    None if no ranking has exactly these pairs: a cycle (A>B>A), or a pair that ranks would imply but the
    group lacks (A>B and B>C without A>C), or a completion that appears in no pair.
    """
    ranks = [1] * len(g.completions)
    # rank = 1 + the longest chain of better completions; K passes settle any acyclic group, a cycle never settles
    for _ in range(len(ranks)):
        changed = False
        for better, worse in g.pairs:
            if ranks[worse] <= ranks[better]:
                ranks[worse] = ranks[better] + 1
                changed = True
        if not changed:
            break
    else:
        return None
    ranking = Ranking(g.prompt, list(g.completions), ranks, g.labeler)
    implied = ranking_to_group(ranking)
    return ranking if implied is not None and set(implied.pairs) == set(g.pairs) else None


def pairs_to_ranking(pairs: Sequence[PreferencePair]) -> Ranking | None:
    """The ranking of one prompt's pairs by one labeler (see group_to_ranking), completions in first-seen order."""
    if len({(p.prompt, p.labeler) for p in pairs}) != 1:
        raise ValueError("pairs_to_ranking needs at least one pair, all of one prompt and one labeler")
    completions = list(dict.fromkeys(text for p in pairs for text in (p.chosen, p.rejected)))
    index = {text: i for i, text in enumerate(completions)}
    pair_indices = [(index[p.chosen], index[p.rejected]) for p in pairs]
    group = PreferenceGroup(
        pairs[0].prompt, completions, pair_indices, [p.margin for p in pairs], pairs[0].labeler
    )
    return group_to_ranking(group)


def ratings_to_groups(ratings: Iterable[Rating], margin: bool = False) -> list[PreferenceGroup]:
    """One group per (prompt, labeler): pairs between that labeler's completions whose ratings differ.

    Different labelers' ratings are never compared, as each has their own scale. A completion rated more than
    once by the same labeler (or anonymously) counts with its mean rating. Margins are None by default,
    because rating scales are neither shared nor calibrated; margin=True sets them to the rating difference
    (the margin loss of Llama 2, Touvron et al. 2023, sec. 3.2.2). Groups come in the order of their first rating.
    """
    rated: dict[tuple[str, str | None], dict[str, list[float]]] = {}
    for r in ratings:
        rated.setdefault((r.prompt, r.labeler), {}).setdefault(r.completion, []).append(r.rating)
    groups = []
    for (prompt, labeler), by_completion in rated.items():
        means = [sum(v) / len(v) for v in by_completion.values()]
        group = _group_by_score(prompt, list(by_completion), means, labeler, with_margin=margin)
        if group is not None:
            groups.append(group)
    return groups


def to_groups(
    records: Iterable[Record], render: Render | None = None, rating_margins: bool = False
) -> list[PreferenceGroup]:
    """What the reward model trains on: one group per judgement, in input order.

    pair -> a group of one pair; vote -> one pair (tie and both_bad: nothing); ranking -> one group of its
    C(K,2) pairs; ratings -> one group per (prompt, labeler), placed where its first rating was (see
    ratings_to_groups). Conversational pairs are rendered to text with `render`, required if any are present;
    so are the votes, rankings and ratings on a conversation (`render_judgement`), where it is given.
    Judgements that compare nothing are skipped, and so are votes on gold items (`meta.is_gold`, as the
    labeling app exports them): those check the labelers, and every labeler answers each of them.
    """
    slots: list[PreferenceGroup | None] = []
    rated: dict[tuple[str, str | None], tuple[int, list[Rating]]] = {}
    for i, r in enumerate(records, 1):
        if getattr(r, "meta", None) and r.meta.get("is_gold") is True:  # type: ignore[union-attr]
            continue
        try:
            slots.extend(_rendered_group(r, render, rated, len(slots)))
        except ValueError as e:
            raise ValueError(f"record {i}: {e}") from None
    for slot, group_ratings in rated.values():
        slots[slot] = next(iter(ratings_to_groups(group_ratings, margin=rating_margins)), None)
    return [g for g in slots if g is not None]


def _rendered_group(
    r: Record,
    render: Render | None,
    rated: dict[tuple[str, str | None], tuple[int, list[Rating]]],
    n_slots: int,
) -> list[PreferenceGroup | None]:
    """`to_groups`'s slots for one record: its group (None where it compares nothing), or for a rating, a slot
    the first time its (prompt, labeler) is seen, filled once all of their ratings are in (`rated`)."""
    if isinstance(r, PairwiseVote | Ranking | Rating):
        r = render_judgement(r, render)
    if isinstance(r, Rating):
        slot, group_ratings = rated.setdefault((r.prompt, r.labeler), (n_slots, []))
        group_ratings.append(r)
        return [None] if slot == n_slots else []
    if isinstance(r, ConversationalPair):
        if render is None:
            raise ValueError("conversational preference pairs need a chat template: pass render=")
        return [pair_to_group(render_conversational(r, render))]
    if isinstance(r, PreferencePair):
        return [pair_to_group(r)]
    if isinstance(r, PairwiseVote):
        pair = vote_to_pair(r)
        return [pair_to_group(pair) if pair is not None else None]
    if isinstance(r, Ranking):
        return [ranking_to_group(r)]
    if isinstance(
        r, Feedback
    ):  # one answer judged alone: KTO's (rlhf dpo, loss kto), no pair for the reward model
        return [None]
    raise TypeError(f"not a preference record: {type(r).__name__}")


def _group_by_score(
    prompt: str, texts: Sequence[str], scores: Sequence[float], labeler: str | None, with_margin: bool
) -> PreferenceGroup | None:
    """Pairs (better, worse) for every i < j whose scores differ (higher = better); equal texts are one completion,
    scored with their mean (a text ranked both first and third would otherwise be both above and below the second)."""
    completions = list(dict.fromkeys(texts))
    given: dict[str, list[float]] = {}
    for text, score in zip(texts, scores, strict=True):
        given.setdefault(text, []).append(score)
    mean = [sum(given[t]) / len(given[t]) for t in completions]
    pairs: list[tuple[int, int]] = []
    margins: list[float | None] = []
    for i, j in itertools.combinations(range(len(completions)), 2):
        if mean[i] == mean[j]:
            continue
        better, worse = (i, j) if mean[i] > mean[j] else (j, i)
        pairs.append((better, worse))
        margins.append(mean[better] - mean[worse] if with_margin else None)
    return PreferenceGroup(prompt, completions, pairs, margins, labeler) if pairs else None


def chat_template(tokenizer: Any) -> Render | None:
    """The tokenizer's own chat template as a Render, or None if it has none."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        # the template's own refusals (jinja2's TemplateError, a ValueError) say what is wrong
        except Exception as e:
            raise ValueError(f"the chat template cannot render these messages: {e}") from None
        return str(text)

    return render


def read_preference_groups(
    path: str,
    fmt: Format,
    tokenizer: Any,
    skip_bad_rows: bool = False,
    columns: dict[str, str] | None = None,
) -> list[PreferenceGroup]:
    """The groups (`to_groups`) of a preference source in any layout; conversational rows are rendered with the
    tokenizer's own chat template, and a source that has them while the tokenizer has none is a DataError."""
    records = read_preferences(path, fmt, skip_bad_rows, columns)
    try:
        groups = to_groups(records, render=chat_template(tokenizer))
    except ValueError as e:  # conversational rows without a (usable) chat template
        raise DataError(f"{path}: {e}") from None
    kinds = collections.Counter(RECORD_KINDS[type(r)] for r in records)
    if kinds["feedback"]:
        log.warning("%s: %d feedback records (answers judged alone) compare nothing and are left out; KTO trains on "
                    "them (rlhf dpo --set dpo.loss=kto)", path, kinds["feedback"])  # fmt: skip
    log.info("%s: %d records (%s) -> %d judgements that compare answers (ties, identical answers and gold items "
             "compare none)", path, len(records), ", ".join(f"{n} {k}" for k, n in kinds.most_common()), len(groups))  # fmt: skip
    return groups


# what each kind of record is called where a source is summed up (HH and the dataset layouts read as pairs)
RECORD_KINDS: dict[type, str] = {PreferencePair: "pairs", ConversationalPair: "conversational pairs",
                                 PairwiseVote: "votes", Ranking: "rankings", Rating: "ratings",
                                 Feedback: "feedback"}  # fmt: skip


class _HasPrompt(Protocol):
    @property
    def prompt(self) -> str: ...


P = TypeVar("P", bound=_HasPrompt)


def split_by_prompt(items: list[P], fraction: float, seed: int) -> tuple[list[P], list[P]]:
    """Hold out a `fraction` of the distinct prompts (seeded), so held-out prompts are never trained on."""
    prompts = sorted({item.prompt for item in items})
    if fraction == 0 or len(prompts) < 2:
        return items, []
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, int(len(prompts) * fraction))])
    return [i for i in items if i.prompt not in held], [i for i in items if i.prompt in held]
