"""Import candidate generations (and gold items) into comparison tasks.

Tasks made from a prompt with K completions:
- pairwise: every pair (i, j), i < j, for K <= 4 (at most 6 pairs); for K > 4 the K pairs of a cycle
  (i, i+1 mod K), so each completion is compared twice and the comparison graph stays connected.
  Pairs of identical texts are left out: there is nothing to judge.
- ranking: one task with all K completions.
- rating: one task per completion.
A candidate row may name its pairs (`pairs`, e.g. chosen by active selection): then exactly those become
pairwise tasks. Gold rows become pairwise tasks with `is_gold` and the known answer. Rows whose `prompt_id` the project
already holds are skipped, and so are rows whose prompt and answers it holds (but in a production project, whose
pairs are each a user's), so importing the same file twice adds nothing, with prompt ids or without.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf.data.jsonl import iter_jsonl
from rlhf.errors import DataError
from rlhf.feedback.db import db_of
from rlhf.feedback.errors import InvalidInput
from rlhf.feedback.models import Completion, Project, Prompt, Task, TaskCompletion
from rlhf.feedback.schemas import CandidateRow, GoldRow, ImportOut

log = logging.getLogger(__name__)

ALL_PAIRS_MAX_K = 4


def pair_indices(k: int) -> list[tuple[int, int]]:
    """Which completion pairs of a K-candidate prompt become pairwise tasks (see the module docstring)."""
    if k <= ALL_PAIRS_MAX_K:
        return list(itertools.combinations(range(k), 2))
    return [(i, (i + 1) % k) if i < (i + 1) % k else ((i + 1) % k, i) for i in range(k)]


def read_rows(path: str | Path, model: type[CandidateRow] | type[GoldRow], max_bytes: int) -> list[Any]:
    """Read and validate a JSONL file of candidate or gold rows; errors name file:line."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > max_bytes:
        raise DataError(f"{path}: {path.stat().st_size} bytes is over the import limit of {max_bytes}")
    rows = []
    for lineno, obj in iter_jsonl(path):
        try:
            rows.append(model.model_validate(obj))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "row"
            raise DataError(f"{path}:{lineno}: {where}: {err['msg']}") from None
    if not rows:
        raise DataError(f"{path}: no records (empty file)")
    return rows


def import_candidates(
    session: Session,
    project_name: str,
    candidates: Sequence[CandidateRow],
    *,
    task_kind: str = "pairwise",
    gold: Sequence[GoldRow] = (),
    overlap: int | None = None,
    gold_rate: float | None = None,
    source: str | None = None,
) -> ImportOut:
    """Create the project if needed, then its prompts, completions and tasks, in one transaction. `source`: the
    file the rows came from, as errors name it."""
    min_k = 1 if task_kind == "rating" else 2
    for i, row in enumerate(candidates):
        if len(row.completions) < min_k:
            where = f"{source}: record {i + 1}" if source else f"candidate row {i + 1}"
            raise InvalidInput(f"{where}: a {task_kind} task needs at least {min_k} completions")
    try:
        counts = _import(session, project_name, candidates, task_kind, gold, overlap, gold_rate)
    except IntegrityError:
        # another import made the project, or the same prompts, at the same moment (two workers): once its
        # rows are there, this one skips them
        counts = _import(session, project_name, candidates, task_kind, gold, overlap, gold_rate)
    log.info("imported into %s: %s", project_name, counts)
    return ImportOut(project=project_name, **counts)


