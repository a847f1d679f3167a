"""The write-job guard: one job at a time changes the looked-after table.

Dagster's run queue already limits runs tagged `rdw/db-writes` to one per deployment
(dagster.yaml); this PostgreSQL advisory lock extends that to two deployments, or a
person at psql, pointed at the same database. The second comer fails fast.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from rdw_tracking.assets import refuse
from rdw_tracking.resources import TargetDatabase

LOCK_CLASS = 0x52445754  # "RDWT"


def lock_key(db: TargetDatabase) -> tuple[int, int]:
    """Advisory lock key of the configured weeks table (two int4, as pg_locks shows them)."""
    name = f"{db.schema_name}.{db.weeks_table}".encode()
    return LOCK_CLASS, zlib.crc32(name) & 0x7FFFFFFF


def lock_holder(conn: psycopg.Connection, key: tuple[int, int]) -> str:
    row = conn.execute(
        """
        SELECT a.pid, a.application_name, a.backend_start, a.state
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted
          AND l.classid = %s AND l.objid = %s AND l.objsubid = 2
        """,
        list(key),
    ).fetchone()
    if row is None:
        return "a session that has since let go"
    pid, application, started, state = row
    return f"pid {pid} ({application or 'no application_name'}, connected {started:%Y-%m-%d %H:%M:%S} UTC, {state})"


@contextmanager
def exclusive_write(db: TargetDatabase, job_name: str) -> Iterator[psycopg.Connection]:
    """Hold the write lock for `job_name` on a session of its own; refuse if it is taken.

    Yields the (autocommit) connection holding the lock; the work itself may use others.
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
        try:
            yield conn
        finally:
            try:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", list(key))
            except psycopg.OperationalError:
                pass  # the session is gone (server restarted), and its lock with it
