"""A/B pairs through the API land in the feedback store as production votes with both policy versions."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from rlhf.feedback.db import Database
from rlhf.feedback.errors import Conflict
from rlhf.feedback.export import export_records
from rlhf.feedback.models import Completion, Prompt, Task, TaskCompletion, User, Vote
from rlhf.models.loading import load_tokenizer
from rlhf.serve import feedback as ab
from rlhf.serve.main import create_app
from rlhf.serve.settings import Settings

HELLO = [{"role": "user", "content": "Hello!"}]


def _ab_pair(client: openai.OpenAI, **kwargs: Any) -> Any:
    """An A/B response that made a pair (two identical short answers make none: try again)."""
    for _ in range(10):
        out = _ab_chat(client, **kwargs)
        if "feedback_id" in (out.model_extra or {}):
            return out
    raise AssertionError("ten A/B responses with identical answers")


def _ab_chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=8,
        extra_body={"ab": True},
        **kwargs,  # type: ignore[arg-type]
    )


def _vote(
    server: dict[str, Any], out: Any = None, headers: dict[str, str] | None = None, **body: Any
) -> httpx.Response:
    """POST /v1/feedback; with `out` (an A/B response), its feedback id and token go with the vote."""
    if out is not None:
        extra = out.model_extra or {}
        body = {"feedback_id": extra["feedback_id"], "feedback_token": extra["feedback_token"], **body}
    # Votes are limited per client address as well: unless a test says, each comes from an address of its own.
    headers = headers or {"X-Forwarded-For": f"10.9.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"}
    return httpx.post(server["url"] + "/v1/feedback", json=body, timeout=30, headers=headers)


def _key() -> str:
    return "key-" + uuid.uuid4().hex


def test_ab_vote_lands_in_the_store_with_both_policy_versions(
    client: openai.OpenAI, server: dict[str, Any]
) -> None:
    out = _ab_chat(client, seed=5, user="alice")
    feedback_id = out.model_extra["feedback_id"]
    assert feedback_id and [c.index for c in out.choices] == [0, 1]
    key = _key()
    r = _vote(server, out, choice="B", idempotency_key=key)
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
    # a NUL the byte-level model sampled is stored as U+FFFD (PostgreSQL stores no NUL)
    assert [a.text.lstrip() for a in answers] == [
        c.message.content.replace("\x00", "\ufffd") for c in out.choices
    ]
    assert sorted(a.policy for a in answers) == sorted([state.main.version, state.candidate.version])
    assert all(a.sampling["max_new_tokens"] == 8 and a.sampling["temperature"] == 1.0 for a in answers)
    assert {a.sampling["seed"] for a in answers} == {5, 6}


def test_retry_with_the_same_key_counts_once(client: openai.OpenAI, server: dict[str, Any]) -> None:
    out = _ab_chat(client, user="bob")
    feedback_id = out.model_extra["feedback_id"]
    key = _key()
    first = _vote(server, out, choice="A", user="bob", idempotency_key=key)
    retry = _vote(server, out, choice="A", user="bob", idempotency_key=key)
    assert first.status_code == retry.status_code == 200
    assert retry.json()["replayed"] is True and retry.json()["vote_id"] == first.json()["vote_id"]
    # a second vote on the same pair with a new key is refused: one vote per A/B pair
    again = _vote(server, out, choice="B", user="bob", idempotency_key=_key())
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


def test_votes_are_rate_limited_per_user_and_address(client: openai.OpenAI, server: dict[str, Any]) -> None:
    limit = server["votes_per_minute"]
    carol = {"X-Forwarded-For": "10.0.0.1"}
    statuses = []
    for _ in range(limit + 1):
        out = _ab_pair(client, max_completion_tokens=4, user="carol")
        statuses.append(_vote(server, out, carol, choice="tie", idempotency_key=_key()))
    assert [r.status_code for r in statuses] == [200] * limit + [429]
    assert (
        statuses[-1].json()["error"]["code"] == "rate_limit_exceeded"
        and "Retry-After" in statuses[-1].headers
    )
    # a new user name from the same address does not get around the limit
    out = _ab_pair(client, max_completion_tokens=4, user="carol2")
    assert _vote(server, out, carol, choice="A", idempotency_key=_key()).status_code == 429
    # carol from another address is still over her own limit; another user elsewhere is not affected
    out = _ab_pair(client, max_completion_tokens=4, user="carol")
    assert (
        _vote(server, out, {"X-Forwarded-For": "10.0.0.2"}, choice="A", idempotency_key=_key()).status_code
        == 429
    )
    out = _ab_pair(client, max_completion_tokens=4, user="dave")
    assert (
        _vote(
            server, out, {"X-Forwarded-For": "10.0.0.3"}, choice="both_bad", idempotency_key=_key()
        ).status_code
        == 200
    )


def test_a_vote_needs_the_token_sent_with_the_response(client: openai.OpenAI, server: dict[str, Any]) -> None:
    out = _ab_pair(client, max_completion_tokens=4, user="frank")
    feedback_id = out.model_extra["feedback_id"]
    forged = _vote(
        server, feedback_id=feedback_id, feedback_token="0" * 64, choice="A", idempotency_key=_key()
    )
    assert forged.status_code == 403
    missing = _vote(server, feedback_id=feedback_id, choice="A", idempotency_key=_key())
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "feedback_token"
    other_user = _vote(server, out, choice="A", user="mallory", idempotency_key=_key())
    assert other_user.status_code == 403
    db = Database(server["db_url"])
    with db.session() as session:  # refused votes made no store user
        names = set(session.scalars(select(User.name)))
    db.dispose()
    assert "prod.frank" not in names and "prod.mallory" not in names
    assert _vote(server, out, choice="A", idempotency_key=_key()).status_code == 200


def test_refused_votes_create_no_user(client: openai.OpenAI, server: dict[str, Any]) -> None:
    out = _ab_pair(client, max_completion_tokens=4)
    assert (
        _vote(server, out, {"X-Forwarded-For": "10.0.0.9"}, choice="A", idempotency_key=_key()).status_code
        == 200
    )
    for i in range(3):  # a taken pair, from users the response was not made for
        r = _vote(
            server, out, {"X-Forwarded-For": "10.0.0.9"}, choice="B", user=f"ghost{i}", idempotency_key=_key()
        )
        assert r.status_code == 403
    r = _vote(server, out, {"X-Forwarded-For": "10.0.0.9"}, choice="B", idempotency_key=_key())
    assert r.status_code == 409
    db = Database(server["db_url"])
    with db.session() as session:
        names = set(session.scalars(select(User.name)))
    db.dispose()
    assert not any(n.startswith("prod.ghost") for n in names)


def test_labelers_cannot_take_or_see_production_pairs(
    client: openai.OpenAI, server: dict[str, Any], tmp_path: Any
) -> None:
    """The labeling app on the same store: the production project is not listed for labelers, opening it
    takes nothing, voting on its task is refused, and the end user's vote then succeeds."""
    from fastapi.testclient import TestClient

    from rlhf.feedback import users
    from rlhf.feedback.main import create_app
    from rlhf.feedback.settings import Settings

    out = _ab_pair(client, max_completion_tokens=4, user="gina")
    db = Database(server["db_url"])
    with db.session() as session:
        users.create_user(session, "labeler1", "labeler")
        token = users.create_token(session, "labeler1")
        task_id = session.scalar(
            select(Task.id)
            .join(Prompt, Prompt.id == Task.prompt_id)
            .where(Prompt.external_id == out.model_extra["feedback_id"])
        )
    db.dispose()
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(Settings(db=server["db_url"]))) as app:
        assert "production" not in [p["name"] for p in app.get("/api/projects", headers=auth).json()]
        r = app.post("/api/tasks/next", params={"project": "production"}, headers=auth)
        assert r.status_code == 403
        r = app.post("/api/tasks/next", headers=auth)
        assert r.status_code == 200 and r.json()["task"] is None
        vote = {"task_id": task_id, "choice": "A", "idempotency_key": _key()}
        assert app.post("/api/votes", json=vote, headers=auth).status_code == 403
        vote = {**vote, "idempotency_key": _key(), "source": "production"}
        assert app.post("/api/votes", json=vote, headers=auth).status_code == 422
    assert _vote(server, out, choice="B", idempotency_key=_key()).status_code == 200


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
    last = chunks[-1].model_extra
    body = {"feedback_id": last["feedback_id"], "feedback_token": last["feedback_token"]}
    r = _vote(server, **body, choice="A", idempotency_key=_key())
    assert r.status_code == 200 and r.json()["replayed"] is False


