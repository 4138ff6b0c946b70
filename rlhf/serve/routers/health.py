"""GET /healthz (every generation worker alive) and GET /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rlhf.serve.deps import StateDep

router = APIRouter(tags=["ops"])


@router.get("/healthz", responses={503: {"description": "a generation worker died"}})
@router.head("/healthz", include_in_schema=False)
def healthz(state: StateDep) -> JSONResponse:
    dead = [name for name, p in state.policies.items() if not p.engine.alive]
    body = {
        "status": "error" if dead else "ok",
        "models": {name: p.version for name, p in state.policies.items()},
        "dead_workers": dead,
        "feedback_store": state.store is not None,
    }
    return JSONResponse(body, status_code=503 if dead else 200)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
