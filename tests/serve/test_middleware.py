"""rlhf/serve/middleware.py driven as ASGI apps: a body that stops coming, and what a request is counted as."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from rlhf.feedback import middleware as feedback_middleware
from rlhf.serve import metrics
from rlhf.serve.middleware import BodySizeLimit, RequestMetrics
from tests import aio

SCOPE = {"type": "http", "method": "POST", "path": "/v1/completions",
         "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]}  # fmt: skip


def drive(app: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run `app` on SCOPE with `messages` as what the client sends (then nothing); what it sent back."""
    inbox, sent = list(messages), []

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop(0)
        await asyncio.sleep(3600)  # a client that announced more than it sends
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    aio.run(app(dict(SCOPE), receive, send))
    return sent


async def never_called(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the body never came: the app must not run")


def test_a_body_that_stops_coming_is_a_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feedback_middleware, "BODY_TIMEOUT_S", 0.05)  # the body reader both servers share
    sent = drive(
        BodySizeLimit(never_called, 1024), [{"type": "http.request", "body": b'{"a"', "more_body": True}]
    )
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"]["message"] == "Request body not received within 0.05 s."


def count(status: str) -> float:
    return metrics.REQUESTS.labels("unmatched", status)._value.get()  # no app to route by: "unmatched"


def test_a_request_its_client_closed_counts_as_499_and_a_failure_as_500() -> None:
    async def client_left(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the disconnect: nothing to answer

    async def failed(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    closed, errors = count("499"), count("500")
    drive(RequestMetrics(client_left), [{"type": "http.disconnect"}])
    assert (count("499"), count("500")) == (closed + 1, errors)
    with pytest.raises(RuntimeError):
        drive(RequestMetrics(failed), [])
    assert (count("499"), count("500")) == (closed + 1, errors + 1)


def test_the_labeling_apps_body_that_stops_coming_is_a_408_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feedback_middleware, "BODY_TIMEOUT_S", 0.05)
    app = feedback_middleware.BodySizeLimit(never_called, 1024, 1024)
    sent = drive(app, [{"type": "http.request", "body": b'{"a"', "more_body": True}])
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"]) == {"detail": "request body not received within 0.05 s"}
