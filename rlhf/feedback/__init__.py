"""The human-feedback labeling web app and its store (FastAPI, SQLAlchemy, Alembic, Jinja2).

Never imports torch: the server stays light and starts in about a second.
"""
