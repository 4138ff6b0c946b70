"""ASGI middleware: request metrics (count by endpoint and status, latency to the end of the body) and a
request body size limit that answers 413 in OpenAI's error shape (408 for a body that stops coming)."""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhf.feedback import middleware as feedback_middleware
from rlhf.feedback.middleware import json_body_problem, read_body
from rlhf.serve import metrics
from rlhf.serve.errors import error_body

# nginx's code for a request its client closed before any response: counted apart from the server's 500s
CLIENT_CLOSED = 499


class RequestMetrics:
    """Counts every HTTP request by its route template (not the raw path: bounded label values); a request the
    client closed before any response as 499, one that failed before its response as 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
            status = status or CLIENT_CLOSED  # returned without answering: the client went away
        except BaseException:
            status = status or 500
            raise
        finally:
            endpoint = getattr(scope.get("route"), "path", None) or _route_of(scope)
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - start)


def _route_of(scope: Scope) -> str:
    """The label of a request answered before routing (a body refused by the middleware below) or by another
    method than its route's (HEAD): its path where that is one of the API's paths (OpenAPI's, a bounded set
    of label values), else "unmatched"."""
    app = scope.get("app")
    try:
        known = app.openapi()["paths"] if app is not None and hasattr(app, "openapi") else {}
    except Exception:  # noqa: BLE001  # a label is not worth failing a request over
        known = {}
    path = scope.get("path", "")
    return path if path in known else "unmatched"


class BodySizeLimit:
    """413 when a body is larger than `max_bytes`: by Content-Length up front, or while it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._too_large(send)
                return
        data = await read_body(receive, self.max_bytes)
        if data == 408:
            message = f"Request body not received within {feedback_middleware.BODY_TIMEOUT_S:g} s."
            await self._send_error(send, 408, message, "timeout")
            return
        if data == 413:
            await self._too_large(send)
            return
        if not isinstance(data, bytes):  # the client went away
            return
        problem = json_body_problem(scope, data)
        if problem is not None:
            await self._send_error(send, 400, problem, "invalid_value")
            return
        body_sent = False

        async def replay() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        message = f"Request body over the limit of {self.max_bytes} bytes."
        await self._send_error(send, 413, message, "request_too_large")

    async def _send_error(self, send: Send, status: int, message: str, code: str) -> None:
        body = json.dumps(error_body(message, status, code=code), separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