def test_a_vote_that_loses_the_race_for_a_first_pair_keeps_the_winners(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two votes on a new user's first pair at once (a double click): the second finds no account, then the
    first makes it and votes. The second must not take the account it did not make, and the first's
    acknowledged vote with it (ON DELETE CASCADE), when its own vote is refused."""
    store = ab.FeedbackStore(f"sqlite:///{tmp_path}/fb.db", "production", 60)
    answers = (ab.Answer("yes", "v1", {}), ab.Answer("no", "v2", {}))
    assert ab.save_ab_pair(store, "ab-1", "Hi?", answers, {"request_user": "ann"})
    token = store.token("ab-1")
    make_account = ab._production_user

    def first_request_wins_meanwhile(session: Any, name: str) -> Any:
        monkeypatch.setattr(ab, "_production_user", make_account)
        ab.record_ab_vote(store, "ab-1", token, "A", "key-first", user="ann", client="10.0.0.1")
        return make_account(session, name)

    monkeypatch.setattr(ab, "_production_user", first_request_wins_meanwhile)
    with pytest.raises(Conflict):
        ab.record_ab_vote(store, "ab-1", token, "B", "key-second", user="ann", client="10.0.0.2")
    with store.db.session() as session:
        votes = session.execute(select(Vote.choice, User.name).join(User, User.id == Vote.user_id)).all()
    store.close()
    assert [tuple(v) for v in votes] == [("A", "prod.ann")]


def test_an_end_user_name_the_store_cannot_hold_gets_an_account_it_can() -> None:
    """A client's `user` of 222 characters or of other characters became a store user the store's names refuse
    (on PostgreSQL, a name over 64 characters fails the vote with a 500): such a user gets a digest of it."""
    import re

    from rlhf.feedback.schemas import NAME_PATTERN

    assert ab._account_name("bob") == "prod.bob"
    for user in ("<svg onload=alert(1)> " + "x" * 200, "x" * 60):
        name = ab._account_name(user)
        assert re.fullmatch(NAME_PATTERN, name) and name == ab._account_name(user) != ab._account_name(
            user + "!"
        )


def test_votes_sent_together_cannot_all_pass_the_rate_limit(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit was checked before a vote's transaction and counted after it: 60 votes sent at once from one
    address got 37 through a limit of 30. Here a second vote arrives while the first is being written (with a
    limit of one a minute): it must be refused, and the first kept."""
    from rlhf.feedback.errors import RateLimited

    store = ab.FeedbackStore(f"sqlite:///{tmp_path}/fb.db", "production", 1)
    for i, user in enumerate(("ann", "bob")):
        answers = (ab.Answer("yes", "v1", {}), ab.Answer("no", "v2", {}))
        assert ab.save_ab_pair(store, f"ab-{i}", "Hi?", answers, {"request_user": user})
    make_account = ab._production_user
    meanwhile: list[object] = []

    def another_vote_arrives(session: Any, name: str) -> Any:
        monkeypatch.setattr(ab, "_production_user", make_account)
        try:
            ab.record_ab_vote(
                store, "ab-1", store.token("ab-1"), "A", "key-bob-1", user="bob", client="10.0.0.1"
            )
        except RateLimited as e:
            meanwhile.append(e)
        return make_account(session, name)

    monkeypatch.setattr(ab, "_production_user", another_vote_arrives)
    assert ab.record_ab_vote(
        store, "ab-0", store.token("ab-0"), "B", "key-ann-1", user="ann", client="10.0.0.1"
    ).created
    with store.db.session() as session:
        votes = session.execute(select(Vote.choice, User.name).join(User, User.id == Vote.user_id)).all()
    store.close()
    assert len(meanwhile) == 1 and [tuple(v) for v in votes] == [("B", "prod.ann")]


def test_ab_candidate_reads_the_chat_in_its_own_template(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A candidate with another chat template answers the chat rendered by that template, as it would alone."""
    candidate_dir = tmp_path / "candidate"
    shutil.copytree(model_dirs["policy"], candidate_dir)  # the same weights: only the template differs
    tokenizer = load_tokenizer(str(candidate_dir))
    tokenizer.chat_template = (
        "{% for m in messages %}{{ 'Human: ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Bot:' }}{% endif %}"
    )
    tokenizer.save_pretrained(candidate_dir)
    settings = Settings(
        model_dir=str(model_dirs["policy"]),
        model_name="tiny",
        candidate_model=str(candidate_dir),
        candidate_name="tiny-human",
        feedback_db=f"sqlite:///{tmp_path}/feedback.db",
        ab_rate=1.0,
    )
    body = {"messages": HELLO, "max_tokens": 3, "temperature": 0, "logprobs": True}

    def logprobs(choice: dict[str, Any]) -> list[float]:
        return [t["logprob"] for t in choice["logprobs"]["content"]]

    with TestClient(create_app(settings)) as http:
        alone = [
            http.post("/v1/chat/completions", json={**body, "model": m}).json()
            for m in ("tiny", "tiny-human")
        ]
        pair = http.post("/v1/chat/completions", json={**body, "model": "tiny", "ab": True}).json()
    assert logprobs(alone[0]["choices"][0]) != logprobs(alone[1]["choices"][0])
    assert sorted(logprobs(c) for c in pair["choices"]) == sorted(logprobs(a["choices"][0]) for a in alone)
