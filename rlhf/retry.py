"""Sending an HTTP request again when it failed for a passing reason: one policy for the package's clients
(the labeling API's client, the judge endpoint, `rlhf generate --endpoint`)."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable

import httpx


def retry_after(response: httpx.Response) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def transient(status: int) -> bool:
    """Whether an answer with this status may succeed when sent again: rate limited (429) or a server error."""
    return status == 429 or status >= 500


def send_retrying(
    send: Callable[[], httpx.Response],
    *,
    retries: int,
    backoff_s: float,
    retry_status: Callable[[int], bool] = transient,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[str, float], None] | None = None,
) -> httpx.Response:
    """`send()`'s response, sent again up to `retries` times after a transport error (refused, reset, timed
    out) or an answer whose status `retry_status` accepts. Each wait is what the answer's Retry-After asks,
    else backoff_s doubled per attempt (at most 64 backoff_s). The last attempt's transport error is raised and
    its answer returned, whatever its status. `on_retry(reason, wait_s)` hears of each retry before its wait."""
    for attempt in range(retries + 1):
        last = attempt == retries
        backoff = backoff_s * 2 ** min(attempt, 6)
        try:
            response = send()
        except httpx.TransportError as e:
            if last:
                raise
            reason, wait = type(e).__name__, backoff
        else:
            if last or not retry_status(response.status_code):
                return response
            asked = retry_after(response)
            reason, wait = f"answered {response.status_code}", backoff if asked is None else asked
        if on_retry is not None:
            on_retry(reason, wait)
        sleep(wait)
    raise AssertionError("unreachable")
