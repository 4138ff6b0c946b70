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
