"""Labeler statistics: votes, pairwise agreement, Krippendorff's alpha, accuracy on gold, time per vote;
per-axis judgements and votes per day."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhf.feedback.models import Assignment, Task, User, Vote
from rlhf.feedback.projects import get_project
from rlhf.feedback.schemas import AxisStats, DayCount, LabelerStats, StatsOut


def krippendorff_alpha_nominal(units: Sequence[Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal data; `units` holds the values the coders gave each unit.

    Follows Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": coincidences
    o_ck = sum over units of (ordered c-k pairs of values from different coders) / (m_u - 1), then
    alpha = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c n_k. Units with fewer than two values are
    not pairable and are left out. None when alpha is undefined (no pairable unit, or a single category).
    """
    o: defaultdict[tuple[Hashable, Hashable], float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for a, b in itertools.permutations(range(m), 2):
            o[(values[a], values[b])] += 1 / (m - 1)
    n_c: defaultdict[Hashable, float] = defaultdict(float)
    for (c, _k), count in o.items():
        n_c[c] += count
    n = sum(n_c.values())
    observed = sum(count for (c, k), count in o.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c, k in itertools.permutations(n_c, 2))
    if n <= 1 or expected == 0:
        return None
    return 1 - (n - 1) * observed / expected


def agreement(votes_by_task: dict[int, dict[str, Hashable]]) -> dict[str, tuple[int, int]]:
    """Per labeler: (pairs agreeing, pairs) over every other labeler who answered the same task."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for answers in votes_by_task.values():
        for a, b in itertools.permutations(answers, 2):
            out[a][1] += 1
            out[a][0] += int(answers[a] == answers[b])
    return {name: (agree, total) for name, (agree, total) in out.items()}


def project_stats(session: Session, project_name: str) -> StatsOut:
    project = get_project(session, project_name)
    rows = session.execute(
        select(
            Vote.task_id,
            User.name,
            Vote.choice,
            Vote.time_to_vote_ms,
            Task.kind,
            Task.is_gold,
            Task.gold_choice,
            Vote.axes,
            Vote.created_at,
        )
        .join(Task, Task.id == Vote.task_id)
        .join(User, User.id == Vote.user_id)
        .where(Task.project_id == project.id, Vote.retracted_at.is_(None))
        .order_by(Vote.id)
    ).all()
    choices: dict[int, dict[str, Hashable]] = defaultdict(dict)
    n_votes: Counter[str] = Counter()
    times: dict[str, list[int]] = defaultdict(list)
    gold: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_axis: dict[str, Counter[str]] = defaultdict(Counter)
    per_day: Counter[str] = Counter()
    for task_id, name, choice, time_ms, kind, is_gold, gold_choice, axes, created_at in rows:
        n_votes[name] += 1
        per_day[created_at.date().isoformat()] += 1
        for axis, judged in (axes or {}).items():
            per_axis[axis][judged] += 1
            if judged in ("A", "B") and choice in ("A", "B"):
                per_axis[axis]["agree" if judged == choice else "disagree"] += 1
        if time_ms is not None:
            times[name].append(time_ms)
        if kind == "pairwise" and choice is not None:
            choices[task_id][name] = choice
        if is_gold and gold_choice is not None:
            gold[name][0] += int(choice == gold_choice)
            gold[name][1] += 1
    agree = agreement(choices)
    labelers = list(
        session.execute(
            select(User.name, User.disabled)
            .join(Assignment, Assignment.user_id == User.id)
            .where(Assignment.project_id == project.id)
            .distinct()
            .order_by(User.name)
        ).all()
    )
    per_labeler = []
    for name, disabled in labelers:
        a, pairs = agree.get(name, (0, 0))
        right, n_gold = gold.get(name, (0, 0))
        per_labeler.append(
            LabelerStats(
                labeler=name,
                disabled=disabled,
                votes=n_votes[name],
                agreement=a / pairs if pairs else None,
                agreement_pairs=pairs,
                gold_accuracy=right / n_gold if n_gold else None,
                gold_votes=n_gold,
                median_time_ms=float(statistics.median(times[name])) if times[name] else None,
            )
        )
    n_tasks = session.scalar(select(func.count()).select_from(Task).where(Task.project_id == project.id))
    return StatsOut(
        project=project.name,
        tasks=int(n_tasks or 0),
        votes=len(rows),
        alpha=krippendorff_alpha_nominal([list(a.values()) for a in choices.values()]),
        labelers=per_labeler,
        axes=[_axis_stats(axis, per_axis.get(axis, Counter())) for axis in project.axes or sorted(per_axis)],
        votes_per_day=[DayCount(day=d, votes=n) for d, n in sorted(per_day.items())],
    )


def _axis_stats(axis: str, counts: Counter[str]) -> AxisStats:
    decided = counts["agree"] + counts["disagree"]
    return AxisStats(
        axis=axis,
        judged=counts["A"] + counts["B"] + counts["same"],
        a=counts["A"],
        b=counts["B"],
        same=counts["same"],
        agrees_with_choice=counts["agree"] / decided if decided else None,
    )
