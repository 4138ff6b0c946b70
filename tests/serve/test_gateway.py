"""rlhf/serve/gateway.py in front of `rlhf serve`, driven by the official openai client: requests pass
through, A/B pairs come from two upstream answers, and votes land in the gateway's feedback store."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from rlhf.errors import ConfigError
from rlhf.feedback.db import Database
from rlhf.feedback.export import export_records
from rlhf.feedback.models import Completion, Project, Prompt, Task, TaskCompletion, Vote
from rlhf.serve.gateway import GatewaySettings, create_app
from tests.serve.conftest import run_app

HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def gateway(server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The gateway with a store of its own; A/B pairs compare "tiny" with "tiny-candidate" upstream."""
    db_url = f"sqlite:///{tmp_path_factory.mktemp('gateway')}/feedback.db"
    settings = GatewaySettings(
        upstream=server["url"] + "/v1",
        candidate_model="tiny-candidate",
        feedback_db=db_url,
        ab_rate=1.0,
        seed=0,
    )
    with run_app(create_app(settings)) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield {"url": url, "db_url": db_url, "client": client}


def test_plain_chat_and_completions_pass_through(gateway: dict[str, Any]) -> None:
    client: openai.OpenAI = gateway["client"]
    out = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, seed=3)  # type: ignore[arg-type]
    assert out.model == "tiny" and len(out.choices) == 1 and out.usage is not None
    assert "feedback_id" not in (out.model_extra or {})
    again = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, seed=3)  # type: ignore[arg-type]
    assert again.choices[0].message.content == out.choices[0].message.content  # seeded: the engine answered
    text = client.completions.create(model="tiny", prompt="Hello", max_tokens=4)
    assert text.object == "text_completion" and text.usage is not None and text.usage.completion_tokens >= 1
    assert {m.id for m in client.models.list()} == {"tiny", "tiny-candidate"}


def test_one_model_is_retrieved_through_the_gateway_as_from_the_engine(gateway: dict[str, Any]) -> None:
    client: openai.OpenAI = gateway["client"]
    assert client.models.retrieve("tiny-candidate").id == "tiny-candidate"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")  # the engine's own 404, passed through
    # a dot segment would reach the engine's other paths: refused here
    raw = httpx.get(gateway["url"] + "/v1/models/tiny/%2E%2E/%2E%2E/healthz", timeout=30)
    assert raw.status_code == 404 and raw.json()["error"]["code"] == "model_not_found"


def test_streamed_chat_passes_through(gateway: dict[str, Any]) -> None:
    client: openai.OpenAI = gateway["client"]
    chunks = list(
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, stream=True)  # type: ignore[arg-type]
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert {c.choices[0].index for c in chunks if c.choices} == {0}


def _ab_pair(client: openai.OpenAI, **kwargs: Any) -> Any:
    """An A/B response that made a pair (two identical short answers make none: try again)."""
    for _ in range(10):
        out = client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            max_tokens=8,
            extra_body={"ab": True},
            **kwargs,  # type: ignore[arg-type]
        )
        if "feedback_id" in (out.model_extra or {}):
            return out
    raise AssertionError("ten A/B responses with identical answers")


