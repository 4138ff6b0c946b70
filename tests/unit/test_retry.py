from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest

from rlhf.retry import retry_after, send_retrying, transient


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after(httpx.Response(429, headers={"Retry-After": "2.5"})) == 2.5
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 20 < (retry_after(httpx.Response(429, headers={"Retry-After": later})) or 0) <= 30
    assert retry_after(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    assert retry_after(httpx.Response(429)) is None


def answers(*outcomes: int | Exception):
    """A send() that gives each outcome in turn (a status, or an exception to raise), and the calls it saw."""
    calls: list[int] = []

    def send() -> httpx.Response:
        outcome = outcomes[len(calls)]
        calls.append(len(calls))
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome, headers={"Retry-After": "7"} if outcome == 429 else {})

    return send, calls


def test_passing_failures_are_sent_again_with_doubling_waits_and_retry_after() -> None:
    send, calls = answers(httpx.ConnectError("refused"), 503, 429, 200)
    waits: list[float] = []
    heard: list[tuple[str, float]] = []
    response = send_retrying(send, retries=5, backoff_s=0.5, sleep=waits.append,
                             on_retry=lambda reason, wait: heard.append((reason, wait)))  # fmt: skip
    assert response.status_code == 200 and len(calls) == 4
    assert waits == [0.5, 1.0, 7.0]  # 0.5 doubled per attempt; the 429 asked for 7 s
    assert heard == [("ConnectError", 0.5), ("answered 503", 1.0), ("answered 429", 7.0)]


def test_the_last_attempt_is_returned_or_raised_and_lasting_answers_are_not_retried() -> None:
    send, calls = answers(503, 503, 503)
    assert send_retrying(send, retries=2, backoff_s=0, sleep=lambda s: None).status_code == 503
    assert len(calls) == 3
    send, calls = answers(httpx.ReadTimeout("slow"), httpx.ConnectError("refused"))
    with pytest.raises(httpx.ConnectError):
        send_retrying(send, retries=1, backoff_s=0, sleep=lambda s: None)
    send, calls = answers(404, 200)
    assert send_retrying(send, retries=3, backoff_s=0, sleep=lambda s: None).status_code == 404
    send, calls = answers(500, 200)  # a status the caller does not retry
    assert (
        send_retrying(
            send, retries=3, backoff_s=0, sleep=lambda s: None, retry_status={503}.__contains__
        ).status_code
        == 500
    )
    assert [transient(s) for s in (200, 400, 404, 429, 500, 503)] == [False, False, False, True, True, True]


def test_waits_stop_doubling_at_64_backoffs() -> None:
    send, calls = answers(*[503] * 9, 200)
    waits: list[float] = []
    send_retrying(send, retries=9, backoff_s=1.0, sleep=waits.append)
    assert waits == [1, 2, 4, 8, 16, 32, 64, 64, 64]
