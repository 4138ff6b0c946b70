"""Bad input gets a 4xx with OpenAI's error object, never a 500 or a dead worker."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}

CASES: list[tuple[str, str, Any, int, str | None]] = [
    # (name, path, JSON body or raw bytes, status, param)
    ("invalid json", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, 404, "model"),
    ("missing model", "/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("max_tokens beyond context", "/v1/completions", {**COMPLETION, "max_tokens": 10_000}, 400, "max_tokens"),
    ("max_tokens zero", "/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
    ("negative temperature", "/v1/chat/completions", {**CHAT, "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", "/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "top_p"),
    ("top_p above one", "/v1/completions", {**COMPLETION, "top_p": 1.5}, 400, "top_p"),
    (
        "prompt longer than the context",
        "/v1/completions",
        {**COMPLETION, "prompt": "word " * 400},
        400,
        "prompt",
    ),
    ("n too large", "/v1/chat/completions", {**CHAT, "n": 50}, 400, "n"),
    ("n zero", "/v1/chat/completions", {**CHAT, "n": 0}, 400, "n"),
    ("five stop strings", "/v1/completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stop not a string", "/v1/completions", {**COMPLETION, "stop": ["a", 3]}, 400, "stop.1"),
    ("empty messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    (
        "unknown role",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    ("logprobs", "/v1/chat/completions", {**CHAT, "logprobs": True}, 400, "logprobs"),
    (
        "feedback without a key",
        "/v1/feedback",
        {"feedback_id": "ab-x", "choice": "A"},
        400,
        "idempotency_key",
    ),
    (
        "feedback bad choice",
        "/v1/feedback",
        {"feedback_id": "ab-x", "choice": "C", "idempotency_key": "k" * 10},
        400,
        "choice",
    ),
    (
        "feedback unknown id",
        "/v1/feedback",
        {"feedback_id": "ab-x", "choice": "A", "idempotency_key": "k" * 10},
        404,
        None,
    ),
]


@pytest.mark.parametrize("name,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_an_openai_error(
    server: dict[str, Any], name: str, path: str, body: Any, status: int, param: str | None
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(server["url"] + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(server["url"] + path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"].endswith("_error")
    assert error["param"] == param


def test_oversized_body_is_413_in_openai_shape(server: dict[str, Any]) -> None:
    r = httpx.post(server["url"] + "/v1/completions", json={**COMPLETION, "prompt": "x" * 100_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_route_is_404_in_openai_shape(server: dict[str, Any]) -> None:
    r = httpx.get(server["url"] + "/v1/engines")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_server_still_answers_after_bad_input(server: dict[str, Any]) -> None:
    r = httpx.post(server["url"] + "/v1/completions", json=COMPLETION, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
