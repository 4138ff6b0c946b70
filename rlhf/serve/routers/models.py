"""GET /v1/models and /v1/models/{id}: the served policies, with the version their votes are tied to."""

from __future__ import annotations

from fastapi import APIRouter

from rlhf.serve.deps import StateDep
from rlhf.serve.policy import Policy
from rlhf.serve.schemas import MODEL_ERRORS, ModelList, ModelOut

router = APIRouter(prefix="/v1", tags=["openai"], responses=MODEL_ERRORS)


def model_out(policy: Policy) -> ModelOut:
    return ModelOut(
        id=policy.name, created=policy.created, version=policy.version, context_length=policy.context_length
    )


@router.get("/models")
def list_models(state: StateDep) -> ModelList:
    return ModelList(data=[model_out(p) for p in state.policies.values()])


# `{model:path}`: model ids hold slashes ("sft/final").
@router.get("/models/{model:path}")
def get_model(model: str, state: StateDep) -> ModelOut:
    return model_out(state.policy(model))
