"""One short transaction per batch: the batch connection, the retries after a lock
timeout or deadlock, and the sessions named when the locks stay taken."""

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.rows import class_row

from rdw_tracking.errors import refuse
from rdw_tracking.indexes.sessions import Session, describe
from rdw_tracking.resources import ServerSilent, TargetDatabase, short_statements
from rdw_tracking.rollback import ROLLBACK_JOB
from rdw_tracking.writes import check_write_lock, write_lock_silent

LOCK_ATTEMPTS = 5

# Sessions that can be in a batch's way: open transactions holding more than a read lock
# on one of the tables (a row lock comes with ROW SHARE, a write with ROW EXCLUSIVE). Row
# locks themselves are not in pg_locks, so this names every such session, oldest first.
_LOCK_HOLDERS = """
SELECT a.pid, a.application_name AS application, a.query_start, a.state
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL
  AND EXISTS (SELECT 1 FROM pg_locks l
              WHERE l.pid = a.pid AND l.granted AND l.locktype = 'relation'
                AND l.mode <> 'AccessShareLock'
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.relation = ANY(ARRAY(SELECT to_regclass(t) FROM unnest(%s::text[]) AS t)))
ORDER BY a.xact_start, a.pid
"""


def lock_holders(conn: psycopg.Connection, tables: Sequence[sql.Identifier]) -> list[Session]:
    """Other sessions holding more than a read lock on `tables`, oldest transaction first."""
    names = [table.as_string(conn) for table in tables]
    with conn.cursor(row_factory=class_row(Session)) as cur:
        return cur.execute(_LOCK_HOLDERS, [names]).fetchall()


@contextmanager
def batch_connection(
    db: TargetDatabase, application_name: str, lock_timeout_ms: int, job: str = ROLLBACK_JOB
) -> Iterator[psycopg.Connection]:
    """An autocommit connection named `application_name`; each batch is one explicit
    transaction on it. A lock wait outside the batches (another session holding the
    whole table) and a lost connection end `job` with a message saying who and what next."""
    weeks = db.qualified(db.weeks_table)
    with db.connect(autocommit=True) as conn:
        conn.execute("SELECT set_config('application_name', %s, false)", [application_name])
        conn.execute("SELECT set_config('lock_timeout', %s, false)", [f"{lock_timeout_ms}ms"])
        # Batches and the catalog looks between them are short: a silent peer fails the
        # job within about a minute; the scans of the whole table lift it (long_statements).
        short_statements(conn, db.statement_timeout_ms)
        lost = (
            f"the connection to {db.describe()} was lost during {job} of {weeks}; every "
            f"finished batch is committed: run {job} again with the same config to "
            "continue where it stopped"
        )
        try:
            with refuse_if_lost(conn, lost):
                yield conn
        except errors.LockNotAvailable:
            holders = describe(lock_holders(conn, [db.weeks]))
            raise refuse(
                f"{job} gave up after waiting {lock_timeout_ms} ms for a lock on {weeks} held "
                f"by {holders}; run {job} again once that session has finished",
                blocking_sessions=holders,
            ) from None


@contextmanager
def refuse_if_lost(conn: psycopg.Connection, message: str) -> Iterator[None]:
    """End the run with `message` (saying how to continue) when `conn` is lost; a
    cancelled statement or a lock timeout goes on up as it is."""
    try:
        yield
    except psycopg.OperationalError as err:
        if not conn.broken:  # a cancelled statement, not a lost connection
            raise
        if isinstance(err, ServerSilent):  # say why: the server stopped answering
            message = message.replace(" was lost", f" was lost ({err})", 1)
        raise refuse(message) from None


def in_one_transaction(
    conn: psycopg.Connection,
    work: Callable[[psycopg.Connection], Any],
    what: str,
    tables: Sequence[sql.Identifier] = (),
) -> tuple[Any, float]:
    """`work(conn)` in a transaction, retried after a lock timeout or deadlock; (result, ms).

    Gives up after LOCK_ATTEMPTS, naming the sessions holding locks on `tables`.

    The transaction commits without waiting for its WAL to reach disk (synchronous_commit
    off, for it alone): a batch's commit then never queues behind a checkpoint's fsyncs,
    which made the longest batches. Nothing can be lost by it. A server crash can undo
    only whole batches (rows, their backup and the progress mark commit together), and
    the next run does them again; the callers end with a normal commit (the run marked
    finished), which flushes every batch before the job reports success.
    """
    for attempt in range(LOCK_ATTEMPTS):
        try:
            check_write_lock()  # a job whose write lock was lost must not write on
        except Exception:  # its refusal
            # A server restart ends this session too: then say so (and how to continue);
            # a silent server would only keep this probe waiting too.
            if not write_lock_silent():
                conn.execute("SELECT 1")
            raise
        started = time.monotonic()
        try:
            with conn.transaction():
                conn.execute("SET LOCAL synchronous_commit = off")
                result = work(conn)
            return result, (time.monotonic() - started) * 1000
        except (errors.LockNotAvailable, errors.DeadlockDetected):
            time.sleep(0.1 * 2**attempt)
    lock_timeout = conn.execute("SHOW lock_timeout").fetchone()[0]
    holders = describe(lock_holders(conn, tables))
    raise refuse(
        f"{what}: rows stayed locked by other transactions through {LOCK_ATTEMPTS} attempts "
        f"of up to {lock_timeout} each; held by {holders}. End that session or let it "
        "finish, then run the job again to continue",
        blocking_sessions=holders,
    )
