"""Request body size limits, Server-Timing, and the mapping of store errors to HTTP answers."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhf.feedback.deps import LoginRequired
from rlhf.feedback.errors import FeedbackError, InvalidInput, RateLimited
from rlhf.feedback.schemas import MAX_PROJECT_BYTES, MAX_VOTE_BYTES
from rlhf.feedback.security import SESSION_COOKIE, return_path
from rlhf.feedback.web import render

log = logging.getLogger(__name__)


# Seconds to wait for each part of a request body (nginx's client_body_timeout): a client that announced more
# than it sends would otherwise hold its request, and a worker's connection, open for ever
BODY_TIMEOUT_S = 60.0


async def read_body(receive: Receive, limit: int) -> bytes | Message | int:
    """A request's whole body, bounded by `limit`: its bytes; the message that came instead of the rest (the
    client went away); or the status to answer with, 413 past `limit` or 408 where a part of it does not come
    within BODY_TIMEOUT_S."""
    chunks: list[bytes] = []
    received = 0
    more = True
    while more:
        with anyio.move_on_after(BODY_TIMEOUT_S) as waited:
            message = await receive()
        if waited.cancelled_caught:
            return 408
        if message["type"] != "http.request":
            return message
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            return 413
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


# Paths whose bodies carry long texts: a vote (its better answer and note), as the API and the task page send
# it; a project's settings (its guidelines), as the API and the admin page send them.
_VOTE_PATHS = re.compile(r"^(/api/votes|/label/[^/]+/vote)$")
_PROJECT_PATHS = re.compile(r"^(/api/projects(/[^/]+)?|/admin/projects/[^/]+/settings)$")


class BodySizeLimit:
    """Answer 413 when a request body is larger than allowed: by Content-Length up front, or while streaming;
    408 when a part of it does not come within BODY_TIMEOUT_S.

    Import endpoints (paths ending in /import) get `import_bytes`; votes and project settings at least what
    their longest texts take (MAX_VOTE_BYTES, MAX_PROJECT_BYTES); every other path `max_bytes`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, import_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.import_bytes = import_bytes

    def limit(self, path: str) -> int:
        """The largest body taken on `path`."""
        if path.endswith("/import"):
            return self.import_bytes
        if _VOTE_PATHS.match(path):
            return max(self.max_bytes, MAX_VOTE_BYTES)
        if _PROJECT_PATHS.match(path):
            return max(self.max_bytes, MAX_PROJECT_BYTES)
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _too_large(scope, limit)(scope, receive, send)
                    return
        # Read the whole body first (it is bounded by `limit`), then hand it to the app in one message.
        data = await read_body(receive, limit)
        if data == 408:
            late = f"request body not received within {BODY_TIMEOUT_S:g} s"
            await _refusal(scope, 408, late)(scope, receive, send)
            return
        if data == 413:
            await _too_large(scope, limit)(scope, receive, send)
            return
        if isinstance(data, dict):  # the client went away: the app hears it
            await self.app(scope, _replay([data], receive), send)
            return
        assert isinstance(data, bytes)
        problem = json_body_problem(scope, data)
        if problem is not None:
            detail = [{"loc": ["body"], "msg": problem, "type": "value_error"}]  # FastAPI's 422 shape
            await JSONResponse({"detail": detail}, status_code=422)(scope, receive, send)
            return
        body = {"type": "http.request", "body": data, "more_body": False}
        await self.app(scope, _replay([body], receive), send)


# what may hide a value JSON cannot carry: a surrogate escape, NaN or Infinity, or a number that may overflow a
# float (a three-digit exponent, a long run of digits: 1e999 parses to infinity)
_SUSPECT = re.compile(rb"\\u[dD][89a-fA-F]|NaN|Infinity|[eE][+]?[0-9]{3}|[0-9]{300}")


