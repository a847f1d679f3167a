"""The matched set: the rows a rollback clears, its fixed upper bound, and the one scan
that counts them for the dry run and plans the walk."""

import datetime as dt
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row

from rdw_tracking.errors import refuse
from rdw_tracking.resources import TargetDatabase, long_statements
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
    repeats the others' ctids. Also the rows the predicate leaves out for their
    `updated_at` alone: at or after the run's start (`updated_later`), of which dated
    after the scan itself (`updated_in_future`, a writer's clock ahead of the server's)."""

    leaves: dict[int, list[tuple[int, int]]]  # leaf oid -> [(block, matched rows)]
    days: list[tuple[dt.date, int]]
    seconds: float
    updated_later: int = 0
    updated_in_future: int = 0
    latest_future: dt.datetime | None = None

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
    """One scan of the table: matched rows per (leaf, block), for planning, and per day;
    and the rows left out for an `updated_at` at or after the run's start.

    On a table range-partitioned on created_at, the planner prunes every partition whose
    bounds lie wholly before the cutoff: they are never read."""
    started = time.monotonic()
    e, c, u = (sql.Identifier(n) for n in ("execution_id", "created_at", "updated_at"))
    with (
        long_statements(conn, db.statement_timeout_ms),
        conn.cursor(row_factory=namedtuple_row) as cur,
    ):
        rows = cur.execute(
            sql.SQL(
                """
                SELECT GROUPING(leaf, block) = 0 AS by_block, GROUPING(day) = 0 AS by_day,
                       leaf, block, day, count(*) FILTER (WHERE fresh) AS n,
                       count(*) FILTER (WHERE NOT fresh) AS later,
                       count(*) FILTER (WHERE future) AS future,
                       max(updated_at) FILTER (WHERE future) AS latest_future
                FROM (SELECT tableoid::bigint AS leaf, (ctid::text::point)[0]::bigint AS block,
                             {c}::date AS day, {u} AS updated_at, {fresh} AS fresh,
                             coalesce({u} > now(), false) AS future
                      FROM {weeks}
                      WHERE {e} IS NOT NULL AND {c} >= %(cutoff)s AND {c} < %(bound)s) m
                GROUP BY GROUPING SETS ((leaf, block), (day), ())
                """
            ).format(
                weeks=db.weeks,
                e=e,
                c=c,
                u=u,
                fresh=sql.SQL("({u} IS NULL OR {u} < %(bound)s)").format(u=u),
            ),
            {"cutoff": midnight(cutoff), "bound": bound},
        ).fetchall()
    leaves: dict[int, list[tuple[int, int]]] = {}
    for row in sorted(r for r in rows if r.by_block and r.n):
        leaves.setdefault(row.leaf, []).append((row.block, row.n))
    days = sorted((row.day, row.n) for row in rows if row.by_day and row.n)
    total = next((r for r in rows if not r.by_block and not r.by_day), None)
    return Survey(
        leaves,
        days,
        time.monotonic() - started,
        updated_later=total.later if total else 0,
        updated_in_future=total.future if total else 0,
        latest_future=total.latest_future if total else None,
    )


def estimate_seconds(matched_rows: int, scan_seconds: float) -> float:
    return round(2 * scan_seconds + matched_rows / ESTIMATED_ROWS_PER_S, 1)
