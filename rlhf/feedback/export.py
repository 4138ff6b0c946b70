"""Export live (not undone) votes as preference records, the shapes of `rlhf.data.preferences`.

- votes:   {"prompt", "completion_a", "completion_b", "choice", "labeler", "margin"?, "meta"}  (pairwise
           tasks; tie and both_bad kept)
- ranking: {"prompt", "completions", "ranking", "labeler", "meta"}  (ranking: rank per completion, 1 = best)
- rating:  {"prompt", "completion", "rating", "labeler", "meta"}
- pairs:   {"prompt", "chosen", "rejected", "margin"?}  (TRL; margin on every pair when any has one, 0 where
           none was given; conversational, with message lists, for prompts
           imported as conversations: see preference_import), derived: a pairwise vote A or B gives one pair;
           a ranking of K gives a pair for every two completions with different ranks (up to C(K,2); a text
           listed twice counts once, at its mean rank, as in preferences.ranking_to_group);
           ratings give a pair for every two completions of a prompt that one labeler rated differently,
           with margin = the rating difference (a text rated more than once: its mean rating). Ties and
           both_bad give no pair, nor do votes on gold items (those check the labelers; the other formats
           keep them, marked meta.is_gold).
- axes:    {"prompt", "completion_a", "completion_b", "axis", "choice": "A"|"B"|"same", "labeler", "meta"}
           (one record per judgement axis a pairwise vote answered: helpful, honest, harmless, ...)
- sft:     {"prompt", "response", "meta"}  (the better answers labelers wrote: SFT demonstrations)
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf.data.preferences import PROMPT_MESSAGES, Ranking, as_content, group_to_pairs, ranking_to_group
from rlhf.feedback.models import Completion, Prompt, Task, TaskCompletion, User, Vote
from rlhf.feedback.projects import get_project

# PROMPT_MESSAGES: the Prompt.meta key of a prompt that was a conversation (the model server's and the gateway's
# chats, conversational imports), which the exports keep: as the prompt of a conversational pair (pairs), under
# meta for the other formats, which the reward model renders through the chat template (to_groups)

FORMATS = ("votes", "pairs", "ranking", "rating", "axes", "sft")


def export_records(session: Session, project: str, kind: str) -> list[dict[str, Any]]:
    """All records of one format for `project`, oldest vote first."""
    if kind not in FORMATS:
        raise ValueError(f"unknown export format {kind!r}")
    if kind == "pairs":
        pairs = list(_pairs(session, project))
        # a margin on every pair or on none: TRL's RewardTrainer reads the column whole, and a pair without
        # one (a vote without a margin, a ranking's pair) counts as margin 0, as the reward stage reads it
        if any("margin" in p for p in pairs):
            for p in pairs:
                p.setdefault("margin", 0.0)
        return pairs
    if kind == "axes":
        return list(_axes(session, project))
    if kind == "sft":
        return list(_rewrites(session, project))
    task_kind = {"votes": "pairwise", "ranking": "ranking", "rating": "rating"}[kind]
    return [_record(task_kind, *row) for row in _rows(session, project, task_kind)]


def _rows(
    session: Session, project: str, task_kind: str
) -> Iterator[tuple[Vote, Task, str, Prompt, list[Completion]]]:
    """(vote, task, labeler, prompt, completions in position order) for each live vote on `task_kind` tasks."""
    proj = get_project(session, project)
    votes = session.execute(
        select(Vote, Task, User.name, Prompt)
        .join(Task, Task.id == Vote.task_id)
        .join(User, User.id == Vote.user_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(Task.project_id == proj.id, Task.kind == task_kind, Vote.retracted_at.is_(None))
        .order_by(Vote.id)
    ).all()
    members: dict[int, list[Completion]] = defaultdict(list)
    links = session.execute(
        select(TaskCompletion.task_id, Completion)
        .join(Completion, Completion.id == TaskCompletion.completion_id)
        .join(Task, Task.id == TaskCompletion.task_id)
        .where(Task.project_id == proj.id, Task.kind == task_kind)
        .order_by(TaskCompletion.task_id, TaskCompletion.position)
    ).all()
    for task_id, completion in links:
        members[task_id].append(completion)
    for vote, task, labeler, prompt in votes:
        yield vote, task, labeler, prompt, members[task.id]


def _meta(vote: Vote, task: Task, prompt: Prompt, comps: list[Completion]) -> dict[str, Any]:
    messages = prompt.meta.get(PROMPT_MESSAGES) if isinstance(prompt.meta, dict) else None
    return {
        **({PROMPT_MESSAGES: messages} if isinstance(messages, list) else {}),
        "task_id": task.id,
        "vote_id": vote.id,
        "prompt_id": prompt.external_id,
        "policies": [c.policy for c in comps],
        "sampling": [c.sampling for c in comps],
        "is_gold": task.is_gold,
        "source": vote.source,
        "created_at": vote.created_at.isoformat(),
        "display_order": vote.display_order,
        "time_to_vote_ms": vote.time_to_vote_ms,
        "confidence": vote.confidence,
        "note": vote.note,
        "rewrite": vote.rewrite,
    }


def _record(
    task_kind: str, vote: Vote, task: Task, labeler: str, prompt: Prompt, comps: list[Completion]
) -> dict[str, Any]:
    meta = _meta(vote, task, prompt, comps)
    if task_kind == "pairwise":
        rec: dict[str, Any] = {
            "prompt": prompt.text,
            "completion_a": comps[0].text,
            "completion_b": comps[1].text,
            "choice": vote.choice,
            "labeler": labeler,
        }
        if vote.margin is not None:
            rec["margin"] = vote.margin
        if vote.axes:
            rec["axes"] = vote.axes
        rec["meta"] = meta
        return rec
    if task_kind == "ranking":
        texts = [c.text for c in comps]
        return {
            "prompt": prompt.text,
            "completions": texts,
            "ranking": vote.ranking,
            "labeler": labeler,
            "meta": meta,
        }
    return {
        "prompt": prompt.text,
        "completion": comps[0].text,
        "rating": vote.rating,
        "labeler": labeler,
        "meta": meta,
    }


def _pair(prompt: Prompt, chosen: str, rejected: str, margin: float | None) -> dict[str, Any]:
    """A TRL pair; conversational (message lists) when the prompt was imported as a conversation."""
    messages = prompt.meta.get(PROMPT_MESSAGES) if isinstance(prompt.meta, dict) else None
    rec: dict[str, Any] = {"prompt": prompt.text, "chosen": chosen, "rejected": rejected}
    if isinstance(messages, list):
        rec = {
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": as_content(chosen)}],
            "rejected": [{"role": "assistant", "content": as_content(rejected)}],
        }
    if margin is not None:
        rec["margin"] = margin
    return rec


def _pairs(session: Session, project: str) -> Iterator[dict[str, Any]]:
    for vote, task, _labeler, prompt, comps in _rows(session, project, "pairwise"):
        if vote.choice in ("A", "B") and not task.is_gold:
            win = 0 if vote.choice == "A" else 1
            yield _pair(prompt, comps[win].text, comps[1 - win].text, vote.margin)
    for vote, task, _labeler, prompt, comps in _rows(session, project, "ranking"):
        if task.is_gold or not vote.ranking:
            continue
        # as training reads a ranking: a text listed twice (a policy that sampled one answer twice) is one
        # completion at its mean rank, never a pair with itself or both above and below another
        group = ranking_to_group(Ranking(prompt.text, [c.text for c in comps], vote.ranking))
        for pair in group_to_pairs(group) if group is not None else []:
            yield _pair(prompt, pair.chosen, pair.rejected, None)
    # Ratings: compare only within one labeler's ratings of one prompt (labelers use the scale differently);
    # a text that labeler rated more than once counts with its mean rating, as in preferences.to_groups.
    rated: dict[tuple[int, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    prompts: dict[int, Prompt] = {}
    for vote, task, labeler, prompt, comps in _rows(session, project, "rating"):
        if vote.rating is not None and not task.is_gold:
            rated[(prompt.id, labeler)][comps[0].text].append(vote.rating)
            prompts[prompt.id] = prompt
    for (prompt_id, _labeler), by_text in rated.items():
        means = [(text, sum(r) / len(r)) for text, r in by_text.items()]
        for (text_i, r_i), (text_j, r_j) in itertools.combinations(means, 2):
            if r_i != r_j:
                chosen, rejected = (text_i, text_j) if r_i > r_j else (text_j, text_i)
                yield _pair(prompts[prompt_id], chosen, rejected, abs(r_i - r_j))


def _axes(session: Session, project: str) -> Iterator[dict[str, Any]]:
    for vote, task, labeler, prompt, comps in _rows(session, project, "pairwise"):
        for axis, choice in (vote.axes or {}).items():
            yield {
                "prompt": prompt.text,
                "completion_a": comps[0].text,
                "completion_b": comps[1].text,
                "axis": axis,
                "choice": choice,
                "labeler": labeler,
                "meta": _meta(vote, task, prompt, comps),
            }


def _rewrites(session: Session, project: str) -> Iterator[dict[str, Any]]:
    for kind in ("pairwise", "ranking", "rating"):
        for vote, task, labeler, prompt, comps in _rows(session, project, kind):
            if vote.rewrite:
                meta = {**_meta(vote, task, prompt, comps), "labeler": labeler}
                yield {"prompt": prompt.text, "response": vote.rewrite, "meta": meta}
