"""Errors of the feedback store. Each maps to one HTTP status in the app and to one line in the CLI."""

from __future__ import annotations

from rlhf.errors import RlhfError


class FeedbackError(RlhfError):
    """Base class; `status` is the HTTP status the JSON API answers with."""

    status = 400


class NotFound(FeedbackError):
    status = 404


class Forbidden(FeedbackError):
    status = 403


class Conflict(FeedbackError):
    status = 409


class InvalidInput(FeedbackError):
    status = 422


class TooLarge(FeedbackError):
    status = 413


class RateLimited(FeedbackError):
    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.scope = ""  # who is limited, for messages: "for this account", "from your address"
