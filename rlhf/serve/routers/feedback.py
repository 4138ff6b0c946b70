"""POST /v1/feedback: a user's choice between the two answers of an A/B response, into the feedback store."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from starlette.concurrency import run_in_threadpool

from rlhf.feedback.schemas import KEY_PATTERN
from rlhf.serve import metrics
from rlhf.serve.deps import StoreDep
from rlhf.serve.errors import APIError
from rlhf.serve.feedback import record_ab_vote
from rlhf.serve.schemas import FEEDBACK_ERRORS, FeedbackIn, FeedbackOut

router = APIRouter(prefix="/v1", tags=["feedback"], responses=FEEDBACK_ERRORS)


@router.post("/feedback")
async def post_feedback(
    body: FeedbackIn,
    request: Request,
    store: StoreDep,
    idempotency_key: Annotated[str | None, Header(pattern=KEY_PATTERN)] = None,
) -> FeedbackOut:
    """Record the choice once: a retry with the same idempotency key returns the first vote."""
    key = body.idempotency_key or idempotency_key
    if key is None:
        raise APIError(
            "Missing required parameter: 'idempotency_key' (or send an Idempotency-Key header).",
            param="idempotency_key",
            code="missing_required_parameter",
        )
    client = request.client.host if request.client else ""
    recorded = await run_in_threadpool(
        record_ab_vote, store, body.feedback_id, body.feedback_token, body.choice, key, body.user, client
    )
    metrics.FEEDBACK.labels(body.choice, "recorded" if recorded.created else "replayed").inc()
    return FeedbackOut(
        feedback_id=body.feedback_id,
        choice=recorded.vote.choice or body.choice,
        vote_id=recorded.vote.id,
        replayed=not recorded.created,
    )