def test_ab_pair_and_vote_land_in_the_store_with_both_versions(
    gateway: dict[str, Any], server: dict[str, Any]
) -> None:
    out = _ab_pair(gateway["client"], user="alice")
    extra = out.model_extra
    assert [c.index for c in out.choices] == [0, 1] and out.model == "tiny"
    key = "gw-" + uuid.uuid4().hex
    body = {"feedback_id": extra["feedback_id"], "feedback_token": extra["feedback_token"], "choice": "A"}
    r = httpx.post(gateway["url"] + "/v1/feedback", json={**body, "idempotency_key": key}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["replayed"] is False

    state = server["state"]  # the upstream's versions (name@digest) are what the pair records
    db = Database(gateway["db_url"])
    with db.session() as session:
        vote = session.scalar(select(Vote).where(Vote.idempotency_key == key))
        assert vote is not None and vote.source == "production" and vote.choice == "A"
        task = session.get(Task, vote.task_id)
        assert task is not None
        prompt = session.get(Prompt, task.prompt_id)
        assert prompt is not None and prompt.external_id == extra["feedback_id"]
        assert prompt.text == "user: Hello!" and prompt.meta["request_user"] == "alice"
        assert prompt.meta["prompt_messages"] == HELLO  # the conversation, for any model's chat template
        project = session.get(Project, prompt.project_id)
        assert project is not None
        exported = [p for p in export_records(session, project.name, "pairs") if p["prompt"] == HELLO]
        # the votes format keeps the conversation under meta, where the reward model renders it (to_groups)
        voted = [v for v in export_records(session, project.name, "votes") if v["meta"]["task_id"] == task.id]
        assert [v["meta"]["prompt_messages"] for v in voted] == [HELLO]
        answers = session.scalars(
            select(Completion)
            .join(TaskCompletion, TaskCompletion.completion_id == Completion.id)
            .where(TaskCompletion.task_id == task.id)
            .order_by(TaskCompletion.position)
        ).all()
    db.dispose()
    # as the client got them, a NUL the byte-level model sampled stored as U+FFFD (PostgreSQL stores no NUL)
    assert [a.text for a in answers] == [c.message.content.replace("\x00", "\ufffd") for c in out.choices]
    # the vote chose A: exported as a conversational pair, the answers as assistant turns
    assert {"prompt": HELLO, "chosen": [{"role": "assistant", "content": answers[0].text}],
            "rejected": [{"role": "assistant", "content": answers[1].text}]} in exported  # fmt: skip
    assert sorted(a.policy for a in answers) == sorted([state.main.version, state.candidate.version])
    assert all(a.sampling["max_new_tokens"] == 8 for a in answers)


def test_ab_pair_in_a_stream(gateway: dict[str, Any]) -> None:
    client: openai.OpenAI = gateway["client"]
    for _ in range(10):
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=HELLO, max_tokens=8, stream=True, extra_body={"ab": True},  # type: ignore[arg-type]
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        if "feedback_id" in (chunks[-1].model_extra or {}):
            break
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens >= 2
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    db = Database(gateway["db_url"])
    with db.session() as session:
        task_id = session.scalar(
            select(Task.id)
            .join(Prompt, Prompt.id == Task.prompt_id)
            .where(Prompt.external_id == last.model_extra["feedback_id"])
        )
        stored = session.scalars(
            select(Completion.text)
            .join(TaskCompletion, TaskCompletion.completion_id == Completion.id)
            .where(TaskCompletion.task_id == task_id)
            .order_by(TaskCompletion.position)
        ).all()
    db.dispose()
    assert list(stored) == [texts[0], texts[1]] and texts[0] != texts[1]


def test_logprobs_pass_through_plain_ab_and_streamed(gateway: dict[str, Any]) -> None:
    """The gateway neither strips nor refuses logprobs: the engine's come back on every side of a pair."""
    client: openai.OpenAI = gateway["client"]
    out = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=4, logprobs=True, top_logprobs=2
    )  # type: ignore[arg-type]
    content = out.choices[0].logprobs.content if out.choices[0].logprobs else None
    assert content and all(len(e.top_logprobs) == 2 for e in content)
    pair = _ab_pair(client, logprobs=True, top_logprobs=2)
    assert all(c.logprobs is not None and c.logprobs.content for c in pair.choices)
    text = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=4, logprobs=1, extra_body={"ab": True}
    )
    assert all(c.logprobs is not None and c.logprobs.tokens for c in text.choices)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            max_tokens=6,
            stream=True,
            logprobs=True,
            extra_body={"ab": True},  # type: ignore[arg-type]
        )
    )
    sides = {c.choices[0].index for c in chunks if c.choices and c.choices[0].logprobs}
    assert sides == {0, 1}
    refused = httpx.post(
        gateway["url"] + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "logprobs": 21}
    )
    assert (
        refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
    )  # the engine's answer


def test_upstream_down_is_a_502_in_openai_shape(tmp_path: Path) -> None:
    settings = GatewaySettings(upstream="http://127.0.0.1:9/v1")
    with run_app(create_app(settings)) as (url, _):
        r = httpx.post(url + "/v1/chat/completions", json={"model": "x", "messages": HELLO}, timeout=30)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"


def test_ab_without_a_store_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="feedback-db"):
        GatewaySettings.from_env(ab_rate=0.5)


def test_an_upstream_without_its_scheme_is_a_config_error() -> None:
    """It would start, then answer every request 502: said at start instead."""
    with pytest.raises(
        ConfigError, match=r"setting upstream .*'127.0.0.1:8002' is not an http:// or https:// URL"
    ):
        GatewaySettings.from_env(upstream="127.0.0.1:8002")
    with pytest.raises(ConfigError, match="setting candidate_upstream"):
        GatewaySettings.from_env(candidate_upstream="localhost:9000/v1")
    assert (
        GatewaySettings.from_env(upstream="https://engine.example/v1").upstream == "https://engine.example/v1"
    )


