"""rlhf/feedback/middleware.py: bodies no UTF-8 text or JSON number can hold are a 422, never a 500."""

from __future__ import annotations

import pytest

BAD_BODIES = [
    # (name, path, raw JSON body)
    (
        "lone surrogate in a vote's note",
        "/api/votes",
        b'{"task_id": 1, "choice": "A", "note": "\\ud800x", "idempotency_key": "k-12345678"}',
    ),
    (
        "lone surrogate as a key",
        "/api/votes",
        b'{"\\udfff": 1, "task_id": 1, "choice": "A", "idempotency_key": "k-12345678"}',
    ),
    (
        "NaN margin",
        "/api/votes",
        b'{"task_id": 1, "choice": "A", "margin": NaN, "idempotency_key": "k-12345678"}',
    ),
    (
        "Infinity margin",
        "/api/votes",
        b'{"task_id": 1, "choice": "A", "margin": -Infinity, "idempotency_key": "k-12345678"}',
    ),
    (
        "NaN in an import's sampling",
        "/api/projects/demo/import",
        b'{"candidates": [{"prompt": "p", "completions": [{"text": "a", "sampling": {"temperature": NaN}}, {"text": "b"}]}]}',
    ),
    (
        "a task id beyond a float's range",
        "/api/votes",
        b'{"task_id": 1e999, "choice": "A", "idempotency_key": "k-12345678"}',
    ),
    (
        "a rating beyond a float's range",
        "/api/votes",
        b'{"task_id": 1, "rating": -1.5E+400, "idempotency_key": "k-12345678"}',
    ),
    (
        "a float of 400 digits in an import's meta",
        "/api/projects/demo/import",
        b'{"candidates": [{"prompt": "p", "meta": {"x": 1'
        + b"0" * 400
        + b'.0}, "completions": [{"text": "a"}, {"text": "b"}]}]}',
    ),
    (
        "lone surrogate in an import's prompt",
        "/api/projects/demo/import",
        b'{"candidates": [{"prompt": "\\ud800", "completions": [{"text": "a"}, {"text": "b"}]}]}',
    ),
]


@pytest.mark.parametrize("name,path,body", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_unrepresentable_json_is_422(api, name: str, path: str, body: bytes) -> None:
    headers = {**api.team["admin"], "content-type": "application/json"}
    r = api.client.post(path, content=body, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body"]


def test_a_large_finite_number_is_a_number(api) -> None:
    """A three-digit exponent within the float range passes the body check and meets the fields' own bounds."""
    api.seed(n_prompts=1)
    task = api.next("ann")
    body = b'{"task_id": %d, "choice": "A", "margin": 1e100, "idempotency_key": "k-big-12345"}' % task["id"]
    r = api.client.post(
        "/api/votes", content=body, headers={**api.team["ann"], "content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "margin"], r.text
    assert "input" not in r.json()["detail"][0]  # the offending value is not echoed back
    body = body.replace(b"1e100", b"1e-100")
    assert (
        api.client.post(
            "/api/votes", content=body, headers={**api.team["ann"], "content-type": "application/json"}
        ).status_code
        == 201
    )


def test_a_paired_surrogate_escape_is_text(api) -> None:
    api.seed(n_prompts=1)
    task = api.next("ann")
    body = (
        b'{"task_id": %d, "choice": "A", "note": "\\ud83d\\ude00", "idempotency_key": "k-emoji-123"}'
        % task["id"]
    )
    r = api.client.post(
        "/api/votes", content=body, headers={**api.team["ann"], "content-type": "application/json"}
    )
    assert r.status_code == 201 and r.json()["note"] == "\U0001f600"


def test_head_healthz_is_200(client) -> None:
    r = client.head("/healthz")
    assert r.status_code == 200 and r.content == b""
