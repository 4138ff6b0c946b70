"""`rlhf label ...`: serve the labeling app, migrate, import candidates, export preferences, users, tokens."""

from __future__ import annotations

import gc
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rlhf.errors import ConfigError, DataError

if TYPE_CHECKING:
    from rlhf.feedback.db import Database

# Heavy imports (FastAPI, SQLAlchemy, uvicorn) happen inside the commands, so `rlhf --help` stays quick.

app = typer.Typer(help="The human-feedback labeling app and its store.", no_args_is_help=True)
db_app = typer.Typer(
    help="Database schema (Alembic migrations shipped with the package).", no_args_is_help=True
)
user_app = typer.Typer(help="Labelers and admins.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens for scripts and API clients.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")

DbOpt = Annotated[
    str,
    typer.Option(
        "--db", envvar="RLHF_LABEL_DB", help="Database URL: sqlite:///FILE (default) or postgresql://..."
    ),
]
DEFAULT_DB = "sqlite:///feedback.db"


def check_port_free(host: str, port: int) -> None:
    """A port another process listens on, as one line before start-up (models, migrations), where uvicorn would
    say "Application startup complete" and then fail to bind. rlhf serve and rlhf gateway call it too. A process
    that takes the port between this check and uvicorn's bind still meets uvicorn's own error."""
    if port == 0:  # any free port
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None


def open_database(url: str, existing: bool = False) -> Database:
    """rlhf.feedback.db.open_database, imported when a command runs (SQLAlchemy is heavy for `--help`)."""
    from rlhf.feedback.db import open_database as open_store

    return open_store(url, existing)


@app.command()
def serve(
    db: DbOpt = DEFAULT_DB,
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0 for a team on the network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Server processes (one per core suits PostgreSQL); they share limits and revocations "
            "through Redis (RLHF_LABEL_REDIS_URL) or else the database.",
        ),
    ] = 1,
    redis_url: Annotated[
        str | None,
        typer.Option(envvar="RLHF_LABEL_REDIS_URL", help="Redis shared by the server processes."),
    ] = None,
) -> None:
    """Run the labeling server (migrates the database first). Other settings come from RLHF_LABEL_* variables."""
    # Start-up is mostly imports (FastAPI, pydantic, SQLAlchemy), which make many objects and no garbage: the
    # cyclic collector's passes over them are wasted, so it is off until the app has started (its lifespan
    # freezes what start-up made and switches it back on).
    gc.disable()
    # pydantic looks for plugins by reading the entry points of every installed package, which in an
    # environment with the training stack costs more than building the app; PYDANTIC_DISABLE_PLUGINS=
    # (empty) turns them back on.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    import uvicorn

    from rlhf.feedback.main import create_app
    from rlhf.feedback.settings import Settings

    settings = Settings.from_env(db=db, workers=workers, redis_url=redis_url)
    check_port_free(host, port)
    open_database(settings.db).dispose()  # migrate first, so a bad URL is one line here, not a traceback
    if (
        settings.redis_url
    ):  # and Redis: one unreachable is one line here, not each worker's start-up traceback
        from rlhf.feedback.shared import RedisShared

        RedisShared(settings.redis_url).client.close()
    typer.echo(
        f"labeling app on http://{host}:{port}  (db: {settings.db.split('@')[-1]}, workers: {workers})"
    )
    if workers == 1:
        uvicorn.run(
            create_app(settings), host=host, port=port, log_level=log_level, access_log=False, ws="none"
        )
        return
    # Worker processes build the app from the environment (uvicorn imports it by name in each one); the
    # supervisor starts a new worker in place of one that dies.
    os.environ.update({"RLHF_LABEL_DB": settings.db, "RLHF_LABEL_WORKERS": str(workers)})
    os.environ["RLHF_LABEL_MIGRATE_ON_START"] = "false"
    if settings.redis_url:
        os.environ["RLHF_LABEL_REDIS_URL"] = settings.redis_url
    uvicorn.run(
        "rlhf.feedback.main:app",
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
        ws="none",
    )


@db_app.command("upgrade")
def db_upgrade(db: DbOpt = DEFAULT_DB) -> None:
    """Create or update the schema to the newest migration."""
    from rlhf.feedback.db import current_revision

    typer.echo(f"schema at revision {current_revision(open_database(db))}")


