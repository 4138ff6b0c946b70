"""Import existing preference records (any layout of docs/formats.md) into a project as one labeler's votes.

Each record becomes the tasks a labeler would have answered, with that answer recorded through the same path as
a vote from the app (`write_vote`): a pair or a vote -> a pairwise task (chosen first, voted "A"); a ranking -> a
ranking task; ratings -> one rating task each, under one prompt per distinct prompt text, so `export --format
pairs` compares them as it compares a labeler's ratings. Conversational records keep their prompt messages in
the prompt's meta (`prompt_messages`, shown to labelers as text), so they export as conversational pairs again.

Everything is written in one transaction. Each vote's idempotency key is derived from the project, the labeler
and the record (and its repeat count in the file), so importing the same file twice adds nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from rlhf.data.preferences import (
    ConversationalPair,
    Feedback,
    PairwiseVote,
    PreferencePair,
    Ranking,
    Rating,
    Record,
)
from rlhf.errors import DataError
from rlhf.feedback.db import db_of
from rlhf.feedback.export import PROMPT_MESSAGES
from rlhf.feedback.importer import _insert_ids, get_or_create_project
from rlhf.feedback.models import Completion, Prompt, Task, TaskCompletion, User, Vote
from rlhf.feedback.schemas import MAX_AXES, CandidateRow, VoteIn
from rlhf.feedback.votes import write_vote

log = logging.getLogger(__name__)

SOURCE = "import"  # Vote.source of imported votes


@dataclass
class PreferenceImport:
    project: str
    labeler: str
    prompts: int = 0
    completions: int = 0
    tasks: int = 0
    votes: int = 0
    already: int = 0  # records imported before (same project, labeler and record)
    gold: int = 0  # votes on gold items left out: a check of their labeler, not a preference
    skipped: list[str] = field(default_factory=list)  # messages of the malformed rows left out


@dataclass
class _Entry:
    prompt: str
    meta: dict[str, Any]
    kind: str  # pairwise, ranking or rating
    texts: list[str]
    vote: VoteIn


def import_preferences(
    session: Session,
    project_name: str,
    labeler: str,
    records: Sequence[tuple[str, Record]],
    *,
    skipped: list[str] | None = None,
    meta_as_note: bool = False,
) -> PreferenceImport:
    """Store ("source:row", record) pairs as `labeler`'s votes in `project_name` (both created if missing).

    Votes on gold items (`meta.is_gold`, as a votes export marks them) are left out and counted: they check a
    labeler against a known answer, and training skips them too (rlhf.data.preferences.to_groups). A record
    the store cannot hold (an empty prompt, a negative margin, a text over the size limit, ...) is a
    DataError naming its source:row, or, given a `skipped` list (which may already hold the reader's), is
    appended there and left out. Nothing is written unless every kept record is. `meta_as_note`: a vote
    record's meta (an AI judge's principle, say) is kept as the vote's note, in JSON.
    """
    raters = sorted({r.labeler for _, r in records if isinstance(r, Rating) and r.labeler is not None})
    if len(raters) > 1:  # one labeler's ratings are compared with each other, never with another's
        source = records[0][0].rsplit(":", 1)[0]
        raise DataError(f"{source}: ratings by {len(raters)} labelers ({', '.join(raters[:3])}"
                        f"{', ...' if len(raters) > 3 else ''}): stored as --labeler {labeler}'s, their scales would be "
                        "compared with each other; import each labeler's ratings apart, as that labeler")  # fmt: skip
    result = PreferenceImport(project_name, labeler, skipped=skipped if skipped is not None else [])
    entries: list[_Entry] = []
    repeats: Counter[str] = Counter()
    for where, record in records:
        if (getattr(record, "meta", None) or {}).get("is_gold") is True:  # as training leaves them out
            result.gold += 1
            continue
        try:
            entry = _entry(record, where, meta_as_note)
        except DataError as error:
            if skipped is None:
                raise
            result.skipped.append(str(error))
            continue
        answer = entry.vote.model_dump(mode="json", exclude={"idempotency_key"})
        content = json.dumps([project_name, labeler, answer, entry.prompt, entry.meta, entry.texts])
        repeats[content] += 1
        digest = hashlib.sha256(f"{content}\n{repeats[content]}".encode()).hexdigest()[:48]
        entry.vote = entry.vote.model_copy(update={"idempotency_key": f"{SOURCE}:{digest}"})
        entries.append(entry)

    result.skipped.sort(key=_row_number)  # the reader's and ours, in file order
    with db_of(session).write(session):
        project = get_or_create_project(session, project_name)
        # the judgement axes the votes carry become the project's too, so that they are stored and exported
        carried = [axis for e in entries for axis in e.vote.axes or {}]
        added = [axis for axis in dict.fromkeys(carried) if axis not in (project.axes or [])]
        if added:
            if len(project.axes or []) + len(added) > MAX_AXES:
                raise DataError(f"{project_name}: the votes carry judgement axes {added}, which would give the project "
                                f"more than {MAX_AXES}")  # fmt: skip
            project.axes = [*(project.axes or []), *added]
            session.flush()
            log.info(
                "project %s: judgement axes %s added, as the imported votes carry them", project_name, added
            )
        user = session.scalar(select(User).where(User.name == labeler))
        if user is None:
            user = User(name=labeler, role="labeler", password_hash=None)
            session.add(user)
            session.flush()
        known = set(
            session.scalars(
                select(Vote.idempotency_key).where(
                    Vote.user_id == user.id, Vote.idempotency_key.like(f"{SOURCE}:%")
                )
            )
        )
        new = [e for e in entries if e.vote.idempotency_key not in known]
        result.already = len(entries) - len(new)
        prompt_keys = list(dict.fromkeys(_prompt_key(e) for e in new))
        prompt_rows = [
            {"project_id": project.id, "text": text, "external_id": None, "meta": json.loads(meta)}
            for text, meta in prompt_keys
        ]
        prompt_ids = dict(zip(prompt_keys, _insert_ids(session, Prompt, prompt_rows), strict=True))
        completion_rows = [
            {"prompt_id": prompt_ids[_prompt_key(e)], "text": text, "policy": "", "sampling": {}}
            for e in new
            for text in e.texts
        ]
        completion_ids = iter(_insert_ids(session, Completion, completion_rows))
        members = [[next(completion_ids) for _ in e.texts] for e in new]
        task_rows = [
            {"project_id": project.id, "prompt_id": prompt_ids[_prompt_key(e)], "kind": e.kind, "is_gold": False,
             "gold_choice": None, "n_completions": len(e.texts), "n_assigned": 0}
            for e in new
        ]  # fmt: skip
        task_ids = _insert_ids(session, Task, task_rows)
        links = [
            {"task_id": tid, "position": pos, "completion_id": cid}
            for tid, ids in zip(task_ids, members, strict=True)
            for pos, cid in enumerate(ids)
        ]
        if links:
            session.execute(insert(TaskCompletion), links)
        conn = session.connection()
        for tid, e in zip(task_ids, new, strict=True):
            write_vote(session, user, e.vote.model_copy(update={"task_id": tid}), SOURCE, conn)
        result.prompts, result.tasks, result.votes = len(prompt_keys), len(task_ids), len(task_ids)
        result.completions = sum(len(m) for m in members)
    log.info("imported preferences into %s as %s: %s", project_name, labeler, result)
    return result


def prompt_text(messages: list[dict[str, str]]) -> str:
    """A conversation as the text labelers see: one user turn as itself, more as "role: content" blocks."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _row_number(message: str) -> int:
    """The row of a "source:row: what is wrong" message (0 if it names none)."""
    row = message.split(": ", 1)[0].rsplit(":", 1)[-1]
    return int(row) if row.isdigit() else 0