@pytest.mark.parametrize("value", ["false", 1, "yes"])
def test_ab_that_is_not_a_boolean_is_a_400_as_the_engine_gives(
    gateway: dict[str, Any], server: dict[str, Any], value: Any
) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 4, "ab": value}
    answers = [
        httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        for url in (gateway["url"], server["url"])
    ]
    for r in answers:
        assert r.status_code == 400 and r.json()["error"]["param"] == "ab", r.text


@pytest.mark.parametrize("stream", [False, True])
def test_ab_request_the_engine_refuses_gets_its_4xx(
    gateway: dict[str, Any], server: dict[str, Any], stream: bool
) -> None:
    """An opted-in request the engine refuses (max_tokens beyond the context) is answered with the engine's
    own status and error, streamed or not, as the engine itself answers it."""
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 10_000, "ab": True, "stream": stream}
    answers = [
        httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        for url in (gateway["url"], server["url"])
    ]
    for r in answers:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"


def test_an_ab_request_with_stream_options_but_no_stream_gets_the_engines_400(
    gateway: dict[str, Any], server: dict[str, Any]
) -> None:
    body = {
        "model": "tiny",
        "messages": HELLO,
        "max_tokens": 2,
        "ab": True,
        "stream_options": {"include_usage": True},
    }
    for url in (gateway["url"], server["url"]):
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text


def test_a_prompt_of_token_ids_passes_through_without_ab(
    gateway: dict[str, Any], server: dict[str, Any]
) -> None:
    """The gateway has no tokenizer to store the text of a prompt given as token ids: the engine alone answers."""
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
    direct = httpx.post(server["url"] + "/v1/completions", json=body, timeout=30).json()
    client: openai.OpenAI = gateway["client"]
    for prompt in ([5, 6, 7], [[5, 6, 7]]):
        out = client.completions.create(**{**body, "prompt": prompt}, extra_body={"ab": True})
        assert len(out.choices) == 1 and "feedback_id" not in (out.model_extra or {})
        assert out.choices[0].text == direct["choices"][0]["text"]


def test_feedback_without_a_store_gets_the_status_its_schema_documents() -> None:
    settings = GatewaySettings(upstream="http://127.0.0.1:9/v1")
    vote = {"feedback_id": "ab-x", "feedback_token": "0" * 64, "choice": "A", "idempotency_key": "k" * 10}
    with run_app(create_app(settings)) as (url, _):
        r = httpx.post(url + "/v1/feedback", json=vote, timeout=30)
        documented = httpx.get(url + "/openapi.json").json()["paths"]["/v1/feedback"]["post"]["responses"]
    assert r.json()["error"]["code"] == "no_feedback"
    assert "without a feedback store" in documented[str(r.status_code)]["description"]


@contextmanager
def ab_gateway(engine: FastAPI, db_url: str) -> Iterator[str]:
    """The URL of a gateway in front of `engine` that draws every request for A/B against the candidate model
    "other" on the same engine, storing its pairs in db_url."""
    with run_app(engine) as (upstream, _):
        settings = GatewaySettings(upstream=upstream + "/v1", candidate_model="other", feedback_db=db_url,
                                   ab_rate=1.0, seed=0)  # fmt: skip
        with run_app(create_app(settings)) as (url, _):
            yield url