class _Unrepresentable(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _Unrepresentable(f"{name} is not a number JSON allows; send a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Unrepresentable(f"{text[:40]} is beyond the range of a float; send a finite number")
    return value


def json_body_problem(scope: Scope, body: bytes) -> str | None:
    """Why a JSON request body cannot be taken, or None: NaN or Infinity (Python's parser accepts them, no
    other does), a number beyond a float's range (Python parses it to infinity), or a string holding a lone
    UTF-16 surrogate ("\\ud800": no UTF-8 text can hold one, so it would fail later, when stored or echoed in
    an error). Bodies FastAPI would not parse as JSON (another content type) and malformed JSON are left to
    the app, which answers those itself."""
    content_type = ""
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value.decode("latin-1").split(";")[0].strip().lower()
    if content_type and not (content_type == "application/json" or content_type.endswith("+json")):
        return None
    if not body or _SUSPECT.search(body) is None:
        return None  # the common case: no surrogate escape and no NaN/Infinity anywhere, not even in text
    try:
        value = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    except _Unrepresentable as e:
        return str(e)
    except ValueError:
        return None
    return _lone_surrogate(value)


def _lone_surrogate(value: Any, path: str = "body") -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{path}: a lone UTF-16 surrogate in a string (not valid Unicode text)"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, path) or _lone_surrogate(item, f"{path}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}.{i}")
            if found:
                return found
    return None


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


def _too_large(scope: Scope, limit: int) -> Response:
    return _refusal(scope, 413, f"request body over the limit of {limit} bytes")


def _refusal(scope: Scope, status: int, detail: str) -> Response:
    """A body refused before the app reads it: JSON for the API, a page for a person (a long text typed into a
    form would otherwise end on a line of raw JSON)."""
    request = Request(scope)
    if "app" in scope and wants_page(request):
        said = "The form sent more than this server takes at once; shorten the text and send it again."
        return error_page(request, status, f"{said} ({detail})" if status == 413 else detail)
    return JSONResponse({"detail": detail}, status_code=status)


# Paths answered in JSON whatever went wrong: the API and the machine-facing endpoints.
JSON_PATHS = ("/api", "/healthz", "/metrics", "/openapi.json", "/docs", "/redoc", "/static")
TITLES = {
    400: "Bad request",
    401: "Please log in",
    403: "Not allowed",
    404: "Not found",
    405: "Not allowed",
    409: "Conflict",
    413: "Too large",
    422: "Something is wrong with the input",
    429: "Slow down",
}


def wants_page(request: Request) -> bool:
    """Whether an error should be a page for a person (the browser pages) rather than JSON."""
    return not request.url.path.startswith(JSON_PATHS)


def error_page(
    request: Request, status: int, message: str, headers: dict[str, str] | None = None
) -> Response:
    ctx = {"title": TITLES.get(status, "Something went wrong"), "status": status, "detail": message}
    return render(request, "error.html", ctx, status_code=status, headers=headers)


def validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's 422 details (type, loc, msg) without the offending input, which it echoes: the input may be a
    value JSON cannot carry (1e999 parses to infinity), and a long note need not come back in full."""
    return [
        {"type": str(e.get("type", "")), "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
         "msg": str(e.get("msg", ""))}
        for e in exc.errors()
    ]  # fmt: skip


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FeedbackError)
    async def _feedback_error(request: Request, exc: FeedbackError) -> Response:
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimited) else None
        if wants_page(request):
            return error_page(request, exc.status, str(exc), headers)
        if isinstance(exc, InvalidInput):  # the shape of FastAPI's own 422 answers
            detail: object = [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]
        else:
            detail = str(exc)
        return JSONResponse({"detail": detail}, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if wants_page(request) and exc.status_code not in (204, 304):
            return error_page(request, exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        if wants_page(request):  # each field named with what is wrong with it (a length: its limit)
            fields = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'][1:]) or 'the form'}: {e['msg']}" for e in exc.errors()
            )
            return error_page(request, 422, f"The request is incomplete or malformed ({fields}).")
        return JSONResponse({"detail": validation_details(exc)}, status_code=422)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        # back to this page after logging in (after a labeler's form, its task page, the path above the form's
        # action; after an admin's, the admin page); where a session cookie came with a form, the session has
        # ended and what the form sent was not saved: the login says so
        path = request.url.path
        page = (
            path
            if request.method == "GET"
            else path.rsplit("/", 1)[0]
            if path.startswith("/label/")
            else "/admin"
        )
        ended = (
            ""
            if SESSION_COOKIE not in request.cookies
            else "&lost=1"
            if request.method == "POST"
            else "&ended=1"
        )
        target = f"/login?next={quote(page)}{ended}" if return_path(page) else "/login"
        return RedirectResponse(target, status_code=303)
