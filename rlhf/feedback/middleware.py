"""Request body size limits, Server-Timing, and the mapping of store errors to HTTP answers."""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhf.feedback.deps import LoginRequired
from rlhf.feedback.errors import FeedbackError, InvalidInput, RateLimited

log = logging.getLogger(__name__)


class BodySizeLimit:
    """Answer 413 when a request body is larger than allowed: by Content-Length up front, or while streaming.

    Import endpoints (paths ending in /import) get `import_bytes`; every other path `max_bytes`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, import_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.import_bytes = import_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.import_bytes if scope["path"].endswith("/import") else self.max_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _too_large(limit)(scope, receive, send)
                    return
        # Read the whole body first (it is bounded by `limit`), then hand it to the app in one message.
        chunks: list[bytes] = []
        received = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                await _too_large(limit)(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


class ServerTiming:
    """Add `Server-Timing: app;dur=MS` to every answer: the time from the request reaching the app to its
    answer starting, so clients (and the load benchmark) can tell server time from network and client time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - start) * 1000
                headers = [*message.get("headers", []), (b"server-timing", f"app;dur={ms:.2f}".encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)


def _too_large(limit: int) -> Response:
    return JSONResponse({"detail": f"request body over the limit of {limit} bytes"}, status_code=413)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FeedbackError)
    async def _feedback_error(request: Request, exc: FeedbackError) -> Response:
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimited) else None
        if request.url.path.startswith("/api") or request.method != "GET":
            if isinstance(exc, InvalidInput):  # the shape of FastAPI's own 422 answers
                detail: object = [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]
            else:
                detail = str(exc)
            return JSONResponse({"detail": detail}, status_code=exc.status, headers=headers)
        return Response(str(exc), status_code=exc.status, headers=headers, media_type="text/plain")

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse("/login", status_code=303)
