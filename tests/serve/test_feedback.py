"""A/B pairs through the API land in the feedback store as production votes with both policy versions."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import openai
from sqlalchemy import func, select

from rlhf.feedback.db import Database
from rlhf.feedback.export import export_records
from rlhf.feedback.models import Completion, Prompt, Task, TaskCompletion, User, Vote

HELLO = [{"role": "user", "content": "Hello!"}]


def _ab_chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=8,
        extra_body={"ab": True},
        **kwargs,  # type: ignore[arg-type]
    )


def _vote(server: dict[str, Any], **body: Any) -> httpx.Response:
    return httpx.post(server["url"] + "/v1/feedback", json=body, timeout=30)


def _key() -> str:
    return "key-" + uuid.uuid4().hex


def test_ab_vote_lands_in_the_store_with_both_policy_versions(
    client: openai.OpenAI, server: dict[str, Any]
) -> None:
    out = _ab_chat(client, seed=5)
    feedback_id = out.model_extra["feedback_id"]
    assert feedback_id and [c.index for c in out.choices] == [0, 1]
    key = _key()
    r = _vote(server, feedback_id=feedback_id, choice="B", user="alice", idempotency_key=key)
    assert r.status_code == 200, r.text
    assert r.json()["replayed"] is False and r.json()["choice"] == "B"

    state = server["state"]
    db = Database(server["db_url"])
    with db.session() as session:
        vote = session.scalar(select(Vote).where(Vote.idempotency_key == key))
        assert vote is not None and vote.source == "production" and vote.choice == "B"
        assert session.get(User, vote.user_id).name == "prod.alice"  # type: ignore[union-attr]
        task = session.get(Task, vote.task_id)
        assert task is not None and task.kind == "pairwise"
        prompt = session.get(Prompt, task.prompt_id)
        assert prompt is not None and prompt.external_id == feedback_id
        assert prompt.text == "User: Hello!\nAssistant:" and prompt.meta["source"] == "production"
        answers = session.scalars(
            select(Completion)
            .join(TaskCompletion, TaskCompletion.completion_id == Completion.id)
            .where(TaskCompletion.task_id == task.id)
            .order_by(TaskCompletion.position)
        ).all()
    db.dispose()
    # answer A is choice 0 of the response, B choice 1; one from the policy, one from the candidate
    assert [a.text.lstrip() for a in answers] == [c.message.content for c in out.choices]
    assert sorted(a.policy for a in answers) == sorted([state.main.version, state.candidate.version])
    assert all(a.sampling["max_new_tokens"] == 8 and a.sampling["temperature"] == 1.0 for a in answers)
    assert {a.sampling["seed"] for a in answers} == {5, 6}


def test_retry_with_the_same_key_counts_once(client: openai.OpenAI, server: dict[str, Any]) -> None:
    feedback_id = _ab_chat(client).model_extra["feedback_id"]
    key = _key()
    first = _vote(server, feedback_id=feedback_id, choice="A", user="bob", idempotency_key=key)
    retry = _vote(server, feedback_id=feedback_id, choice="A", user="bob", idempotency_key=key)
    assert first.status_code == retry.status_code == 200
    assert retry.json()["replayed"] is True and retry.json()["vote_id"] == first.json()["vote_id"]
    # a second vote on the same pair with a new key is refused: one vote per A/B pair
    again = _vote(server, feedback_id=feedback_id, choice="B", user="bob", idempotency_key=_key())
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict_error"
    db = Database(server["db_url"])
    with db.session() as session:
        task_id = session.scalar(
            select(Task.id).join(Prompt, Prompt.id == Task.prompt_id).where(Prompt.external_id == feedback_id)
        )
        assert session.scalar(select(func.count()).select_from(Vote).where(Vote.task_id == task_id)) == 1
        records = export_records(session, "production", "votes")
    db.dispose()
    mine = [r for r in records if r["meta"]["prompt_id"] == feedback_id]
    assert len(mine) == 1 and mine[0]["choice"] == "A" and mine[0]["meta"]["source"] == "production"


def test_votes_are_rate_limited_per_user(client: openai.OpenAI, server: dict[str, Any]) -> None:
    limit = server["votes_per_minute"]
    statuses = []
    for _ in range(limit + 1):
        feedback_id = _ab_chat(client, max_completion_tokens=2).model_extra["feedback_id"]
        statuses.append(
            _vote(server, feedback_id=feedback_id, choice="tie", user="carol", idempotency_key=_key())
        )
    assert [r.status_code for r in statuses] == [200] * limit + [429]
    assert (
        statuses[-1].json()["error"]["code"] == "rate_limit_exceeded"
        and "Retry-After" in statuses[-1].headers
    )
    # another user is not affected
    feedback_id = _ab_chat(client, max_completion_tokens=2).model_extra["feedback_id"]
    assert (
        _vote(
            server, feedback_id=feedback_id, choice="both_bad", user="dave", idempotency_key=_key()
        ).status_code
        == 200
    )


def test_ab_by_header_and_in_a_stream(client: openai.OpenAI, server: dict[str, Any]) -> None:
    plain = client.completions.create(model="tiny", prompt="User: hi\nAssistant:", max_tokens=4)
    assert len(plain.choices) == 1 and "feedback_id" not in (plain.model_extra or {})
    by_header = client.completions.create(
        model="tiny", prompt="User: hi\nAssistant:", max_tokens=4, extra_headers={"X-RLHF-AB": "1"}
    )
    assert len(by_header.choices) == 2 and by_header.model_extra["feedback_id"]
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=4, stream=True, extra_body={"ab": True}
        )  # type: ignore[arg-type]
    )
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    feedback_id = chunks[-1].model_extra["feedback_id"]
    r = _vote(server, feedback_id=feedback_id, choice="A", user="erin", idempotency_key=_key())
    assert r.status_code == 200 and r.json()["replayed"] is False
