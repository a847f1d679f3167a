"""One rollback's row in the state table: its identity, fixed bound and progress, read
back, started, advanced with each batch and closed."""

import datetime as dt
import uuid
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from rdw_tracking.resources import TargetDatabase
from rdw_tracking.rollback.backup import BackupTables, create_tables, tables_present


@dataclass
class RollbackState:
    """One row of the state table: a rollback's identity, fixed bound and progress."""

    rollback_id: str
    cutoff: dt.date
    upper_bound: dt.datetime
    matched_rows: int
    phase: str
    next_block: int
    cleared_rows: int
    batches: int
    started_at: dt.datetime | None = None


_STATE_SELECT = """
SELECT rollback_id::text AS rollback_id, cutoff_date AS cutoff, upper_bound, matched_rows,
       phase, next_block, cleared_rows, batches, started_at
FROM {state}
WHERE schema_name = %(schema)s AND table_name = %(table)s
"""

# In each batch's own transaction: the rows it cleared and where the walk stands.
ADVANCE = """
UPDATE {state} SET phase = %(phase)s, next_block = %(next)s,
    cleared_rows = cleared_rows + %(cleared)s, batches = batches + 1
WHERE rollback_id = %(rid)s
"""


def _states(
    conn: psycopg.Connection, tables: BackupTables, query: str, params: dict
) -> list[RollbackState]:
    with conn.cursor(row_factory=class_row(RollbackState)) as cur:
        return cur.execute(sql.SQL(query).format(state=tables.state), params).fetchall()


def unfinished_rollbacks(
    conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables
) -> list[RollbackState]:
    """Rollbacks of this table that stopped before finishing (killed, or refused a batch)."""
    if not tables_present(conn, db, tables):
        return []
    return _states(
        conn,
        tables,
        _STATE_SELECT + " AND phase IN ('walking', 'sweeping') ORDER BY started_at",
        {"schema": db.schema_name, "table": db.weeks_table},
    )


def find_rollback(
    conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables, rollback_id: str | None
) -> RollbackState | None:
    """The rollback `rollback_id` of this table, or its latest one when None."""
    if not tables_present(conn, db, tables):
        return None
    query = _STATE_SELECT + (
        " AND rollback_id = %(rid)s" if rollback_id else " ORDER BY started_at DESC LIMIT 1"
    )
    found = _states(
        conn, tables, query, {"schema": db.schema_name, "table": db.weeks_table, "rid": rollback_id}
    )
    return found[0] if found else None


def start_rollback(
    conn: psycopg.Connection,
    db: TargetDatabase,
    tables: BackupTables,
    cutoff: dt.date,
    bound: dt.datetime,
    matched_rows: int,
) -> RollbackState:
    """A new rollback's state row (and its backup and state tables, if need be)."""
    create_tables(conn, db, tables)
    state = RollbackState(str(uuid.uuid4()), cutoff, bound, matched_rows, "walking", 0, 0, 0)
    conn.execute(
        sql.SQL(
            "INSERT INTO {state} (rollback_id, schema_name, table_name, cutoff_date, "
            "upper_bound, matched_rows, phase) VALUES (%s, %s, %s, %s, %s, %s, 'walking')"
        ).format(state=tables.state),
        [state.rollback_id, db.schema_name, db.weeks_table, cutoff, bound, matched_rows],
    )
    return state


def finish_rollback(conn: psycopg.Connection, tables: BackupTables, rollback_id: str) -> None:
    conn.execute(
        sql.SQL(
            "UPDATE {state} SET phase = 'finished', finished_at = now() WHERE rollback_id = %s"
        ).format(state=tables.state),
        [rollback_id],
    )


def set_phase(conn: psycopg.Connection, tables: BackupTables, rollback_id: str, phase: str) -> None:
    conn.execute(
        sql.SQL("UPDATE {state} SET phase = %s WHERE rollback_id = %s").format(state=tables.state),
        [phase, rollback_id],
    )
