"""Engine, sessions, write transactions and migrations of the feedback store.

SQLite (the embedded default) runs in WAL mode with foreign keys on and a busy timeout. Writes take a
process-wide lock and open with BEGIN IMMEDIATE: a deferred transaction that upgrades to a writer can fail
at once with "database is locked" (SQLITE_BUSY_SNAPSHOT), and threads of one process would otherwise
wait in SQLite's sleeping busy handler, which shows as latency spikes. PostgreSQL needs neither.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from rlhf.errors import ConfigError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# The newest migration's revision. Lets `upgrade` skip importing Alembic when the schema is current
# (server start-up time); a test checks it against the scripts.
SCHEMA_HEAD = "0005"


def normalize_url(url: str) -> str:
    """Map postgres:// and postgresql:// to the psycopg 3 driver; accept a bare file path as SQLite."""
    if "://" not in url:
        return f"sqlite:///{url}"
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    return url


def parse_url(url: str) -> URL:
    """The normalised URL, parsed; one that does not parse (a port that is no number) is a ConfigError."""
    try:
        return make_url(normalize_url(url))
    except (ArgumentError, ValueError):
        raise ConfigError(f"not a database URL: {url!r}") from None


class Database:
    """One engine and its session factory. `write(session)` wraps a write transaction."""

    def __init__(self, url: str, sqlite_synchronous: str = "NORMAL", pool_size: int = 20) -> None:
        self.url = normalize_url(url)
        parsed = parse_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if parsed.database in (None, "", ":memory:"):
                raise ConfigError(
                    "SQLite needs a file (sqlite:///path.db): an in-memory db is per connection"
                )
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(
                self.url,
                connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=pool_size,
                max_overflow=pool_size,
            )
            _sqlite_setup(self.engine, sqlite_synchronous)
        elif parsed.get_backend_name() == "postgresql":
            self.engine = create_engine(
                self.url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )
        else:
            raise ConfigError(
                f"unsupported database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql://"
            )
        self._write_lock: Any = threading.Lock() if self.is_sqlite else nullcontext()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False, info={"db": self})

    @contextmanager
    def write(self, session: Session) -> Iterator[None]:
        """A write transaction, committed at the end of the block, rolled back on error.

        Any read transaction the session holds is ended first, so the write starts from a fresh snapshot.
        """
        if session.in_transaction():
            session.commit()
        with self._write_lock:
            if self.is_sqlite:
                session.connection(execution_options={"sqlite_immediate": True})
            try:
                yield
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()


def db_of(session: Session) -> Database:
    db = session.info.get("db")
    if not isinstance(db, Database):
        raise RuntimeError("session was not made by Database.session()")
    return db


def _sqlite_setup(engine: Engine, synchronous: str) -> None:
    # The pysqlite driver's own transaction handling is switched off so that SQLAlchemy emits BEGIN itself
    # (the recipe in SQLAlchemy's SQLite docs); that is what makes BEGIN IMMEDIATE possible.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the schema to `revision` with Alembic (programmatic; the scripts ship inside the package)."""
    if revision == "head" and _stored_revision(db) == SCHEMA_HEAD:
        return
    # Alembic's own lines (a dozen "setup plugin ..." as it is imported, one per migration) say no more than the
    # one below
    alembic_log = logging.getLogger("alembic")
    level = alembic_log.level
    alembic_log.setLevel(max(level, logging.WARNING))
    try:
        from alembic import command

        with db._write_lock, db.engine.begin() as conn:
            command.upgrade(_alembic_config(conn), revision)
    finally:
        alembic_log.setLevel(level)
    log.info(
        "feedback store at %s migrated to %s", db.engine.url.render_as_string(hide_password=True), revision
    )


def _stored_revision(db: Database) -> str | None:
    try:
        with db.engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except OperationalError:
        return None
    except ProgrammingError:  # PostgreSQL: no such table
        return None


def current_revision(db: Database) -> str | None:
    from alembic.migration import MigrationContext

    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS_DIR))
    head = script.get_current_head()
    assert head is not None
    return head


def table_names(db: Database) -> list[str]:
    return sorted(inspect(db.engine).get_table_names())


def open_database(url: str, existing: bool = False) -> Database:
    """The database at `url`, migrated; an unreachable or unusable one is a one-line ConfigError. `existing`: a
    store read from must be there already; an SQLite file that is not (a mistyped path) is an error, never a new
    empty store."""
    parsed = parse_url(url)
    if existing and parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        raise ConfigError(f"no feedback store at {url}")
    db = Database(url)
    where = db.engine.url.render_as_string(hide_password=True)
    try:
        # a store read from is one already: a database of other tables (or an empty one) is not made into one
        if existing and not inspect(db.engine).has_table("alembic_version"):
            db.dispose()
            raise ConfigError(f"{where} is not a feedback store (it holds none of its tables)")
        upgrade(db)
    except DatabaseError as e:  # unreachable, refused, or a file that is not a database at all
        db.dispose()
        reason = str(e.orig or e).strip().splitlines()[0]
        raise ConfigError(f"cannot open the database {where}: {reason}") from None
    return db