def _import(
    session: Session,
    project_name: str,
    candidates: Sequence[CandidateRow],
    task_kind: str,
    gold: Sequence[GoldRow],
    overlap: int | None,
    gold_rate: float | None,
) -> dict[str, int]:
    counts = {"prompts": 0, "completions": 0, "tasks": 0, "gold_tasks": 0, "skipped": 0}
    with db_of(session).write(session):
        project = get_or_create_project(session, project_name, overlap, gold_rate)
        # one import into a project at a time (PostgreSQL; SQLite writes one at a time already): the next
        # reads what this one added
        session.execute(select(Project.id).where(Project.id == project.id).with_for_update()).all()
        known = set(session.scalars(select(Prompt.external_id).where(Prompt.project_id == project.id)))
        # One entry per new prompt: (text, prompt_id, meta, [(text, policy, sampling)], gold answer or None,
        # chosen pairs or None).
        entries: list[
            tuple[
                str, str | None, dict[str, Any], list[tuple[str, str, dict[str, Any]]], str | None,
                list[tuple[int, int]] | None,
            ]
        ] = []  # fmt: skip
        # A row repeating one of the project's or an earlier one of this import (same prompt, same answers)
        # would only make duplicate tasks, each answered separately and counted twice in the exported pairs;
        # a row without a prompt_id (gold rows, often) is known by these alone. Production pairs are each a
        # user's own, however alike.
        seen = set() if project.production else _contents(session, project.id)
        for row in candidates:
            content = (row.prompt, tuple(sorted(c.text for c in row.completions)))
            if (row.prompt_id is not None and row.prompt_id in known) or content in seen:
                counts["skipped"] += 1
                continue
            known.add(row.prompt_id)
            seen.add(content)
            comps = [(c.text, c.policy, c.sampling.model_dump(exclude_none=True)) for c in row.completions]
            entries.append((row.prompt, row.prompt_id, row.meta, comps, None, row.pairs))
        for g in gold:
            content = (g.prompt, tuple(sorted((g.completion_a, g.completion_b))))
            if (g.prompt_id is not None and g.prompt_id in known) or content in seen:
                counts["skipped"] += 1
                continue
            known.add(g.prompt_id)
            seen.add(content)
            comps = [(g.completion_a, "", {}), (g.completion_b, "", {})]
            entries.append((g.prompt, g.prompt_id, {**g.meta, "gold": True}, comps, g.choice, None))
        prompt_ids = _insert_ids(
            session,
            Prompt,
            [{"project_id": project.id, "text": e[0], "external_id": e[1], "meta": e[2]} for e in entries],
        )
        completion_rows = [
            {"prompt_id": pid, "text": text, "policy": policy, "sampling": sampling}
            for pid, entry in zip(prompt_ids, entries, strict=True)
            for text, policy, sampling in entry[3]
        ]
        completion_ids = iter(_insert_ids(session, Completion, completion_rows))
        tasks: list[dict[str, Any]] = []
        members: list[list[int]] = []
        for pid, (_, _, _, comps, gold_choice, chosen) in zip(prompt_ids, entries, strict=True):
            ids = [next(completion_ids) for _ in comps]
            base = {"project_id": project.id, "prompt_id": pid, "n_assigned": 0}
            if gold_choice is not None:
                tasks.append({**base, "kind": "pairwise", "is_gold": True, "gold_choice": gold_choice})
                members.append(ids)
                continue
            for group in _task_groups(task_kind, [c[0] for c in comps], chosen):
                tasks.append({**base, "kind": task_kind, "is_gold": False, "gold_choice": None})
                members.append([ids[i] for i in group])
        for t, m in zip(tasks, members, strict=True):
            t["n_completions"] = len(m)
        task_ids = _insert_ids(session, Task, tasks)
        links = [
            {"task_id": tid, "position": pos, "completion_id": cid}
            for tid, m in zip(task_ids, members, strict=True)
            for pos, cid in enumerate(m)
        ]
        if links:
            session.execute(insert(TaskCompletion), links)
        n_gold = sum(1 for t in tasks if t["is_gold"])
        counts.update(
            prompts=len(prompt_ids),
            completions=len(completion_rows),
            tasks=len(task_ids) - n_gold,
            gold_tasks=n_gold,
        )
    return counts


def _contents(session: Session, project_id: int) -> set[tuple[str, tuple[str, ...]]]:
    """(prompt, its answers sorted) of every prompt the project holds."""
    answers: dict[int, list[str]] = {}
    texts: dict[int, str] = {}
    rows = session.execute(
        select(Prompt.id, Prompt.text, Completion.text)
        .join(Completion, Completion.prompt_id == Prompt.id)
        .where(Prompt.project_id == project_id)
    )
    for pid, prompt, answer in rows:
        texts[pid] = prompt
        answers.setdefault(pid, []).append(answer)
    return {(texts[pid], tuple(sorted(a))) for pid, a in answers.items()}


def get_or_create_project(
    session: Session, name: str, overlap: int | None = None, gold_rate: float | None = None
) -> Project:
    """The project `name` (created with overlap 1 and no gold if missing); the settings given are applied."""
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(name=name, overlap=overlap or 1, gold_rate=gold_rate or 0.0)
        session.add(project)
        session.flush()
    else:
        if overlap is not None:
            project.overlap = overlap
        if gold_rate is not None:
            project.gold_rate = gold_rate
    return project


def _task_groups(
    kind: str, texts: list[str], pairs: list[tuple[int, int]] | None = None
) -> list[tuple[int, ...]]:
    if kind == "pairwise":  # one task per distinct pair of different answers
        chosen = pair_indices(len(texts)) if pairs is None else pairs
        groups: list[tuple[int, ...]] = []
        seen: set[frozenset[str]] = set()
        for i, j in chosen:
            key = frozenset((texts[i], texts[j]))
            if texts[i] != texts[j] and key not in seen:
                seen.add(key)
                groups.append((i, j))
        return groups
    if kind == "ranking":
        return [tuple(range(len(texts)))]
    if kind == "rating":
        return [(i,) for i in range(len(texts))]
    raise InvalidInput(f"task kind must be pairwise, ranking or rating, got {kind!r}")


def _insert_ids(session: Session, model: Any, rows: list[dict[str, Any]]) -> list[int]:
    """Bulk INSERT ... RETURNING id, ids in the order of `rows` (batched by SQLAlchemy's insertmanyvalues)."""
    if not rows:
        return []
    stmt = insert(model).returning(model.id, sort_by_parameter_order=True)
    return list(session.scalars(stmt, rows))