def broken_engine(received: list[dict[str, Any]]) -> FastAPI:
    """An engine that answers 200 without a completion, and streams one token and then an error event (as
    `rlhf serve` does when its worker fails mid-answer); it keeps the bodies it received."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        received.append(body)
        if not body.get("stream"):
            return JSONResponse({"id": "x", "object": "chat.completion", "choices": []})
        first = {
            "id": "x",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": "Hello"}}],
        }
        events = [first, {"error": {"message": "the worker failed", "type": "server_error"}}]
        return StreamingResponse(iter([f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]),
                                 media_type="text/event-stream")  # fmt: skip

    return app


def test_an_engine_that_fails_gives_a_502_and_no_pair(tmp_path: Path) -> None:
    """A 200 without a completion is a 502, not a 500; an error event mid-stream reaches the client, and the
    cut-off answer is no pair to vote on; an `ab` field, even false, never reaches the engine."""
    received: list[dict[str, Any]] = []
    db_url = f"sqlite:///{tmp_path}/feedback.db"
    with ab_gateway(broken_engine(received), db_url) as url:
        body = {"model": "m", "messages": HELLO, "ab": True}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error", r.text
        r = httpx.post(url + "/v1/chat/completions", json=body | {"stream": True}, timeout=30)
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and "the worker failed" in events[-2] and events[-1] == "[DONE]"
        assert not any("feedback_id" in e for e in events)
        received.clear()
        httpx.post(
            url + "/v1/chat/completions", json={"model": "m", "messages": HELLO, "ab": False}, timeout=30
        )
        assert received and "ab" not in received[0]
    db = Database(db_url)
    with db.session() as session:
        assert session.scalars(select(Prompt)).first() is None
    db.dispose()


def test_a_candidate_that_is_down_leaves_the_requested_model_to_answer(
    server: dict[str, Any], tmp_path: Path
) -> None:
    """Every opted-in request drawn for A/B got a 502 while the candidate engine was down: the requested model
    now answers it alone, streamed or not, as it answers without A/B (no pair, no feedback id)."""
    settings = GatewaySettings(upstream=server["url"] + "/v1", candidate_upstream="http://127.0.0.1:9/v1",
                               feedback_db=f"sqlite:///{tmp_path}/feedback.db", ab_rate=1.0, seed=0)  # fmt: skip
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 4, "ab": True}
    with run_app(create_app(settings)) as (url, _):
        plain = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        streamed = httpx.post(url + "/v1/chat/completions", json=body | {"stream": True}, timeout=30)
    assert (
        plain.status_code == 200 and len(plain.json()["choices"]) == 1 and "feedback_id" not in plain.json()
    )
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert all(json.loads(e)["choices"][0]["index"] == 0 for e in events[:-1] if json.loads(e)["choices"])
    assert not any("feedback_id" in e for e in events)


def cookie_engine(seen: list[str | None]) -> FastAPI:
    """An engine behind a proxy that sets a cookie on every answer; it keeps the Cookie header of each request."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        seen.append(request.headers.get("cookie"))
        answer = JSONResponse({"object": "list", "data": []})
        answer.set_cookie("sticky", "engine-1")
        return answer

    return app


def test_an_upstream_cookie_is_never_sent_on_another_clients_request(tmp_path: Path) -> None:
    """httpx keeps cookies by default: a load balancer's or a proxy's cookie set on one client's answer went
    with every later request of every client."""
    seen: list[str | None] = []
    with run_app(cookie_engine(seen)) as (engine, _):
        with run_app(
            create_app(
                GatewaySettings(upstream="http://user:s3cret@" + engine.removeprefix("http://") + "/v1")
            )
        ) as (url, _):
            for _ in range(3):
                assert httpx.get(url + "/v1/models", timeout=30).status_code == 200
    assert seen[-2:] == [None, None]


def test_a_password_in_the_upstream_url_is_not_stored_with_the_pairs(
    server: dict[str, Any], tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path}/feedback.db"
    upstream = server["url"].replace("http://", "http://svc:s3cret@") + "/v1"
    settings = GatewaySettings(
        upstream=upstream, candidate_model="tiny-candidate", feedback_db=db_url, ab_rate=1.0
    )
    with run_app(create_app(settings)) as (url, _):
        for _ in range(5):  # identical answers make no pair
            body = {"model": "tiny", "messages": HELLO, "max_tokens": 8, "ab": True}
            if "feedback_id" in httpx.post(url + "/v1/chat/completions", json=body, timeout=30).json():
                break
    db = Database(db_url)
    with db.session() as session:
        stored = [p.meta["upstream"] for p in session.scalars(select(Prompt))]
    db.dispose()
    assert stored and all("s3cret" not in u and u.startswith("http://127.0.0.1") for u in stored)


