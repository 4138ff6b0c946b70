"""The iterative loop's state in the feedback store: runs, finished phases, reward-model and policy versions.

Torch-free, so `rlhf loop status`, `rlhf loop lineage` and the admin pages read it without loading a model.
A phase is recorded as finished in the same transaction as the rows it produces (`finish_phase`), so a loop
killed at any point and started again sees either the whole phase or none of it.

Tasks of round r are the prompts whose external id starts with "r{r}:" in the loop's project (the loop
names them so); that prefix is how votes are counted per round without reading JSON columns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select, true
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf.feedback.db import db_of
from rlhf.feedback.errors import Conflict, NotFound
from rlhf.feedback.models import (
    LoopPhase,
    LoopRun,
    PolicyVersion,
    Project,
    Prompt,
    RewardModelVersion,
    Task,
    Vote,
)

log = logging.getLogger(__name__)

# said of a round whose PPO kept its starting policy: its win rate against SFT is the parent's, sampled again
UNCHANGED = "; unchanged: PPO's guard found no iteration better than its start, so the policy is its parent's"


def round_prefix(round_: int) -> str:
    """The external-id prefix of round `round_`'s prompts in the loop's project."""
    return f"r{round_}:"


def get_or_create_loop(session: Session, name: str, config: dict[str, Any]) -> LoopRun:
    """The loop run called `name`; created (with its config) the first time."""
    loop = session.scalar(select(LoopRun).where(LoopRun.name == name))
    if loop is not None:
        return loop
    try:
        with db_of(session).write(session):
            session.add(LoopRun(name=name, config=config))
    except IntegrityError:  # another process created it first
        pass
    return get_loop(session, name)


def get_loop(session: Session, name: str) -> LoopRun:
    loop = session.scalar(select(LoopRun).where(LoopRun.name == name))
    if loop is None:
        names = list(session.scalars(select(LoopRun.name).order_by(LoopRun.id)))
        known = (
            f"the loops there: {', '.join(names)} (choose one: rlhf loop --set loop.name=NAME status --db URL)"
            if names
            else "it has none"
        )
        raise NotFound(f"no loop named {name!r} in this feedback store; {known}")
    return loop


def list_loops(session: Session) -> list[LoopRun]:
    return list(session.scalars(select(LoopRun).order_by(LoopRun.id)))


def finished_phases(session: Session, loop: LoopRun) -> dict[tuple[int, str], dict[str, Any]]:
    """(round, phase) -> the info recorded when it finished."""
    rows = session.scalars(select(LoopPhase).where(LoopPhase.loop_id == loop.id).order_by(LoopPhase.id))
    return {(p.round, p.phase): p.info for p in rows}


def finish_phase(
    session: Session, loop: LoopRun, round_: int, phase: str, info: dict[str, Any], rows: Sequence[Any] = ()
) -> None:
    """Record `phase` of `round_` as finished, together with its rows (versions), in one transaction; a phase
    recorded already (by another `rlhf loop` of this name on this store) is a one-line error, and neither is
    written."""
    try:
        with db_of(session).write(session):
            for row in rows:
                session.add(row)
            session.add(LoopPhase(loop_id=loop.id, round=round_, phase=phase, info=info))
    except IntegrityError:
        # the .loop.lock of out_dir keeps out a second process there, not one with another out_dir or machine
        raise Conflict(f"loop {loop.name}: round {round_}'s {phase} phase was recorded meanwhile by another "
                       "`rlhf loop` of this name on this feedback store (from another loop.out_dir or machine); "
                       "run one at a time: let it finish, then start this one again") from None  # fmt: skip
    log.info("loop %s: round %d: %s finished %s", loop.name, round_, phase, info)


def reward_models(session: Session, loop: LoopRun) -> list[RewardModelVersion]:
    stmt = select(RewardModelVersion).where(RewardModelVersion.loop_id == loop.id)
    return list(session.scalars(stmt.order_by(RewardModelVersion.round)))


def policies(session: Session, loop: LoopRun) -> list[PolicyVersion]:
    stmt = select(PolicyVersion).where(PolicyVersion.loop_id == loop.id)
    return list(session.scalars(stmt.order_by(PolicyVersion.round)))


def round_counts(
    session: Session, project: str, round_: int, settled_before: datetime | None = None
) -> tuple[int, int]:
    """(tasks, live votes) of round `round_` in `project`; with `settled_before`, only the votes that can no
    longer be undone: cast before it, or by the simulated panel (which never undoes)."""
    project_id = session.scalar(select(Project.id).where(Project.name == project))
    if project_id is None:
        return 0, 0
    in_round = (Prompt.project_id == project_id) & Prompt.external_id.startswith(round_prefix(round_))
    tasks = session.scalar(
        select(func.count(Task.id)).join(Prompt, Prompt.id == Task.prompt_id).where(in_round)
    )
    votes = session.scalar(
        select(func.count(Vote.id))
        .join(Task, Task.id == Vote.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(in_round, Vote.retracted_at.is_(None))
        .where(true() if settled_before is None else settled(settled_before))
    )
    return int(tasks or 0), int(votes or 0)


def settled(before: datetime) -> ColumnElement[bool]:
    """Votes no one can undo any more: cast before `before` (now less the labeling app's undo window), or by
    the simulated panel."""
    return (Vote.created_at <= before) | (Vote.source == "simulated")


@dataclass
class LineageStep:
    """One policy of a lineage chain, with the reward model it was trained against."""

    policy: PolicyVersion
    reward_model: RewardModelVersion | None


def lineage(session: Session, loop: LoopRun, version: str) -> list[LineageStep]:
    """The chain from `version` back to the initial policy, newest first."""
    by_name = {p.name: p for p in policies(session, loop)}
    rms = {r.name: r for r in reward_models(session, loop)}
    if version not in by_name:
        raise NotFound(f"no policy version {version!r} in loop {loop.name!r} (known: {', '.join(by_name)})")
    chain: list[LineageStep] = []
    name: str | None = version
    while name is not None and name in by_name and len(chain) <= len(by_name):
        p = by_name[name]
        chain.append(LineageStep(p, rms.get(p.reward_model) if p.reward_model else None))
        name = p.parent
    return chain


def format_lineage(chain: list[LineageStep]) -> str:
    lines = []
    for step in chain:
        p, rm = step.policy, step.reward_model
        line = f"{p.name} (round {p.round}) parent={p.parent or '-'}"
        if rm is not None:
            line += f" reward_model={rm.name} (votes {rm.n_votes}, warm start from {rm.parent or 'SFT'})"
        win = p.metrics.get("win_rate_vs_sft")
        if win is not None:
            low, high = p.metrics["ci95"]
            line += f" {p.metrics.get('judge', 'gold')} win rate vs SFT {win:.3f} [{low:.3f}, {high:.3f}]"
        if p.metrics.get("unchanged"):
            line += UNCHANGED
        lines.append(line + f"  {p.path}")
    return "\n".join(lines)


def status_text(session: Session, loop: LoopRun) -> str:
    """`rlhf loop status`: each round's finished phases, tasks, votes, reward model and policy; the leaderboard."""
    from rlhf.feedback.leaderboard import format_leaderboard, loop_leaderboard

    done = finished_phases(session, loop)
    rms = {r.round: r for r in reward_models(session, loop)}
    versions = {p.round: p for p in policies(session, loop)}
    rounds = sorted({r for r, _ in done if r > 0})
    lines = [
        f"loop {loop.name}: {len(rounds)} round(s) started, {len(versions) - 1} policy version(s) after SFT"
    ]
    for r in rounds:
        phases = [p for (rr, p) in done if rr == r]
        tasks, votes = round_counts(session, loop.name, r)
        line = f"round {r}: phases {','.join(phases)}; tasks {tasks}, votes {votes}"
        selection = done.get((r, "tasks"), {})
        if selection:
            line += f" ({selection['active_pairs']} active, {selection['random_pairs']} random pairs)"
        if r in rms:
            rm = rms[r]
            gold = rm.metrics.get("gold/rm_accuracy")
            # votes of loop.extra_projects (production A/B votes), counted per project in the metrics
            extra = [f"{n} of project {k.removeprefix('votes/')}" for k, n in rm.metrics.items()
                     if k.startswith("votes/") and k != f"votes/{loop.name}"]  # fmt: skip
            line += (
                f"; {rm.name} on {rm.n_votes} votes"
                + (f" ({', '.join(extra)})" if extra else "")
                + (f" (gold accuracy {gold:.3f})" if gold is not None else "")
            )
        if r in versions:
            p = versions[r]
            low, high = p.metrics["ci95"]
            line += f"; policy {p.name}: win rate vs SFT {p.metrics['win_rate_vs_sft']:.3f} [{low:.3f}, {high:.3f}]"
            line += UNCHANGED if p.metrics.get("unchanged") else ""
        lines.append(line)
    lines += ["", "leaderboard (Bradley-Terry over cross-version votes and evaluations; SFT = 0):"]
    lines.append(format_leaderboard(loop_leaderboard(session, loop)))
    return "\n".join(lines)
