"""What the routers share: the server's state (policies, feedback store) and typed dependencies on it."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Protocol

from fastapi import Depends, Request

from rlhf.serve.errors import APIError
from rlhf.serve.feedback import FeedbackStore
from rlhf.serve.settings import Settings

if TYPE_CHECKING:  # torch stays out of what the gateway (rlhf.serve.gateway) imports
    from rlhf.serve.policy import Policy


@dataclass
class ServeState:
    """Made by the app's lifespan: the served policies (the main one first) and the optional store."""

    settings: Settings
    policies: dict[str, Policy]
    main: Policy
    candidate: Policy | None = None
    store: FeedbackStore | None = None
    rng: random.Random = field(default_factory=random.Random)

    def policy(self, name: str) -> Policy:
        policy = self.policies.get(name)
        if policy is None:
            raise APIError(
                f"The model '{name}' does not exist. Served here: {', '.join(self.policies)}.",
                404,
                param="model",
                code="model_not_found",
            )
        return policy


def get_state(request: Request) -> ServeState:
    state: ServeState = request.app.state.serve
    return state


def get_settings(state: Annotated[ServeState, Depends(get_state)]) -> Settings:
    return state.settings


class HasStore(Protocol):
    """The app state of the model server (ServeState) or of the gateway: both may hold a feedback store."""

    store: FeedbackStore | None


def get_store(request: Request) -> FeedbackStore:
    state: HasStore = request.app.state.serve
    if state.store is None:
        raise APIError(
            "This server records no feedback: start it with --feedback-db.", 404, code="no_feedback"
        )
    return state.store


StateDep = Annotated[ServeState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[FeedbackStore, Depends(get_store)]
