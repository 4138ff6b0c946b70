"""The policy leaderboard: a Bradley-Terry fit over every pairwise judgement between policy versions.

Judgements come from two places: votes on cross-version pairs (two completions by different policies, each
what its policy answered: not an answer cut short or one given to another prompt, see `policies_answered`), and
each round's evaluation of the new policy against the SFT policy (wins, ties and losses under the judge).
A tie counts half a win for each side. The fit is Hunter's (2004) MM algorithm for Bradley-Terry,
P(i beats j) = p_i / (p_i + p_j), with one virtual tie against a reference of strength 1 per version, so a
version that never lost (or never won) still gets a finite strength. Scores are log-strengths shifted so the
first-named anchor (the SFT policy) is 0; 95% intervals are percentiles over bootstrap resamples of the
judgements. Pure Python (a handful of versions), so the labeling app imports neither torch nor numpy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from rlhf.feedback.export import export_records
from rlhf.feedback.loop_state import policies
from rlhf.feedback.models import LoopRun

OUTCOMES = {"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}


@dataclass(frozen=True)
class Judgement:
    """One comparison: `outcome` is 1 if policy a won, 0 if b won, 0.5 for a tie."""

    a: str
    b: str
    outcome: float
    source: str  # "votes" or "eval"


@dataclass(frozen=True)
class Standing:
    """One row of the leaderboard: log-strength relative to the anchor, its 95% interval, judgements seen."""

    policy: str
    score: float
    ci95: tuple[float, float]
    n: int


def fit_bradley_terry(
    names: Sequence[str], judgements: Sequence[Judgement], iterations: int = 1000
) -> list[float]:
    """Log-strengths of `names` (first one = 0) by MM iterations, with one virtual tie per version."""
    index = {n: i for i, n in enumerate(names)}
    m = len(names)
    wins = [0.5] * m  # the virtual tie: half a win against a reference of strength 1
    games: dict[tuple[int, int], float] = {}
    for j in judgements:
        a, b = index[j.a], index[j.b]
        wins[a] += j.outcome
        wins[b] += 1.0 - j.outcome
        games[(a, b)] = games.get((a, b), 0.0) + 1
        games[(b, a)] = games.get((b, a), 0.0) + 1
    p = [1.0] * m
    for _ in range(iterations):
        denom = [1.0 / (p[i] + 1.0) for i in range(m)]
        for (a, b), n in games.items():
            denom[a] += n / (p[a] + p[b])
        new = [w / d for w, d in zip(wins, denom, strict=True)]
        converged = max(abs(x - y) / y for x, y in zip(new, p, strict=True)) < 1e-10
        p = new
        if converged:
            break
    return [math.log(x) - math.log(p[0]) for x in p]


def _percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def leaderboard(
    names: Sequence[str], judgements: Sequence[Judgement], n_boot: int = 200, seed: int = 0
) -> list[Standing]:
    """Standings, best first; `names[0]` is the anchor (score 0)."""
    if not names:
        return []
    scores = fit_bradley_terry(names, judgements)
    rng = random.Random(seed)
    n = len(judgements)
    boots = [
        fit_bradley_terry(names, [judgements[rng.randrange(n)] for _ in range(n)]) for _ in range(n_boot)
    ]
    counts = dict.fromkeys(names, 0)
    for j in judgements:
        counts[j.a] += 1
        counts[j.b] += 1
    rows = []
    for i, name in enumerate(names):
        column = [b[i] for b in boots]
        ci = (_percentile(column, 0.025), _percentile(column, 0.975))
        rows.append(Standing(name, scores[i], ci, counts[name]))
    return sorted(rows, key=lambda s: -s.score)


# sampling keys of the candidates `rlhf generate` makes from a policy's answers, not answered by it: cut to
# their first sentence (short_k) or given to another prompt (other_k); a vote on one does not rank policies
MADE_FROM_ANSWERS = ("truncated", "answer_to")


def policies_answered(rec: dict[str, Any]) -> bool:
    """Whether both answers of a vote record are what their policies answered to its prompt."""
    return not any(key in (s or {}) for s in rec["meta"].get("sampling") or [] for key in MADE_FROM_ANSWERS)


def loop_judgements(session: Session, loop: LoopRun) -> tuple[list[str], list[Judgement]]:
    """Version names (the initial policy first) and every judgement between two of them in this loop."""
    versions = policies(session, loop)
    names = [v.name for v in versions]
    known = set(names)
    judgements: list[Judgement] = []
    if not names:
        return names, judgements
    for rec in export_records(session, loop.name, "votes") if _has_project(session, loop.name) else []:
        a, b = rec["meta"]["policies"]
        if a != b and a in known and b in known and policies_answered(rec):
            judgements.append(Judgement(a, b, OUTCOMES[rec["choice"]], "votes"))
    for v in versions:
        ev: dict[str, Any] | None = v.metrics.get("eval")
        if ev and ev.get("baseline") in known:
            for outcome, count in ((1.0, ev["wins"]), (0.5, ev["ties"]), (0.0, ev["losses"])):
                judgements.extend(Judgement(v.name, ev["baseline"], outcome, "eval") for _ in range(count))
    return names, judgements


def project_leaderboard(session: Session, project: str, n_boot: int = 200) -> list[Standing]:
    """Standings of the policy versions compared in one project's pairwise votes (empty below two);
    the version seen first is the anchor."""
    names: list[str] = []
    judgements = []
    for rec in export_records(session, project, "votes"):
        a, b = rec["meta"]["policies"]
        if a and b and a != b and policies_answered(rec):
            names.extend(n for n in (a, b) if n not in names)
            judgements.append(Judgement(a, b, OUTCOMES[rec["choice"]], "votes"))
    return leaderboard(names, judgements, n_boot) if len(names) >= 2 else []


def _has_project(session: Session, name: str) -> bool:
    from rlhf.feedback.errors import NotFound
    from rlhf.feedback.projects import get_project

    try:
        get_project(session, name)
    except NotFound:
        return False
    return True


def loop_leaderboard(session: Session, loop: LoopRun, n_boot: int = 200) -> list[Standing]:
    names, judgements = loop_judgements(session, loop)
    return leaderboard(names, judgements, n_boot)


def format_leaderboard(rows: Sequence[Standing]) -> str:
    lines = [f"{'policy':<10}{'BT score':>10}{'95% CI':>20}{'judgements':>12}"]
    for s in rows:
        ci = f"[{s.ci95[0]:+.2f}, {s.ci95[1]:+.2f}]"
        lines.append(f"{s.policy:<10}{s.score:>+10.2f}{ci:>20}{s.n:>12}")
    return "\n".join(lines)
