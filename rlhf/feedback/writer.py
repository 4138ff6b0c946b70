"""Where the server's votes are written: group commit, one writer thread per server process.

Under load many votes arrive while one is being written, so instead of a transaction each (each waiting
for SQLite's write lock, or each a thread-pool hop and a commit of its own on PostgreSQL), one writer
thread takes every vote waiting, writes them in one transaction with a few statements for the whole batch
(a refused vote writes nothing, so it fails alone; a constraint hit after a write sends the batch round
again, vote by vote with a SAVEPOINT each),
commits once, and only then answers all of them. A vote is acknowledged only after the commit that holds
it; if that commit fails, every vote in it gets the error. Requests wait on a future, so an API vote costs
no thread-pool hop.

On PostgreSQL several server processes write batches at once: a batch takes its tasks' row locks first,
in task order, so two batches cannot deadlock on them, and a batch PostgreSQL still aborts (a deadlock or
serialization failure elsewhere) is written again, up to RETRIES times.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from rlhf.feedback.db import Database
from rlhf.feedback.errors import Conflict, FeedbackError
from rlhf.feedback.metrics import VOTE_BATCH
from rlhf.feedback.models import User
from rlhf.feedback.schemas import VoteIn
from rlhf.feedback.vote_batch import write_votes
from rlhf.feedback.votes import Recorded, record_vote, settle, write_vote

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    user: User
    data: VoteIn
    source: str
    future: Future[Recorded] = field(default_factory=Future)


class VoteWriter:
    RETRIES = 3

    def __init__(self, db: Database, max_batch: int = 256, group_commit: bool | None = None) -> None:
        """`group_commit=False`: each vote in its own transaction on the thread pool (record_vote)."""
        self.db = db
        self.max_batch = max_batch
        self.group_commit = True if group_commit is None else group_commit  # off: one transaction per vote
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="rlhf-vote-writer", daemon=True)
        self._stopped = False

    def start(self) -> None:
        if self.group_commit:
            self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        self._stopped = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)

    def submit(self, user: User, data: VoteIn, source: str) -> Future[Recorded]:
        """Queue a vote (votes queued before start() go into the first batch)."""
        if self._stopped:
            raise RuntimeError("the vote writer has stopped")
        pending = _Pending(user, data, source)
        self._queue.put(pending)
        return pending.future

    async def record(self, user: User, data: VoteIn, source: str) -> Recorded:
        """Store a vote (or find the earlier one with its key); returns once it is committed."""
        if not self.group_commit:
            return await run_in_threadpool(self._record_one, user, data, source)
        return await asyncio.wrap_future(self.submit(user, data, source))

    def _record_one(self, user: User, data: VoteIn, source: str) -> Recorded:
        with self.db.session() as session:
            return record_vote(session, user, data, source)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            VOTE_BATCH.observe(len(batch))
            self._write(batch)
            if stop:
                return

    def _write(self, batch: list[_Pending]) -> None:
        batch.sort(key=lambda item: item.data.task_id)  # row locks in one order: batches cannot deadlock
        try:
            outcomes = self._write_retrying(batch)
        except Exception as e:  # the commit (or the database) failed: nothing in this batch was stored
            log.exception("vote batch of %d failed", len(batch))
            for item in batch:
                item.future.set_exception(e)
            return
        for item, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, FeedbackError):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

    def _write_retrying(self, batch: list[_Pending]) -> list[Recorded | FeedbackError]:
        savepoints = False
        for attempt in range(self.RETRIES + 1):
            try:
                return self._write_batch(batch, savepoints)
            except _NeedsSavepoints:  # rolled back: write the batch again, each vote in a savepoint
                savepoints = True
            except OperationalError as e:  # rolled back by PostgreSQL: a deadlock or serialization failure
                if getattr(e.orig, "sqlstate", None) not in ("40P01", "40001") or attempt == self.RETRIES:
                    raise
                log.warning(
                    "vote batch of %d aborted by the database (%s); writing it again", len(batch), e.orig
                )
        return self._write_batch(batch, savepoints=True)

    def _write_batch(self, batch: list[_Pending], savepoints: bool) -> list[Recorded | FeedbackError]:
        """One transaction for the batch: write_votes, a few statements for all of it (a refused vote
        writes nothing). An IntegrityError comes after writes, so then the whole batch is rolled back and
        written again vote by vote (write_vote) with a savepoint each (SAVEPOINT and RELEASE cost as much as
        the vote itself, and the conflicts that need them are rare)."""
        outcomes: list[Recorded | FeedbackError] = []
        with self.db.session() as session, self.db.write(session):
            conn = session.connection()
            if not savepoints:
                try:
                    return write_votes(session, [(item.user, item.data, item.source) for item in batch], conn)
                except IntegrityError as e:
                    raise _NeedsSavepoints from e
            for item in batch:
                savepoint = conn.begin_nested() if savepoints else None
                try:
                    outcomes.append(write_vote(session, item.user, item.data, item.source, conn))
                    if savepoint is not None:
                        savepoint.commit()
                except IntegrityError as e:
                    if savepoint is None:
                        raise _NeedsSavepoints from e
                    savepoint.rollback()
                    outcomes.append(_settled(session, item, e))
                except FeedbackError as e:
                    if savepoint is not None:
                        savepoint.rollback()
                    outcomes.append(_settled(session, item, e))
        return outcomes


class _NeedsSavepoints(Exception):
    """A vote of the batch hit a constraint after writing: the batch must be written with savepoints."""


def _settled(
    session: Session, item: _Pending, error: IntegrityError | FeedbackError
) -> Recorded | FeedbackError:
    """What a vote that failed inside the batch is answered with: a replay of an earlier vote with its
    key, or the error."""
    if not isinstance(error, IntegrityError | Conflict):
        return error
    try:
        return settle(session, item.user, item.data, error)
    except FeedbackError as final:
        return final
