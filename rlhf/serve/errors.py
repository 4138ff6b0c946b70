"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a 4xx status.

Every bad request ends here, whether FastAPI's validation caught it (malformed JSON, a field out of range),
a router did (an unknown model, a prompt too long for the context), or the feedback store did.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from rlhf.feedback.errors import FeedbackError, RateLimited

log = logging.getLogger(__name__)

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers


def error_body(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.status, exc.param, exc.code), status_code=exc.status, headers=exc.headers
    )


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else None
        return error_response(APIError(str(exc.detail), exc.status_code, headers=headers))

    @app.exception_handler(FeedbackError)
    async def _feedback(request: Request, exc: FeedbackError) -> JSONResponse:
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(exc.retry_after_s)}
            return error_response(APIError(str(exc), 429, code="rate_limit_exceeded", headers=headers))
        code = {404: "not_found", 409: "conflict"}.get(exc.status)
        return error_response(APIError(str(exc), exc.status, code=code))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError("The server had an error while processing your request.", 500))


SHOWN_CHARS = 80  # most characters of an invalid value an error message quotes


def validation_error(errors: Any) -> APIError:
    """The most telling validation error as OpenAI words it: a JSON parse error, or a field and its fault."""
    errors = list(errors)
    if not errors:
        return APIError("Invalid request.")
    if errors[0].get("type") == "json_invalid":
        return APIError(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        )
    # For a union (`stop`: a string or a list) pydantic reports every member that failed; a member whose
    # type did not even match the input ("should be a valid string" for a list) says the least, and one
    # whose items matched but broke a bound (a negative token id in a prompt's ids) says the most.
    bounded = [e for e in errors if not e["type"].endswith("_type") and any(map(_is_union_tag, e["loc"]))]
    telling = [e for e in errors if not (e["type"].endswith("_type") and _is_union_tag(e["loc"][-1]))]
    err = (bounded or telling or errors)[0]
    loc = [
        str(p) for p in err["loc"] if p not in ("body", "header", "query", "path") and not _is_union_tag(p)
    ]
    param = ".".join(loc) or None
    if err["type"] == "missing" and not param:
        return APIError(
            "The request body is empty; send a JSON object with the request's parameters.",
            code="missing_body",
        )
    if err["type"] == "missing":
        return APIError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    value = err.get("input")
    shown = repr(value) if isinstance(value, int | float | str | bool) else type(value).__name__
    if len(shown) > SHOWN_CHARS:  # a long value is not echoed whole: the message says what is wrong with it
        length = f", {len(value)} characters" if isinstance(value, str) else ""
        shown = f"{shown[:SHOWN_CHARS]}...{length}"
    if not param and isinstance(value, bytes):  # FastAPI reads a body without a JSON content type as bytes
        return APIError(
            "The request body was not read as JSON: send it with the header Content-Type: application/json.",
            code="invalid_content_type",
        )
    if not param:
        return APIError(f"Invalid request: {err['msg']} (got {shown}).")
    return APIError(f"Invalid value for '{param}': {err['msg']} (got {shown}).", param=param)


def _is_union_tag(part: Any) -> bool:
    """Whether a location part names a union member ("str", "list[str]") rather than a field."""
    return isinstance(part, str) and (
        "[" in part
        or part in ("str", "int", "float", "bool")
        or part.startswith(("function-", "constrained-"))
    )
