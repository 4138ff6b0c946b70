"""The model server: `create_app(settings)`, or `app` configured from RLHF_SERVE_* variables.

uvicorn rlhf.serve.main:app        # or: rlhf serve MODEL_DIR [--feedback-db URL] ...
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from rlhf import __version__
from rlhf.errors import ConfigError
from rlhf.serve.deps import ServeState
from rlhf.serve.errors import add_error_handlers
from rlhf.serve.feedback import FeedbackStore
from rlhf.serve.middleware import BodySizeLimit, RequestMetrics
from rlhf.serve.policy import Policy, load_policy
from rlhf.serve.routers import chat, completions, feedback, health, models
from rlhf.serve.settings import Settings

log = logging.getLogger(__name__)


def open_state(s: Settings) -> ServeState:
    """Load the policies (starting their generation workers) and open the feedback store."""
    if s.threads:
        torch.set_num_threads(s.threads)
    policies: dict[str, Policy] = {}

    def load(path: str, name: str | None) -> Policy:
        policy = load_policy(
            path, name, s.dtype, s.device, s.max_batch_size, s.batch_wait_ms / 1000, s.max_queue, s.seed
        )
        if policy.name in policies:
            policy.engine.stop()
            raise ConfigError(
                f"two served models are both named {policy.name!r}: set --model-name or --candidate-name"
            )
        policies[policy.name] = policy
        return policy

    try:
        main = load(s.model_dir, s.model_name)
        candidate = load(s.candidate_model, s.candidate_name) if s.candidate_model else None
        store = (
            FeedbackStore(s.feedback_db, s.feedback_project, s.feedback_per_minute) if s.feedback_db else None
        )
    except BaseException:
        for policy in policies.values():
            policy.engine.stop()
        raise
    if store is not None and s.ab_rate == 0:
        log.warning("a feedback store is set but ab_rate is 0: no request will get an A/B pair")
    return ServeState(s, policies, main, candidate, store, random.Random(s.seed))


def close_state(state: ServeState) -> None:
    for policy in state.policies.values():
        policy.engine.stop()
    if state.store is not None:
        state.store.close()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if getattr(app.state, "serve", None) is None:
        app.state.serve = open_state(app.state.settings)
    try:
        yield
    finally:
        close_state(app.state.serve)


def create_app(settings: Settings | None = None, state: ServeState | None = None) -> FastAPI:
    """The app; it opens its state (loads the models) at startup unless given one already open."""
    app = FastAPI(
        title="rlhf-loop model server",
        version=__version__,
        description="OpenAI-compatible chat and text completions of a policy, with A/B feedback capture.",
        lifespan=lifespan,
    )
    app.state.settings = state.settings if state is not None else settings or Settings.from_env()
    app.state.serve = state
    app.add_middleware(BodySizeLimit, max_bytes=app.state.settings.max_body_bytes)
    app.add_middleware(RequestMetrics)  # added last: outermost, so it also counts 413s
    add_error_handlers(app)
    for router in (chat, completions, models, feedback, health):
        app.include_router(router.router)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn rlhf.serve.main:app` builds the app from the environment on first access; importing this
    # module (as `rlhf serve` and the tests do) loads nothing.
    if name == "app":
        return create_app()
    raise AttributeError(name)