def slow_engine(outcomes: list[str]) -> FastAPI:
    """An engine that takes 5 s to answer, and notes whether its client (the gateway) stayed for it."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        for _ in range(100):
            if await request.is_disconnected():
                outcomes.append("left")
                return JSONResponse({})
            await asyncio.sleep(0.05)
        outcomes.append("answered")
        return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": "late"}}]})

    return app


@pytest.mark.parametrize("ab", [False, True])
def test_a_client_that_leaves_frees_the_engine(tmp_path: Path, ab: bool) -> None:
    """A client that gave up on a plain (not streamed) request left the engine generating for nobody, twice for an
    A/B pair: the gateway now closes its upstream requests when the client goes."""
    outcomes: list[str] = []
    with run_app(slow_engine(outcomes)) as (engine, _):
        settings = GatewaySettings(upstream=engine + "/v1", candidate_model="other", ab_rate=1.0,
                                   feedback_db=f"sqlite:///{tmp_path}/feedback.db")  # fmt: skip
        with run_app(create_app(settings)) as (url, _):
            body = {"model": "m", "messages": HELLO, "ab": ab}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
            deadline = time.monotonic() + 4
            while len(outcomes) < (2 if ab else 1) and time.monotonic() < deadline:
                time.sleep(0.05)
    assert outcomes == ["left"] * (2 if ab else 1)


def redeployed_engine(version: list[str]) -> FastAPI:
    """An engine whose model list names `version[0]` (changed by the test, as a redeploy would), answering
    each model with its own words, and streaming gzip-compressed as a proxy in front of an engine may."""
    import gzip

    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": m, "object": "model", "version": f"{m}@{version[0]}"}
                                           for m in ("m", "other")]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        words = f"I am {body['model']}."
        if body.get("stream"):
            chunk = {"id": "x", "object": "chat.completion.chunk", "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": words}, "finish_reason": "stop"}]}  # fmt: skip
            packed = gzip.compress(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
            return StreamingResponse(iter([packed]), media_type="text/event-stream",
                                     headers={"content-encoding": "gzip"})  # fmt: skip
        answer = {"id": "x", "object": "chat.completion", "model": body["model"],
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": words}, "finish_reason": "stop"}]}  # fmt: skip
        return JSONResponse(answer, headers={"x-request-id": f"req-{body['model']}"})

    return app


def test_a_redeployed_model_is_stored_with_its_new_version_and_a_gzip_stream_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway read the upstream's versions once, at start: pairs after a redeploy under the same model id
    were credited to the old checkpoint (and, with an engine not yet up at start, to the bare model id). A
    stream an upstream compressed reached the client compressed, without its content-encoding."""
    from rlhf.serve import gateway

    monkeypatch.setattr(gateway, "VERSIONS_TTL_S", 0.0)  # every pair asks again
    version = ["v1"]
    db_url = f"sqlite:///{tmp_path}/feedback.db"
    with ab_gateway(redeployed_engine(version), db_url) as url:
        body = {"model": "m", "messages": HELLO, "ab": True}
        first = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        # an A/B answer carries the requested model's request id, as a plain answer does
        assert "feedback_id" in first.json() and first.headers["x-request-id"] == "req-m"
        version[0] = "v2"
        assert "feedback_id" in httpx.post(url + "/v1/chat/completions", json=body, timeout=30).json()
        streamed = httpx.post(url + "/v1/chat/completions", json={**body, "ab": False, "stream": True},
                              timeout=30)  # fmt: skip
    assert streamed.status_code == 200 and "content-encoding" not in streamed.headers
    assert "I am m." in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
    db = Database(db_url)
    with db.session() as session:
        policies = [c.policy for c in session.scalars(select(Completion).order_by(Completion.id))]
    db.dispose()
    assert sorted(policies[:2]) == ["m@v1", "other@v1"] and sorted(policies[2:]) == ["m@v2", "other@v2"]


