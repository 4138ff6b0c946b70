"""The labeling app: `create_app(settings)`, or `app` configured from RLHF_LABEL_* variables.

uvicorn rlhf.feedback.main:app        # or: rlhf label serve --db URL
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from rlhf import __version__
from rlhf.feedback.db import Database, upgrade
from rlhf.feedback.middleware import BodySizeLimit, ServerTiming, add_error_handlers
from rlhf.feedback.routers import health, pages_admin, pages_auth, pages_label, projects, tasks, users, votes
from rlhf.feedback.security import AuthCache, LoginLimits, RateLimiter
from rlhf.feedback.settings import Settings
from rlhf.feedback.shared import open_shared
from rlhf.feedback.users import app_secret
from rlhf.feedback.web import STATIC_DIR
from rlhf.feedback.writer import VoteWriter

TOKEN_LOOKUPS = 4  # token lookups (cache misses) that run at once; more wait their turn


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    db = Database(settings.db, settings.sqlite_synchronous)
    if settings.migrate_on_start:
        upgrade(db)
    with db.session() as session:
        app.state.secret = settings.secret or app_secret(session)
    app.state.db = db
    # rate limits, login limits and token revocations: shared by every worker (Redis or the database)
    shared = app.state.shared = open_shared(settings, db, app.state.secret)
    app.state.limiter = RateLimiter(settings.votes_per_minute, shared=shared)
    # Without Redis, several workers have no cheap shared auth epoch: each request reads the token's row,
    # so a revoked token is refused by every worker at once.
    cache_s = 0.0 if shared.where == "database" else settings.auth_cache_s
    app.state.auth_cache = AuthCache(cache_s, shared)
    app.state.token_lookups = asyncio.Semaphore(TOKEN_LOOKUPS)
    app.state.login_limits = LoginLimits(
        settings.login_attempts_per_address,
        settings.login_failures_per_account,
        settings.login_window_s,
        shared,
    )
    app.state.writer = VoteWriter(db)
    app.state.writer.start()
    # What start-up made (modules, routes, the app) lives as long as the process: moved out of the cyclic
    # collector's reach, later collections scan only requests' garbage, so their pauses stay short.
    # `rlhf label serve` switches the collector off while it imports (nothing it builds then is garbage).
    gc.freeze()
    gc.enable()
    yield
    app.state.writer.stop()
    await shared.aclose()
    db.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="rlhf-loop labeling",
        version=__version__,
        description="Human feedback for RLHF: comparison tasks, votes, statistics and exports.",
        lifespan=lifespan,
    )
    app.state.settings = settings or Settings.from_env()
    app.add_middleware(
        BodySizeLimit,
        max_bytes=app.state.settings.max_body_bytes,
        import_bytes=app.state.settings.max_import_bytes,
    )
    app.add_middleware(ServerTiming)
    add_error_handlers(app)
    # Routes are matched in order: the busiest (votes, tasks) first.
    for router in (votes, tasks, projects, users, health, pages_auth, pages_label, pages_admin):
        app.include_router(router.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn rlhf.feedback.main:app` builds the app from the environment on first access; importing this
    # module (as `rlhf label serve` and the tests do) builds nothing.
    if name == "app":
        return create_app()
    raise AttributeError(name)
