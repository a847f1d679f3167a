"""The write-job guard: one job at a time changes the looked-after table.

Dagster's run queue already limits runs tagged `rdw/db-writes` to one per deployment
(dagster.yaml); this PostgreSQL advisory lock extends that to two deployments, or a
person at psql, pointed at the same database. The second comer fails fast.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row

from rdw_tracking import catalog
from rdw_tracking.errors import refuse
from rdw_tracking.resources import (
    WRITE_GUARD,
    BoundedConnection,
    ServerSilent,
    TargetDatabase,
    short_statements,
)

LOCK_CLASS = 0x52445754  # "RDWT"
# How long a job that is ending waits for its unlock to be answered before it closes the
# session instead (which lets go of the lock on the server as well).
UNLOCK_WAIT_S = 10.0


def lock_key(db: TargetDatabase) -> tuple[int, int]:
    """Advisory lock key of the configured weeks table (two int4, as pg_locks shows them)."""
    name = f"{db.schema_name}.{db.weeks_table}".encode()
    return LOCK_CLASS, zlib.crc32(name) & 0x7FFFFFFF


# Who holds a database's write lock (its advisory lock), if anyone still does.
LOCK_HOLDER_SQL = """
SELECT a.pid, a.application_name, a.backend_start, a.state
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid = %s AND l.objid = %s AND l.objsubid = 2
  -- advisory locks belong to one database: not a same-named table's elsewhere
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def lock_holder(conn: psycopg.Connection, key: tuple[int, int]) -> str:
    with conn.cursor(row_factory=namedtuple_row) as by_name:
        row = by_name.execute(LOCK_HOLDER_SQL, list(key)).fetchone()
    if row is None:
        return "a session that has since let go"
    application = row.application_name or "no application_name"
    started = f"{row.backend_start:%Y-%m-%d %H:%M:%S}"
    return f"pid {row.pid} ({application}, connected {started} UTC, {row.state})"


# Whether this session still holds the write lock it took.
HOLDS_LOCK = """
SELECT EXISTS (SELECT 1 FROM pg_locks
               WHERE locktype = 'advisory' AND granted AND classid = %s AND objid = %s
                 AND objsubid = 2 AND pid = pg_backend_pid())
"""


@dataclass
class WriteLock:
    """The write lock a job holds, on a session of its own (`conn`, backend `pid`).

    Nobody uses that session after taking the lock, so nothing would notice it being
    terminated (an operator, a pooler, a restart): `check()` asks it whether it still
    holds the lock and refuses when not. Every `TargetDatabase.connect` inside
    `exclusive_write` calls it; write paths also call it before each batch or DDL
    (`check_write_lock()` finds the job's lock without being handed it).
    """

    db: TargetDatabase
    job_name: str
    key: tuple[int, int]
    conn: psycopg.Connection
    pid: int

    silent: bool = False  # the session stopped answering (not: terminated)

    def check(self) -> None:
        try:
            held = self.conn.execute(HOLDS_LOCK, list(self.key)).fetchone()[0]
        except ServerSilent as err:
            self.silent = True
            raise refuse(self.silent_message(err)) from None
        except psycopg.Error:
            held = False
        if not held:
            raise refuse(self.lost_message())

    def silent_message(self, err: ServerSilent) -> str:
        return (
            f"{self.job_name} stopped: the connection to {self.db.describe()} holding its "
            f"write lock on {self.db.qualified(self.db.weeks_table)} was lost ({err}); "
            "nothing more was changed after that. Check the network to the server, then "
            "run the job again: it continues where it stopped"
        )

    def lost_message(self) -> str:
        return (
            f"{self.job_name} stopped: its write lock on {self.db.qualified(self.db.weeks_table)} "
            f"was lost (session pid {self.pid} was terminated or let go), so another write job "
            "could now run beside it; nothing more was changed after the loss was seen. Check "
            "what else is writing to the table, then run the job again"
        )


def write_lock_silent() -> bool:
    """Whether the write lock's session of the job running here stopped answering."""
    lock = WRITE_GUARD.get()
    return bool(lock is not None and lock.silent)


def check_write_lock() -> None:
    """Refuse unless the write lock of the job running in this context is still held
    (no-op outside `exclusive_write`): call it before each batch or DDL."""
    lock = WRITE_GUARD.get()
    if lock is not None:
        lock.check()


