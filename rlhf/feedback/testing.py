"""Run the labeling server inside this process, on a free port, for tests and the end-to-end demo.

with run_server("sqlite:///runs/demo/feedback.db") as base_url:
    admin = make_user(db_url, "admin", role="admin")    # -> an API token
    client = FeedbackClient(base_url, admin)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from rlhf.feedback.db import Database, upgrade
from rlhf.feedback.main import create_app
from rlhf.feedback.settings import Settings
from rlhf.feedback.users import create_token, create_user


@contextmanager
def run_server(db_url: str, host: str = "127.0.0.1", port: int = 0, **settings: Any) -> Iterator[str]:
    """Serve the app from a background thread; yield its base URL ("http://127.0.0.1:PORT").

    `port=0` binds a free port. Extra keyword arguments override Settings fields. The per-labeler rate
    limit is off unless `votes_per_minute` is given: simulated panels vote faster than people can.
    The server is stopped, and its thread joined, when the block ends.
    """
    settings.setdefault("votes_per_minute", 0)
    app = create_app(Settings.from_env(db=db_url, **settings))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="rlhf-label-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the labeling server did not start (see the log above)")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def make_user(db_url: str, name: str, role: str = "labeler", password: str | None = None) -> str:
    """Create a user directly in the store (migrating it first) and return an API token for them."""
    db = Database(db_url)
    try:
        upgrade(db)
        with db.session() as session:
            create_user(session, name, role, password)
            return create_token(session, name, "testing")
    finally:
        db.dispose()
