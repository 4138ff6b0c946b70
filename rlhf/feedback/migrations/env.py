"""Alembic environment of the feedback store. Run programmatically by `rlhf.feedback.db.upgrade`,
which passes an open connection in `config.attributes["connection"]`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from rlhf.feedback.db import normalize_url
from rlhf.feedback.models import Base
from rlhf.feedback.settings import Settings

target_metadata = Base.metadata


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        # Plain `alembic` command line: connect to the URL in RLHF_LABEL_DB.
        engine = create_engine(normalize_url(Settings.from_env().db))
        with engine.begin() as conn:
            context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
