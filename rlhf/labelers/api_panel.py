"""The simulated panel as API clients of the labeling app: their votes travel the path people's do.

Each member logs in with its own token, pulls its next task from the queue, judges it (pairwise choice,
K-way ranking or rating) and posts the vote with an idempotency key derived from (member, task), so a run
that is interrupted and started again never counts a vote twice. Members take turns, one task each, so the
work is spread over the panel as the server's overlap setting asks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from rlhf.feedback.client import FeedbackClient
from rlhf.feedback.db import Database
from rlhf.labelers.gold import judge
from rlhf.labelers.panel import Panel

log = logging.getLogger(__name__)


def _judge_task(panel: Panel, member: str, task: dict[str, Any]) -> dict[str, Any]:
    """The vote fields for one task, as this member judges it."""
    by_position = {c["position"]: c["text"] for c in task["completions"]}
    texts = [by_position[p] for p in sorted(by_position)]
    prompt = task["prompt"]
    if task["kind"] == "pairwise":
        return {"choice": panel.compare(prompt, texts[0], texts[1], member=member)}
    if task["kind"] == "ranking":
        return {"ranking": panel.rank(prompt, texts, member=member)}
    m = panel.member(member, prompt)
    utility = panel.perceived_utility(m, prompt, texts[0], None)
    return {"rating": max(1.0, min(7.0, round(4.0 + utility)))}  # a 1-7 Likert scale around gold utility


def panel_tokens(db: Database, panel: Panel, label: str) -> dict[str, str]:
    """A new API token per panel member (a labeler user each, created the first time, kept after)."""
    from rlhf.feedback.errors import NotFound
    from rlhf.feedback.users import create_token, create_user, get_user

    tokens = {}
    with db.session() as session:
        for member in panel.members:
            try:
                get_user(session, member.name)
            except NotFound:
                create_user(session, member.name, "labeler")
            tokens[member.name] = create_token(session, member.name, label)
    return tokens


def label_through_api(
    base_url: str, tokens: Mapping[str, str], panel: Panel, project: str, max_votes: int = 0
) -> dict[str, int]:
    """Members (name -> API token) vote in turn until every queue is empty; returns votes per member."""
    clients = {name: FeedbackClient(base_url, token, light=True) for name, token in tokens.items()}
    counts = dict.fromkeys(tokens, 0)
    active = set(tokens)
    try:
        while active and (not max_votes or sum(counts.values()) < max_votes):
            for name in sorted(active):
                task = clients[name].next_task(project)
                if task is None:
                    active.discard(name)
                    continue
                clients[name].vote(
                    task["id"],
                    display_order=task["display_order"],
                    idempotency_key=f"sim-{name}-{task['id']}",
                    source="simulated",
                    **_judge_task(panel, name, task),
                )
                counts[name] += 1
    finally:
        for client in clients.values():
            client.close()
    log.info("simulated panel: %d votes through the labeling API", sum(counts.values()))
    return counts


def gold_choice(prompt: str, a: str, b: str) -> str:
    """The gold answer of a pairwise comparison (for gold items and agreement checks)."""
    ua, ub = judge(prompt, a).utility, judge(prompt, b).utility
    return "A" if ua > ub else "B" if ub > ua else "tie"
