"""Who holds the lock: the sessions that would stall (or are stalling) DDL on a table,
named as much as is safe to log, and `LockWait`, the error that names them."""

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import class_row

from rdw_tracking.indexes.connections import autocommit
from rdw_tracking.resources import TargetDatabase


@dataclass(frozen=True)
class Session:
    """Another session, as much of it as is safe to log (never its query text)."""

    pid: int
    application: str | None
    query_start: datetime | None
    state: str | None

    def __str__(self) -> str:
        started = (
            f"query started {self.query_start:%Y-%m-%d %H:%M:%S} UTC"
            if self.query_start
            else "query start not visible (grant pg_read_all_stats to see it)"
        )
        state = f", {self.state}" if self.state else ""
        return f"pid {self.pid} (application {self.application or '(none)'!r}, {started}{state})"


class LockWait(Exception):
    """A statement gave up waiting for a lock (or did not start because it would have)."""

    def __init__(self, what: str, blockers: list[Session]):
        self.what = what
        self.blockers = blockers
        super().__init__(f"{what}: waiting for {describe(blockers)}")


def describe(blockers: list[Session]) -> str:
    return "; ".join(map(str, blockers)) or "a session that has since let go"


def _sessions(conn: psycopg.Connection, query: str, params: dict | list) -> list[Session]:
    with conn.cursor(row_factory=class_row(Session)) as cur:
        return cur.execute(query, params).fetchall()


_SESSIONS = """
    SELECT a.pid, a.application_name AS application, a.query_start, a.state
    FROM pg_stat_activity a WHERE a.pid = ANY(%s) ORDER BY a.pid
"""


def sessions_of(conn: psycopg.Connection, pids: list[int]) -> list[Session]:
    """The sessions of `pids` still connected."""
    return _sessions(conn, _SESSIONS, [pids])


# Sessions that would make a concurrent build (or its cleanup) wait until they end:
# an open transaction idle at the client, or one older than our lock wait, holding a lock
# on the table that conflicts with a build; with `snapshots`, also any idle transaction
# holding a snapshot, which the build's last phase waits out.
_STUCK_HOLDERS = """
    SELECT a.pid, a.application_name AS application, a.query_start, a.state
    FROM pg_stat_activity a
    WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
      AND a.backend_type = 'client backend' AND a.xact_start IS NOT NULL
      AND (a.state LIKE 'idle in transaction%%'
           OR a.xact_start < now() - make_interval(secs => %(wait_s)s))
      AND (EXISTS (SELECT 1 FROM pg_locks l
                   WHERE l.pid = a.pid AND l.granted AND l.locktype = 'relation'
                     AND l.mode NOT IN ('AccessShareLock', 'RowShareLock')
                     AND l.relation = (SELECT c.oid FROM pg_class c
                                       JOIN pg_namespace n ON n.oid = c.relnamespace
                                       WHERE n.nspname = %(schema)s AND c.relname = %(table)s))
           OR (%(snapshots)s AND a.backend_xmin IS NOT NULL
               AND a.state LIKE 'idle in transaction%%'))
    ORDER BY a.xact_start
"""


def stuck_lock_holders(
    db: TargetDatabase,
    tables: list[str],
    snapshots: bool = True,
    schema: str | None = None,
    conn: psycopg.Connection | None = None,
) -> list[Session]:
    """Sessions that would hold DDL on `tables` (of `schema`, default the configured one)
    beyond the lock timeout."""
    with autocommit(db, conn) as conn:
        found: dict[int, Session] = {}
        for table in tables:
            params = {
                "wait_s": db.lock_timeout_ms / 1000,
                "schema": schema or db.schema_name,
                "table": table,
                "snapshots": snapshots,
            }
            for session in _sessions(conn, _STUCK_HOLDERS, params):
                found.setdefault(session.pid, session)
    return list(found.values())


def raise_if_stuck(
    db: TargetDatabase,
    tables: list[str],
    what: str,
    snapshots: bool,
    schema: str | None = None,
    conn: psycopg.Connection | None = None,
) -> None:
    """Don't start DDL that would only wait out its lock timeout behind an idle session."""
    stuck = stuck_lock_holders(db, tables, snapshots, schema, conn)
    if stuck:
        raise LockWait(what, stuck)


# Another session's CREATE INDEX CONCURRENTLY of this very index: its index is INVALID
# until it finishes, and is not ours to drop. A role without pg_read_all_stats sees other
# roles' builds with their index hidden (NULL): any such build might be this one.
_BUILDING = """
    SELECT a.pid, a.application_name AS application, a.query_start, a.state
    FROM pg_stat_progress_create_index p
    JOIN pg_stat_activity a ON a.pid = p.pid
    WHERE p.pid <> pg_backend_pid() AND p.datname = current_database()
      AND (p.index_relid = %(oid)s::oid OR p.index_relid IS NULL)
    ORDER BY a.pid
"""


def building_sessions(
    db: TargetDatabase, index_oid: int, conn: psycopg.Connection | None = None
) -> list[Session]:
    """Sessions building index `index_oid` right now (or whose builds this role cannot see)."""
    with autocommit(db, conn) as conn:
        return _sessions(conn, _BUILDING, {"oid": index_oid})


# Sessions holding any lock on a table or one of its indexes.
_HOLDERS = """
    SELECT a.pid, a.application_name AS application, a.query_start, a.state
    FROM pg_stat_activity a
    WHERE a.pid <> pg_backend_pid()
      AND a.pid IN (SELECT l.pid FROM pg_locks l
                    WHERE l.granted AND l.locktype = 'relation'
                      AND (l.relation = %(oid)s::oid
                           OR l.relation IN (SELECT x.indexrelid FROM pg_index x
                                             WHERE x.indrelid = %(oid)s::oid)))
    ORDER BY a.pid
"""


def table_lock_holders(conn: psycopg.Connection, table_oid: int) -> list[Session]:
    """Sessions holding any lock on table `table_oid` or one of its indexes."""
    return _sessions(conn, _HOLDERS, {"oid": table_oid})