@contextmanager
def exclusive_write(db: TargetDatabase, job_name: str) -> Iterator[WriteLock]:
    """Hold the write lock for `job_name` on a session of its own; refuse if it is taken.

    Yields the `WriteLock` (its `conn` is the autocommit session holding it); the work
    itself uses other connections, each of which checks the lock is still held as it
    opens. The job fails if the lock turns out lost when it ends (the unlock finds
    nothing to release), rather than reporting unguarded work as a success.
    """
    key = lock_key(db)
    with db.connect(autocommit=True) as conn:
        conn.execute(
            "SELECT set_config('application_name', %s, false)", [f"rdw_tracking:{job_name}"]
        )
        if not conn.execute("SELECT pg_try_advisory_lock(%s, %s)", list(key)).fetchone()[0]:
            raise refuse(
                f"{job_name} refused: another rdw_tracking write job is changing "
                f"{db.qualified(db.weeks_table)} ({lock_holder(conn, key)}); "
                "wait for it to finish, then run this job again"
            )
        # Its checks are short: a silent server fails the job within about a minute.
        short_statements(conn, db.statement_timeout_ms)
        lock = WriteLock(db, job_name, key, conn, conn.info.backend_pid)
        token = WRITE_GUARD.set(lock)
        try:
            yield lock
        except BaseException:
            WRITE_GUARD.reset(token)
            _unlock(lock)  # the job's own error is the one to report
            raise
        WRITE_GUARD.reset(token)
        if not _unlock(lock):
            raise refuse(lock.lost_message())


def _unlock(lock: WriteLock) -> bool:
    """Release the lock; False when there was none to release (session gone or lock lost)."""
    if lock.silent or lock.conn.closed:
        return False  # the server lets go when the session ends (the connection closes)
    if isinstance(lock.conn, BoundedConnection):  # leaving: wait briefly, then close
        lock.conn.deadline_s = min(lock.conn.deadline_s or UNLOCK_WAIT_S, UNLOCK_WAIT_S)
    try:
        return bool(
            lock.conn.execute("SELECT pg_advisory_unlock(%s, %s)", list(lock.key)).fetchone()[0]
        )
    except psycopg.Error:
        return False


# -- grants: checked before the first change, so a refusal leaves nothing half done ------

TABLE_RIGHTS = ("SELECT", "INSERT", "UPDATE", "REFERENCES")


@dataclass(frozen=True)
class Need:
    """Rights a job needs on `schema.table`: "OWNER", "CREATE" (on the table's schema,
    to create an index there) and/or table privileges.

    With `create_if_missing`, a missing table is fine when the role may create it
    (CREATE on the schema), as the rollback does with its backup tables.
    """

    schema: str
    table: str
    rights: tuple[str, ...]
    update_columns: tuple[str, ...] = ()
    create_if_missing: bool = False
    field: str = "target_db.schema_name and the table names"


def weeks_need(db: TargetDatabase, *rights: str, update_columns: tuple[str, ...] = ()) -> Need:
    return Need(
        db.schema_name,
        db.weeks_table,
        rights,
        update_columns,
        field="target_db.schema_name and target_db.weeks_table",
    )


def missing_grants(db: TargetDatabase, needs: list[Need]) -> tuple[str, list[str]]:
    """(the connected role, each right it lacks as `UPDATE on public.report_data_weeks`
    followed by the statement that grants it). Refuses when a needed table is missing."""
    missing: list[str] = []
    role = "?"
    with db.cursor() as cur:
        for need in needs:
            label = f"{need.schema}.{need.table}"
            access = catalog.table_access(cur, need.schema, need.table, need.update_columns)
            if access is None:
                found = catalog.schema_access(cur, need.schema)
                if need.create_if_missing and found is not None:
                    role = found.role
                    if not found.create:
                        missing.append(
                            f"CREATE on schema {need.schema} (to create {label}): "
                            f"GRANT USAGE, CREATE ON SCHEMA {_quoted(need.schema)} TO {_quoted(role)}"
                        )
                    continue
                what = f"schema {need.schema}" if found is None else f"table {label}"
                raise refuse(f"{what} does not exist; check {need.field}")
            role = access.role
            target = _quoted(need.schema, need.table)
            if not access.usage:
                missing.append(
                    f"USAGE on schema {need.schema}: "
                    f"GRANT USAGE ON SCHEMA {_quoted(need.schema)} TO {_quoted(role)}"
                )
            if "OWNER" in need.rights and not access.owns:
                missing.append(
                    f"ownership of {label} (owner {access.owner}): run the job as "
                    f"{access.owner} or as a member of that role"
                )
            if "CREATE" in need.rights and not access.schema_create:
                missing.append(
                    f"CREATE on schema {need.schema} (an index on {label} is created there): "
                    f"GRANT CREATE ON SCHEMA {_quoted(need.schema)} TO {_quoted(role)}"
                )
            lacking = [
                r for r in TABLE_RIGHTS if r in need.rights and not getattr(access, r.lower())
            ]
            if lacking:
                columns = f" ({', '.join(need.update_columns)})" if need.update_columns else ""
                rights = ", ".join(r + (columns if r == "UPDATE" else "") for r in lacking)
                missing.append(
                    f"{', '.join(lacking)} on {label}: GRANT {rights} ON {target} TO {_quoted(role)}"
                )
    return role, missing


def refuse_without_grants(db: TargetDatabase, job_name: str, needs: list[Need]) -> None:
    """Refuse, before any change, naming every right the connected role lacks."""
    role, missing = missing_grants(db, needs)
    if missing:
        raise refuse(
            f"{job_name} needs rights that role {role} lacks; nothing was changed. "
            + "; ".join(missing),
            missing_grants=missing,
        )


def _quoted(*names: str) -> str:
    return sql.Identifier(*names).as_string(None)