def flaky_candidate_engine(mode: str, answer: str = "I am m.") -> FastAPI:
    """An engine whose model "m" answers well (`answer`, with a system fingerprint of its own, and listed without a
    version as vLLM lists its models) and whose model "other" fails as `mode` says: an error status, a 200
    that holds no completion, a stream that holds no events, an error event mid-stream (a 503 unstreamed), an
    answer too slow for the gateway's timeout; "same": it answers as "m" does."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in ("m", "other")]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        stream = bool(body.get("stream"))
        words = answer
        if body["model"] == "other":
            if mode == "status" or (mode == "midway" and not stream):
                return JSONResponse(
                    {"error": {"message": "candidate boom"}}, status_code=500 if mode == "status" else 503
                )
            if mode == "slow":
                await asyncio.sleep(3)
            if mode == "empty":
                if stream:
                    return StreamingResponse(iter([""]), media_type="text/event-stream")
                return JSONResponse({"id": "x", "object": "chat.completion", "choices": []})
            if mode == "midway" and stream:
                events = [{"id": "x", "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"content": "I am"}}]},
                          {"error": {"message": "candidate boom", "type": "server_error"}}]  # fmt: skip
                return StreamingResponse(iter([f"data: {json.dumps(e)}\n\n" for e in events]),
                                         media_type="text/event-stream")  # fmt: skip
            if mode != "same":
                words = "I am other."
        if stream:
            chunk = {"id": "x", "object": "chat.completion.chunk", "model": body["model"], "system_fingerprint": f"fp-{body['model']}",
                     "choices": [{"index": 0, "delta": {"content": words}, "finish_reason": "stop"}]}  # fmt: skip
            return StreamingResponse(iter([f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"]),
                                     media_type="text/event-stream")  # fmt: skip
        return JSONResponse({"id": "x", "object": "chat.completion", "model": body["model"], "system_fingerprint": f"fp-{body['model']}",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": words},
                                          "finish_reason": "stop"}]})  # fmt: skip

    return app


@pytest.mark.parametrize("mode", ["status", "empty", "midway", "slow"])
def test_a_candidate_that_fails_leaves_the_requested_model_to_answer_and_stores_no_pair(
    tmp_path: Path, mode: str
) -> None:
    """A candidate's 500 failed the user's request with the candidate's own error, a candidate that timed out
    was a 502, and a candidate stream with no events stored an empty answer as a pair to vote on: now the
    requested model answers alone, as when the candidate's engine is down, and no pair is stored."""
    db_url = f"sqlite:///{tmp_path}/feedback.db"
    body = {"model": "m", "messages": HELLO, "ab": True}
    with run_app(flaky_candidate_engine(mode)) as (upstream, _):
        settings = GatewaySettings(upstream=upstream + "/v1", candidate_model="other", feedback_db=db_url,
                                   ab_rate=1.0, seed=0, timeout_s=1.0)  # fmt: skip
        with run_app(create_app(settings)) as (url, _):
            plain = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
            streamed = httpx.post(url + "/v1/chat/completions", json=body | {"stream": True}, timeout=30)
    assert plain.status_code == 200, plain.text
    assert [c["message"]["content"] for c in plain.json()["choices"]] == ["I am m."]
    assert "feedback_id" not in plain.json()
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert not any("error" in json.loads(e) or "feedback_id" in e for e in events[:-1])
    mine = [c["delta"]["content"] for e in events[:-1] for c in json.loads(e)["choices"] if c["index"] == 0]
    assert "I am m." in mine
    db = Database(db_url)
    with db.session() as session:
        assert session.scalars(select(Prompt)).first() is None
    db.dispose()


def test_a_model_listed_without_a_version_is_stored_by_its_fingerprint_and_identical_answers_store_nothing(
    tmp_path: Path,
) -> None:
    """An engine that lists its models without a version (vLLM) had every pair stored under the bare model id:
    the model@system_fingerprint fallback never ran. Two identical answers left the user's prompt and both
    answers in the store, with no task to vote on."""
    for mode, stored in (("works", ["m@fp-m", "other@fp-other"]), ("same", [])):
        db_url = f"sqlite:///{tmp_path}/{mode}.db"
        with ab_gateway(flaky_candidate_engine(mode), db_url) as url:
            r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": HELLO, "ab": True},
                           timeout=30)  # fmt: skip
        assert r.status_code == 200 and ("feedback_id" in r.json()) == bool(stored)
        db = Database(db_url)
        with db.session() as session:
            assert sorted(c.policy for c in session.scalars(select(Completion))) == stored
            assert (session.scalars(select(Prompt)).first() is None) == (not stored)
        db.dispose()


def test_an_ab_answer_does_not_tell_which_engine_wrote_which_choice(tmp_path: Path) -> None:
    """Streamed, every chunk kept the system_fingerprint of the engine that wrote it, so a user could tell the
    candidate's answer from the requested model's; unstreamed, the answer kept the id and time of the engine
    whose reply carried both choices."""
    with ab_gateway(flaky_candidate_engine("works"), f"sqlite:///{tmp_path}/feedback.db") as url:
        body = {"model": "m", "messages": HELLO, "ab": True}
        plain = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        streamed = httpx.post(url + "/v1/chat/completions", json=body | {"stream": True}, timeout=30)
    assert "feedback_id" in plain.json() and "feedback_id" in streamed.text
    for text in (plain.text, streamed.text):
        assert (
            "fp-m" not in text
            and "fp-other" not in text
            and '"id": "x"' not in text
            and '"id":"x"' not in text
        )
    assert plain.json()["id"].startswith("chatcmpl-") and plain.json()["system_fingerprint"] is None
