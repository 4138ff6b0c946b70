"""People as the judge: the evaluation pairs become pairwise tasks of a project in the labeling app, and
the votes they cast are read back as outcomes for policy A.

`push_pairs` imports one row per prompt (completion 0 from policy "A", completion 1 from "B"; the app shows
them in a random order of its own), either straight into the store (`db`, a database URL) or through a
running labeling server (`server` + an admin token). `collect_outcomes` exports the project's live votes
and averages them per prompt: A's answer chosen 1, B's 0, tie or both bad 1/2. Pairs of identical answers
never become tasks: they are ties without a vote. Imports nothing from torch.
"""

from __future__ import annotations

import hashlib
import json
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


def evaluation_id(prompts: list[str], texts_a: list[str], texts_b: list[str]) -> str:
    """The pairs' own id: their prompt ids carry it, so two evaluations pushed to one project are tasks of their
    own (a second one's pairs were skipped as already there, and its votes read from the first's), and the
    same evaluation pushed again adds nothing."""
    return hashlib.sha256(json.dumps([prompts, texts_a, texts_b]).encode()).hexdigest()[:12]


def prompt_id(i: int, eval_id: str | None = None) -> str:
    """Prompt i's id in the project (`eval-{i}` for summaries of builds before evaluation ids)."""
    return f"eval-{eval_id}-{i}" if eval_id else f"eval-{i}"


def push_pairs(
    prompts: list[str], texts_a: list[str], texts_b: list[str], project: str, *, db: str | None = None,
    server: str | None = None, token: str | None = None, guidelines: str | None = None,
    eval_id: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Create the project's pairwise tasks (prompt ids `prompt_id(i, eval_id)`); returns the import counts."""
    rows = [{"prompt": p, "prompt_id": prompt_id(i, eval_id), "meta": {"eval": True},
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
    pairs: list[tuple[str, str, str]],
    *,
    db: str | None = None,
    server: str | None = None,
    token: str | None = None,
) -> tuple[list[float | None], int]:
    """Outcome for A on each (prompt, answer A, answer B) of `pairs` (mean over its votes; None where nobody voted
    yet), and the vote count. A vote counts for the pairs whose prompt and two answers it judged, A's side told by
    A's text: a second evaluation pushed to the project never reads the first's votes as its own, and one that
    asks a pair already there (the importer makes no second task of it) reads that pair's votes."""
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
    rows: dict[tuple[str, str, str], list[int]] = defaultdict(list)  # a question asked twice: both rows
    for i, pair in enumerate(pairs):
        rows[pair].append(i)
    votes: dict[int, list[float]] = defaultdict(list)
    n_votes = 0
    for rec in records:
        first_wins = CHOICE_FOR_FIRST.get(rec["choice"])
        shown = rec.get("prompt"), rec.get("completion_a"), rec.get("completion_b")
        if first_wins is None or not all(isinstance(x, str) for x in shown):
            continue
        prompt, first, second = (str(x) for x in shown)
        matched = [(i, first_wins) for i in rows.get((prompt, first, second), [])]
        matched += [(i, 1.0 - first_wins) for i in rows.get((prompt, second, first), []) if first != second]
        n_votes += bool(matched)
        for i, outcome in matched:
            votes[i].append(outcome)
    outcomes = [sum(v) / len(v) if (v := votes.get(i)) else None for i in range(len(pairs))]
    return outcomes, n_votes
