"""The one per-day count of the weeks table: rows, stamped rows and orphaned rows for
every UTC creation day, in the caller's snapshot. Nothing here imports Dagster."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal

import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row

from rdw_tracking import premises
from rdw_tracking.layout import Layout


def rate(with_execution_id: int, total: int) -> float | None:
    """The spec's ROUND(with * 100.0 / total, 2), exactly; None without rows."""
    if not total:
        return None
    exact = Decimal(with_execution_id) * 100 / Decimal(total)
    return float(exact.quantize(Decimal("0.01"), ROUND_HALF_UP))


def midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class DayTally:
    rows: int
    stamped: int
    orphans: int = 0

    def __add__(self, other: DayTally) -> DayTally:
        return DayTally(
            self.rows + other.rows, self.stamped + other.stamped, self.orphans + other.orphans
        )


ZERO = DayTally(0, 0, 0)
Day = dt.date | None  # None: rows without a created_at


# -- counting ---------------------------------------------------------------------------------

# Rows and stamped rows per day, without an index led by created_at: one grouped scan.
DAYS_SQL = """
SELECT w.created_at::date AS day, count(*) AS rows, count(w.execution_id) AS stamped
FROM {weeks} AS w WHERE {where} GROUP BY 1
"""
# With one: the days that have rows, each found by one probe of the index (from a day's
# first row to the next day's), then each day's rows counted as one index range. No row
# is cast to a date or hashed: half the work of the grouped scan.
DAY_LIST_SQL = """
WITH RECURSIVE days AS (
    SELECT (SELECT min(w.created_at) FROM {weeks} AS w WHERE w.created_at >= %(since)s) AS at
    UNION ALL
    SELECT (SELECT min(w.created_at) FROM {weeks} AS w
            WHERE w.created_at >= date_trunc('day', d.at, 'UTC') + interval '1 day')
    FROM days AS d WHERE d.at IS NOT NULL)
SELECT (at AT TIME ZONE 'UTC')::date FROM days WHERE at IS NOT NULL
"""
DAY_RANGES_SQL = """
SELECT d.day, c.rows, c.stamped FROM unnest(%(days)s::date[]) AS d(day)
CROSS JOIN LATERAL (
    SELECT count(*) AS rows, count(w.execution_id) AS stamped FROM {weeks} AS w
    WHERE w.created_at >= d.day::timestamp AT TIME ZONE 'UTC'
      AND w.created_at < (d.day + 1)::timestamp AT TIME ZONE 'UTC') AS c
UNION ALL
SELECT NULL, count(*), count(w.execution_id) FROM {weeks} AS w WHERE w.created_at IS NULL
"""
# Orphaned ids: each distinct execution_id once (an index-only scan of the execution_id
# index, in id order, merged with workflow_executions' primary key), then the rows of
# the few ids found, per day. Beyond ORPHAN_IDS_MAX ids, every row is asked per day.
ORPHAN_IDS_MAX = 20_000
ORPHAN_IDS_SQL = """
SELECT d.execution_id FROM (
    SELECT DISTINCT execution_id FROM {weeks} WHERE execution_id IS NOT NULL) AS d
WHERE NOT EXISTS (SELECT 1 FROM {executions} AS e WHERE e.id = d.execution_id)
LIMIT %(limit)s
"""
ORPHAN_DAYS_SQL = """
SELECT created_at::date, count(*) FROM {weeks}
WHERE execution_id = ANY(%(ids)s::uuid[]) GROUP BY 1
"""
ORPHANS_PER_DAY_SQL = """
SELECT w.created_at::date AS day, count(*) AS orphans FROM {weeks} AS w
WHERE w.execution_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM {executions} AS e WHERE e.id = w.execution_id)
GROUP BY 1
"""
SINCE = "w.created_at >= %(since)s OR w.created_at IS NULL"


@dataclass
class Tables:
    """The names and physical tables a tally reads."""

    weeks: sql.Identifier
    executions: sql.Identifier | None  # None: workflow_executions does not exist
    layout: Layout
    created_at_indexed: bool = False  # every leaf has a valid B-tree led by created_at

    @property
    def leaves(self) -> list[int]:
        return [m.oid for m in self.layout.leaves]


def count_days(cur: psycopg.Cursor, t: Tables, since: dt.date | None = None) -> dict:
    """{day: DayTally(rows, stamped)} of every day at or after `since` (None: every day),
    rows without a created_at included."""
    if t.created_at_indexed:
        return _count_day_ranges(cur, t, since)
    where = "true" if since is None else SINCE
    statement = sql.SQL(DAYS_SQL).format(weeks=t.weeks, where=sql.SQL(where))
    params = {} if since is None else {"since": midnight(since)}
    with cur.connection.cursor(row_factory=namedtuple_row) as named, parallel_groups(cur):
        rows = named.execute(statement, params).fetchall()
    return {row.day: DayTally(row.rows, row.stamped) for row in rows}


def _count_day_ranges(cur: psycopg.Cursor, t: Tables, since: dt.date | None) -> dict:
    start = "-infinity" if since is None else midnight(since).isoformat()
    statement = sql.SQL(DAY_LIST_SQL).format(weeks=t.weeks)
    days = [row[0] for row in cur.execute(statement, {"since": start}).fetchall()]
    statement = sql.SQL(DAY_RANGES_SQL).format(weeks=t.weeks)
    with cur.connection.cursor(row_factory=namedtuple_row) as named:
        rows = named.execute(statement, {"days": days}).fetchall()
    return {row.day: DayTally(row.rows, row.stamped) for row in rows if row.rows}


@contextmanager
def parallel_groups(cur: psycopg.Cursor) -> Iterator[None]:
    """The planner knows no statistics of `created_at::date` and expects a group per
    row: gathering that many partial groups looks dear, so it counts serially. There are
    a few hundred days; with gathering free, the count runs in parallel."""
    (before,) = cur.execute(
        "SELECT current_setting('parallel_tuple_cost'), set_config('parallel_tuple_cost', '0', true)"
    ).fetchone()[:1]
    try:
        yield
    finally:
        cur.execute("SELECT set_config('parallel_tuple_cost', %s, true)", [before])


def count_orphans(cur: psycopg.Cursor, t: Tables) -> tuple[dict[Day, int], str | None]:
    """({day: orphaned rows}, the foreign key that proves there are none, if one does)."""
    if t.executions is None:
        return {}, None
    proof = premises.orphan_proof(cur, t.layout, t.executions)
    if proof:
        return {}, proof
    parts = {"weeks": t.weeks, "executions": t.executions}
    ids = cur.execute(sql.SQL(ORPHAN_IDS_SQL).format(**parts), {"limit": ORPHAN_IDS_MAX + 1})
    ids = [row[0] for row in ids.fetchall()]
    if not ids:
        return {}, None
    if len(ids) > ORPHAN_IDS_MAX:
        return dict(cur.execute(sql.SQL(ORPHANS_PER_DAY_SQL).format(**parts)).fetchall()), None
    statement = sql.SQL(ORPHAN_DAYS_SQL).format(**parts)
    return dict(cur.execute(statement, {"ids": ids}).fetchall()), None


def count_all(cur: psycopg.Cursor, t: Tables) -> dict[Day, DayTally]:
    """Every day of the table with its orphans, counted in `cur`'s snapshot."""
    days = count_days(cur, t)
    orphans, _ = count_orphans(cur, t)
    return with_orphans(days, orphans)


def with_orphans(days: dict[Day, DayTally], orphans: dict[Day, int]) -> dict[Day, DayTally]:
    return {d: replace(c, orphans=orphans.get(d, 0)) for d, c in days.items()}
