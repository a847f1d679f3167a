"""The matched set: the rows a rollback clears, its fixed upper bound, and the one scan
that counts them for the dry run and plans the walk."""

import datetime as dt
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row

from rdw_tracking.errors import refuse
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.rollback.backup import BackupTables
from rdw_tracking.rollback.progress import Log
from rdw_tracking.rollback.state import RollbackState
from rdw_tracking.tally import midnight

# Wait at most this long, at a fresh run's start, for transactions begun before it.
IN_FLIGHT_WAIT_S = 30.0
# For the dry run's estimate: batched clearing rate measured by benchmarks/bench_rollback.py
# on 2 cores, plus the two full scans (plan and final sweep).
ESTIMATED_ROWS_PER_S = 20_000


# The run's row set; %(bound)s is the run's start, fixed for the run and all its resumptions.
def matched(alias: str | None = None) -> sql.Composed:
    """The run's predicate, its columns qualified by `alias` where given."""
    col = (lambda c: sql.Identifier(alias, c)) if alias else sql.Identifier
    return sql.SQL(
        "{e} IS NOT NULL AND {c} >= %(cutoff)s AND {c} < %(bound)s "
        "AND ({u} IS NULL OR {u} < %(bound)s)"
    ).format(e=col("execution_id"), c=col("created_at"), u=col("updated_at"))


MATCHED = matched()


def fixed_bound(
    conn: psycopg.Connection,
    tables: BackupTables,
    resume: RollbackState | None,
    dry_run: bool,
    log: Log,
) -> dt.datetime:
    """The run's upper bound: the one a continued rollback fixed, else now (once the
    transactions begun before it have finished, for a real run)."""
    now = conn.execute("SELECT now()").fetchone()[0]
    if resume is None:
        if not dry_run:
            wait_for_older_transactions(conn, now, log)
        return now
    if resume.upper_bound > now:
        raise refuse(
            f"rollback {resume.rollback_id} in {tables.label(tables.state_name)} has "
            f"its upper bound {resume.upper_bound.isoformat()} in the future, which no "
            "rollback run writes; nothing was changed. Check who writes to that table, and "
            "delete that row or set state_table to a table of its own"
        )
    return resume.upper_bound


def wait_for_older_transactions(conn: psycopg.Connection, bound: dt.datetime, log: Log) -> None:
    """Let transactions begun before `bound` finish: rows they insert are dated before it,
    so the plan must see them committed."""
    deadline = time.monotonic() + IN_FLIGHT_WAIT_S
    while True:
        pids = [
            pid
            for (pid,) in conn.execute(
                """
                SELECT pid FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()
                  AND backend_type = 'client backend' AND xact_start < %s
                """,
                [bound],
            ).fetchall()
        ]
        if not pids:
            return
        if time.monotonic() > deadline:
            log.warning(
                f"transactions begun before the run's start are still open (pids {pids}); "
                "rows they insert later dated before it are cleared by the final sweep if seen"
            )
            return
        time.sleep(0.05)


@dataclass(frozen=True)
class Survey:
    """What one scan found: matched rows per heap block of each physical table (leaf) and
    per creation day. Blocks are per leaf: every partition or child has its own heap and
    repeats the others' ctids."""

    leaves: dict[int, list[tuple[int, int]]]  # leaf oid -> [(block, matched rows)]
    days: list[tuple[dt.date, int]]
    seconds: float

    @property
    def matched_rows(self) -> int:
        return sum(n for blocks in self.leaves.values() for _, n in blocks)

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """The blocks of a one-leaf table (an ordinary table)."""
        return [b for blocks in self.leaves.values() for b in blocks]


def survey(
    conn: psycopg.Connection, db: TargetDatabase, cutoff: dt.date, bound: dt.datetime
) -> Survey:
    """One scan of the table: matched rows per (leaf, block), for planning, and per day.

    On a table range-partitioned on created_at, the planner prunes every partition whose
    bounds lie wholly before the cutoff: they are never read."""
    started = time.monotonic()
    with conn.cursor(row_factory=namedtuple_row) as cur:
        rows = cur.execute(
            sql.SQL(
                """
                SELECT GROUPING(leaf, block) = 0 AS by_block, leaf, block, day, count(*) AS n
                FROM (SELECT tableoid::bigint AS leaf, (ctid::text::point)[0]::bigint AS block,
                             created_at::date AS day
                      FROM {weeks} WHERE {matched}) m
                GROUP BY GROUPING SETS ((leaf, block), (day))
                """
            ).format(weeks=db.weeks, matched=MATCHED),
            {"cutoff": midnight(cutoff), "bound": bound},
        ).fetchall()
    leaves: dict[int, list[tuple[int, int]]] = {}
    for row in sorted(r for r in rows if r.by_block):
        leaves.setdefault(row.leaf, []).append((row.block, row.n))
    days = sorted((row.day, row.n) for row in rows if not row.by_block)
    return Survey(leaves, days, time.monotonic() - started)


def estimate_seconds(matched_rows: int, scan_seconds: float) -> float:
    return round(2 * scan_seconds + matched_rows / ESTIMATED_ROWS_PER_S, 1)
