"""People as the judge: the evaluation pairs become pairwise tasks of a project in the labeling app, and
the votes they cast are read back as outcomes for policy A.

`push_pairs` imports one row per prompt (completion 0 from policy "A", completion 1 from "B"; the app shows
them in a random order of its own), either straight into the store (`db`, a database URL) or through a
running labeling server (`server` + an admin token). `collect_outcomes` exports the project's live votes
and averages them per prompt: A's answer chosen 1, B's 0, tie or both bad 1/2. Pairs of identical answers
never become tasks: they are ties without a vote. Imports nothing from torch.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from rlhf.errors import RlhfError
from rlhf.feedback.client import FeedbackClient
from rlhf.feedback.db import Database, upgrade
from rlhf.feedback.export import export_records
from rlhf.feedback.importer import import_candidates
from rlhf.feedback.projects import update_project
from rlhf.feedback.schemas import CandidateRow

log = logging.getLogger(__name__)

CHOICE_FOR_FIRST = {"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}


def prompt_id(i: int) -> str:
    return f"eval-{i}"


def push_pairs(
    prompts: list[str], texts_a: list[str], texts_b: list[str], project: str, *, db: str | None = None,
    server: str | None = None, token: str | None = None, guidelines: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Create the project's pairwise tasks; returns the import counts."""
    rows = [{"prompt": p, "prompt_id": prompt_id(i), "meta": {"eval": True},
             "completions": [{"text": a, "policy": "A"}, {"text": b, "policy": "B"}]}
            for i, (p, a, b) in enumerate(zip(prompts, texts_a, texts_b, strict=True))]  # fmt: skip
    if server:
        with FeedbackClient(server, token or "") as client:
            return client.import_candidates(project, rows, guidelines=guidelines)
    if not db:
        raise RlhfError("the people judge needs eval.judge_db or eval.judge_server")
    store = Database(db)
    try:
        upgrade(store)
        with store.session() as session:
            out = import_candidates(session, project, [CandidateRow.model_validate(r) for r in rows])
            if guidelines:
                update_project(session, project, guidelines=guidelines)
            return out.model_dump()
    finally:
        store.dispose()


def collect_outcomes(
    project: str,
    n_prompts: int,
    *,
    db: str | None = None,
    server: str | None = None,
    token: str | None = None,
) -> tuple[list[float | None], int]:
    """Outcome for A on each prompt (mean over its votes; None where nobody voted yet), and the vote count."""
    if server:
        with FeedbackClient(server, token or "") as client:
            records = client.export(project, "votes")
    elif db:
        from rlhf.feedback.db import open_database

        store = open_database(db, existing=True)  # votes are read from a store that is there, never a new one
        try:
            with store.session() as session:
                records = export_records(session, project, "votes")
        finally:
            store.dispose()
    else:
        raise RlhfError("the people judge needs eval.judge_db or eval.judge_server")
    votes: dict[int, list[float]] = defaultdict(list)
    for rec in records:
        pid, policies = rec["meta"].get("prompt_id") or "", rec["meta"].get("policies") or []
        if not pid.startswith("eval-") or sorted(policies) != ["A", "B"]:
            continue
        first_wins = CHOICE_FOR_FIRST.get(rec["choice"])
        if first_wins is None:
            continue
        votes[int(pid.removeprefix("eval-"))].append(first_wins if policies[0] == "A" else 1.0 - first_wins)
    outcomes = [sum(v) / len(v) if (v := votes.get(i)) else None for i in range(n_prompts)]
    return outcomes, sum(len(v) for v in votes.values())
