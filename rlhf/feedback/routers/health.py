"""Liveness and metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text

from rlhf.feedback.deps import SessionDep

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


@router.get("/healthz")
@router.head("/healthz", include_in_schema=False)
def healthz(session: SessionDep) -> Health:
    """200 when the server is up and its database answers."""
    session.execute(text("SELECT 1"))
    return Health(status="ok")


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
