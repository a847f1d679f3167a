"""Orphaned execution_ids: rows whose execution_id names no workflow_executions row."""

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from rdw_tracking.population.model import ORPHAN_SAMPLE_SIZE, Orphan
from rdw_tracking.resources import TargetDatabase

# Orphans asked on their own (the pass counts them with everything else). The sample
# has no ORDER BY, so its scan stops at the tenth orphan instead of sorting them all.
ORPHAN_WHERE = """w.execution_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM {executions} AS e WHERE e.id = w.execution_id)"""


ORPHAN_SAMPLE_SQL = (
    "SELECT w.id::text AS id, w.execution_id::text AS execution_id FROM {weeks} AS w WHERE "
    + ORPHAN_WHERE
    + " LIMIT %(limit)s"
)


ORPHAN_COUNT_SQL = "SELECT count(*) FROM {weeks} AS w WHERE " + ORPHAN_WHERE


def orphan_sample(cur: psycopg.Cursor, db: TargetDatabase) -> list[Orphan]:
    """Up to ORPHAN_SAMPLE_SIZE rows with an orphaned execution_id."""
    with cur.connection.cursor(row_factory=class_row(Orphan)) as by_name:
        by_name.execute(
            sql.SQL(ORPHAN_SAMPLE_SQL).format(weeks=db.weeks, executions=db.executions),
            {"limit": ORPHAN_SAMPLE_SIZE},
        )
        return by_name.fetchall()


def find_orphans(db: TargetDatabase) -> tuple[int, list[Orphan]]:
    """(how many rows carry an execution_id with no workflow_executions row, a sample)."""
    with db.cursor() as cur:
        cur.execute(sql.SQL(ORPHAN_COUNT_SQL).format(weeks=db.weeks, executions=db.executions))
        count = cur.fetchone()[0]
        return count, orphan_sample(cur, db) if count else []