def _prompt_key(e: _Entry) -> tuple[str, str]:
    return e.prompt, json.dumps(e.meta, sort_keys=True)


def _entry(record: Record, where: str, meta_as_note: bool = False) -> _Entry:
    """The task and answer a record stands for, checked against the store's limits (DataError naming `where`)."""
    meta: dict[str, Any] = {}
    answer: dict[str, Any]
    if isinstance(record, ConversationalPair):
        replies = []
        for name, reply in (("chosen", record.chosen), ("rejected", record.rejected)):
            if len(reply) != 1 or reply[0].role != "assistant":
                raise DataError(f"{where}: '{name}' must be one assistant message to be labeled")
            replies.append(reply[0].content)
        messages = [asdict(m) for m in record.prompt]
        prompt, meta = prompt_text(messages), {PROMPT_MESSAGES: messages}
        kind, texts, answer = "pairwise", replies, {"choice": "A", "margin": record.margin}
    elif isinstance(record, PreferencePair):
        prompt, kind, texts = record.prompt, "pairwise", [record.chosen, record.rejected]
        answer = {"choice": "A", "margin": record.margin}
    elif isinstance(record, PairwiseVote):
        prompt, kind, texts = record.prompt, "pairwise", [record.completion_a, record.completion_b]
        answer = {"choice": record.choice, "margin": record.margin}
        if record.meta.get("axes"):  # per-axis judgements, as the app's votes export writes them
            answer["axes"] = record.meta["axes"]
        if meta_as_note and record.meta:
            answer["note"] = json.dumps(record.meta, sort_keys=True)
    elif isinstance(record, Ranking):
        distinct = sorted(set(record.ranking))  # dense ranks: the store takes ranks 1..K
        prompt, kind, texts = record.prompt, "ranking", record.completions
        answer = {"ranking": [distinct.index(r) + 1 for r in record.ranking]}
    elif isinstance(record, Rating):
        prompt, kind, texts, answer = record.prompt, "rating", [record.completion], {"rating": record.rating}
    elif isinstance(record, Feedback):
        raise DataError(f"{where}: a feedback record (one answer judged good or bad) has no task kind in the "
                        "labeling store; train on the file with KTO (rlhf dpo --set dpo.loss=kto)")  # fmt: skip
    else:
        raise TypeError(f"not a preference record: {type(record).__name__}")
    if isinstance(record, ConversationalPair | PreferencePair) and texts[0] == texts[1]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same text, so neither can be preferred")
    if isinstance(record, PairwiseVote) and texts[0] == texts[1]:  # training reads such a vote as no pair
        raise DataError(
            f"{where}: 'completion_a' and 'completion_b' are the same text: no task compares them"
        )
    try:
        CandidateRow.model_validate({"prompt": prompt, "completions": [{"text": t} for t in texts]})
        vote = VoteIn.model_validate({"task_id": 1, "idempotency_key": "pending-key", **answer})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "row"
        raise DataError(f"{where}: {loc}: {err['msg']}") from None
    return _Entry(prompt, meta, kind, list(texts), vote)