@app.command("import")
def import_(
    project: Annotated[str, typer.Option(help="Project name (created if missing).")],
    candidates: Annotated[
        Path | None, typer.Option(help="JSONL of {prompt, prompt_id?, completions: [...]} rows.")
    ] = None,
    db: DbOpt = DEFAULT_DB,
    preferences: Annotated[
        str | None,
        typer.Option(
            help="Instead of candidates: preference records in any layout of docs/formats.md, stored as votes "
            "of --labeler (a JSONL/JSON/Parquet/CSV file, a saved datasets folder or NAME[:CONFIG][@SPLIT]).",
        ),
    ] = None,
    labeler: Annotated[
        str | None,
        typer.Option(help="With --preferences: the labeler the votes belong to (created if missing)."),
    ] = None,
    format: Annotated[
        str, typer.Option(help="With --preferences: their layout (auto = detected per row).")
    ] = "auto",
    columns: Annotated[
        str | None,
        typer.Option(
            help="With --preferences: our field=their column, comma-separated, e.g. prompt=question."
        ),
    ] = None,
    skip_bad_rows: Annotated[
        bool,
        typer.Option(
            help="With --preferences: skip malformed rows (counted and reported) instead of stopping."
        ),
    ] = False,
    gold: Annotated[
        Path | None, typer.Option(help="JSONL of vote rows whose choice (A/B) is the right answer.")
    ] = None,
    task_kind: Annotated[str, typer.Option(help="pairwise, ranking or rating.")] = "pairwise",
    overlap: Annotated[
        int | None, typer.Option(help="Labelers per task (default 1 for a new project).")
    ] = None,
    gold_rate: Annotated[
        float | None, typer.Option(help="Chance that the next task served is gold (0..1).")
    ] = None,
    guidelines: Annotated[
        Path | None, typer.Option(help="Markdown file of labeling guidelines, shown with every task.")
    ] = None,
    axes: Annotated[
        str | None, typer.Option(help="Judgement axes asked beside the choice, e.g. helpful,honest,harmless.")
    ] = None,
) -> None:
    """Create comparison tasks from candidate generations, or store existing preferences as a labeler's votes."""
    if (candidates is None) == (preferences is None):
        raise DataError("give either --candidates or --preferences (with --labeler)")
    if preferences is not None:
        given = [gold, overlap, gold_rate, guidelines, axes, None if task_kind == "pairwise" else task_kind]
        if any(option is not None for option in given):
            raise DataError(
                "--task-kind, --gold, --overlap, --gold-rate, --guidelines and --axes go with --candidates"
            )
        import_preference_votes(project, preferences, labeler, db, format, columns, skip_bad_rows)
        return
    assert candidates is not None
    from rlhf.feedback.importer import import_candidates, read_rows
    from rlhf.feedback.projects import update_project
    from rlhf.feedback.schemas import MAX_GUIDELINES_CHARS, PROJECT_PATTERN, CandidateRow, GoldRow
    from rlhf.feedback.settings import Settings

    if not re.match(PROJECT_PATTERN, project):
        raise DataError(f"project name {project!r}: use letters, digits, '_', '.', '-' (up to 128)")
    if task_kind not in ("pairwise", "ranking", "rating"):
        raise DataError(f"--task-kind must be pairwise, ranking or rating, got {task_kind!r}")
    if overlap is not None and not 1 <= overlap <= 100:
        raise DataError("--overlap must be between 1 and 100")
    if gold_rate is not None and not 0 <= gold_rate <= 1:
        raise DataError("--gold-rate must be between 0 and 1")
    axis_list = [a.strip() for a in axes.split(",") if a.strip()] if axes is not None else None
    if axis_list is not None and not all(re.match(r"^[a-z][a-z_]{0,31}$", a) for a in axis_list):
        raise DataError(f"--axes {axes!r}: comma-separated names of lower-case letters and '_'")
    guideline_text = None
    if guidelines is not None:
        if not guidelines.is_file():
            raise DataError(f"{guidelines}: file not found")
        guideline_text = guidelines.read_text(encoding="utf-8")
        if len(guideline_text) > MAX_GUIDELINES_CHARS:
            raise DataError(f"{guidelines}: over {MAX_GUIDELINES_CHARS} characters")
    limit = Settings.from_env().max_import_bytes
    rows = read_rows(candidates, CandidateRow, limit)
    gold_rows = read_rows(gold, GoldRow, limit) if gold else []
    database = open_database(db)
    with database.session() as session:
        out = import_candidates(
            session, project, rows, task_kind=task_kind, gold=gold_rows, overlap=overlap, gold_rate=gold_rate,
            source=str(candidates),
        )  # fmt: skip
        if guideline_text is not None or axis_list is not None:
            update_project(session, project, guidelines=guideline_text, axes=axis_list)
    typer.echo(
        f"{project}: {out.prompts} prompts, {out.completions} completions, {out.tasks} {task_kind} tasks, "
        f"{out.gold_tasks} gold tasks ({out.skipped} rows already there)"
    )


def import_preference_votes(
    project: str,
    source: str,
    labeler: str | None,
    db: str,
    fmt: str,
    columns: str | None,
    skip_bad_rows: bool,
) -> None:
    """`label import --preferences`: read every record, then store them all in one transaction."""
    from typing import cast, get_args

    from rlhf.data.preferences import Format, read_records
    from rlhf.feedback.preference_import import import_preferences
    from rlhf.feedback.schemas import NAME_PATTERN, PROJECT_PATTERN

    if not re.match(PROJECT_PATTERN, project):
        raise DataError(f"project name {project!r}: use letters, digits, '_', '.', '-' (up to 128)")
    if labeler is None or not re.match(NAME_PATTERN, labeler):
        raise DataError(
            f"--preferences needs --labeler NAME (letters, digits, '_', '.', '@', '-'), got {labeler!r}"
        )
    if fmt not in get_args(Format):
        raise DataError(f"--format must be one of {', '.join(get_args(Format))}, got {fmt!r}")
    mapping = {}
    for item in (columns or "").split(","):
        ours, sep, theirs = item.partition("=")
        if not item.strip():
            continue
        if not sep or not ours.strip() or not theirs.strip():
            raise DataError(f"--columns {columns!r}: expected FIELD=COLUMN pairs, e.g. prompt=question")
        mapping[ours.strip()] = theirs.strip()
    skipped: list[str] | None = [] if skip_bad_rows else None
    records = read_records(source, cast(Format, fmt), skipped, mapping)
    database = open_database(db)
    with database.session() as session:
        out = import_preferences(session, project, labeler, records, skipped=skipped)
    typer.echo(
        f"{project}: {out.votes} votes of {labeler} on {out.tasks} tasks ({out.prompts} prompts, "
        f"{out.completions} completions; {out.already} records already there)"
    )
    if out.gold:
        typer.echo(
            f"left out {out.gold} votes on gold items (they check a labeler; they are not preferences)"
        )
    if out.skipped:
        typer.echo(f"skipped {len(out.skipped)} malformed rows (first: {out.skipped[0]})")


@app.command()
def export(
    project: Annotated[str, typer.Option(help="Project name.")],
    out: Annotated[Path, typer.Option(help="Output JSONL file (written atomically).")],
    db: DbOpt = DEFAULT_DB,
    format: Annotated[
        str,
        typer.Option(
            help="votes, pairs (TRL), ranking, rating, axes (per-axis judgements) or sft (rewrites)."
        ),
    ] = "votes",
) -> None:
    """Write the project's live votes as preference records."""
    from rlhf.data.jsonl import check_output_file, write_jsonl
    from rlhf.feedback.export import FORMATS, export_records

    if format not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    check_output_file(out, "--out")
    database = open_database(db, existing=True)  # votes come from a store that is there, never a new one
    with database.session() as session:
        n = write_jsonl(out, export_records(session, project, format))
    typer.echo(
        f"wrote {n} {format} records to {out}", err=True
    )  # `--out /dev/stdout | jq` gets the records alone


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Option(help="Login name.")],
    db: DbOpt = DEFAULT_DB,
    role: Annotated[str, typer.Option(help="admin or labeler.")] = "labeler",
    password: Annotated[
        str | None,
        typer.Option(help="Password for the web login (prompted for if omitted; empty: API only)."),
    ] = None,
) -> None:
    """Create a user."""
    from rlhf.feedback.schemas import NAME_PATTERN
    from rlhf.feedback.users import create_user

    if not re.match(NAME_PATTERN, name):
        raise DataError(f"user name {name!r}: use letters, digits, '_', '.', '@', '-' (up to 64)")
    if password is None:
        password = typer.prompt(
            "Password (empty: API token only)", hide_input=True, default="", show_default=False
        )
    if password and len(password) < 8:
        raise DataError("passwords need at least 8 characters")
    database = open_database(db)
    with database.session() as session:
        create_user(session, name, role, password or None)
    typer.echo(f"created {role} {name}")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="The user the token acts as.")],
    db: DbOpt = DEFAULT_DB,
    label: Annotated[str, typer.Option(help="A note on what the token is for, stored with it.")] = "",
) -> None:
    """Create an API token and print it (it is shown this once; only its hash is stored)."""
    from rlhf.feedback.users import create_token

    database = open_database(db)
    with database.session() as session:
        typer.echo(create_token(session, name, label))
