"""The latest rows of the table, found without sorting it: the tail of the heap, else the rows
the pass saw since its floor, else an index or a full scan."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from rdw_tracking.population.model import (
    ROW_SAMPLE_SIZE,
    Day,
)
from rdw_tracking.resources import TargetDatabase

if TYPE_CHECKING:  # the pass reads its samples from here
    from rdw_tracking.population.one_pass import PassHead

# The spec's "sample current data state": the latest rows as they are now. `since` is
# the latest day from which the pass counted enough rows: it spares the top-N sort.
SAMPLE_SQL = """
SELECT id, collection_id, week_start_date, status, execution_id, created_at
FROM {weeks}
WHERE created_at >= %(since)s OR %(since)s IS NULL
ORDER BY created_at DESC NULLS LAST
LIMIT %(limit)s
"""


def sample_since(daily: list[Day], size: int) -> dt.date | None:
    """The latest day on and after which at least `size` rows were created, if any."""
    seen = 0
    for day in reversed(daily):
        seen += day.total_records
        if seen >= size:
            return day.creation_date
    return None


# The latest rows of an append-mostly table sit in its last blocks: a TID range scan
# of the tail finds candidates without reading the table. The pass then counts the rows
# at or after the candidates' oldest created_at; when the tail holds all of them, the
# candidates are exactly the latest rows, else SAMPLE_SQL asks the whole table.
TAIL_BLOCKS = 512


TAIL_START_SQL = """
SELECT format('(%%s,0)', GREATEST(pg_relation_size(%(table)s::regclass)
                                  / current_setting('block_size')::int - %(blocks)s, 0))
"""


TAIL_SAMPLE_SQL = """
SELECT id, collection_id, week_start_date, status, execution_id, created_at
FROM {weeks}
WHERE ctid >= %(start)s::tid AND created_at IS NOT NULL
ORDER BY created_at DESC
LIMIT %(limit)s
"""


TAIL_COUNT_SQL = (
    "SELECT count(*) FROM {weeks} WHERE ctid >= %(start)s::tid AND created_at >= %(floor)s"
)


# When the latest rows are not all in the tail (rows of one day spread over the table),
# the pass also gathers the ctids of every row at or after the tail's floor, and the
# latest rows are read from those. Only when the planner expects few such rows: the
# array costs memory per row. Before PostgreSQL 16, array_agg would make the whole pass
# serial, so it is not asked there.
SAMPLE_CANDIDATES_MAX = 20_000


PARALLEL_ARRAY_AGG = 160000


# A ctid names a row only inside its own heap (partitions and child tables repeat them):
# each candidate is `tableoid@ctid`.
SAMPLE_CTIDS = (
    "array_agg(w.tableoid::text || '@' || w.ctid::text) "
    "FILTER (WHERE w.created_at >= %(sample_floor)s)::text"
)


ESTIMATE_SQL = "EXPLAIN (FORMAT JSON) SELECT 1 FROM {weeks} WHERE created_at >= {floor}"


BY_CTID_SQL = """
SELECT id, collection_id, week_start_date, status, execution_id, created_at
FROM {weeks}
WHERE ctid = ANY(ARRAY(SELECT split_part(r, '@', 2)::tid FROM unnest(%(ctids)s::text[]) AS r))
  AND tableoid::text || '@' || ctid::text = ANY(%(ctids)s::text[])
ORDER BY created_at DESC
LIMIT %(limit)s
"""


def few_rows_since(cur: psycopg.Cursor, db: TargetDatabase, floor: dt.datetime) -> bool:
    """Whether the planner expects at most SAMPLE_CANDIDATES_MAX rows at or after `floor`."""
    statement = sql.SQL(ESTIMATE_SQL).format(weeks=db.weeks, floor=sql.Literal(floor))
    plan = cur.execute(statement).fetchone()[0]
    return plan[0]["Plan"]["Plan Rows"] <= SAMPLE_CANDIDATES_MAX


def fetch_rows(cur: psycopg.Cursor, statement: sql.Composable, params: dict) -> list[dict]:
    with cur.connection.cursor(row_factory=dict_row) as by_name:
        return by_name.execute(statement, params).fetchall()


@dataclass(frozen=True)
class Tail:
    """The latest rows of the table's tail, and whether they can be trusted."""

    rows: list[dict]
    floor: dt.datetime | None  # the oldest created_at among them; None: fewer than asked
    count: int  # rows of the tail at or after the floor


def tail_sample(cur: psycopg.Cursor, db: TargetDatabase) -> Tail:
    cur.execute(TAIL_START_SQL, {"table": db.weeks.as_string(cur), "blocks": TAIL_BLOCKS})
    tail = {"start": cur.fetchone()[0]}  # a constant, so PostgreSQL scans just that range
    with cur.connection.cursor(row_factory=dict_row) as by_name:
        statement = sql.SQL(TAIL_SAMPLE_SQL).format(weeks=db.weeks)
        rows = by_name.execute(statement, tail | {"limit": ROW_SAMPLE_SIZE}).fetchall()
    if len(rows) < ROW_SAMPLE_SIZE:
        return Tail(rows, None, 0)
    floor = rows[-1]["created_at"]
    cur.execute(sql.SQL(TAIL_COUNT_SQL).format(weeks=db.weeks), tail | {"floor": floor})
    return Tail(rows, floor, cur.fetchone()[0])


def latest_rows(
    cur: psycopg.Cursor, db: TargetDatabase, head: PassHead, tail: Tail, daily: list[Day]
) -> list[dict]:
    """The latest rows: the tail's, when it holds every row at or after their floor; else
    those the pass found at or after it; else (or if they moved since) the whole table's."""
    if tail.floor is not None and head.floor_rows == tail.count:
        return tail.rows
    if head.sample_ctids:
        found = fetch_rows(
            cur,
            sql.SQL(BY_CTID_SQL).format(weeks=db.weeks),
            {"ctids": head.sample_ctids, "limit": ROW_SAMPLE_SIZE},
        )
        if len(found) >= min(ROW_SAMPLE_SIZE, head.floor_rows):
            return found
    return fetch_rows(
        cur,
        sql.SQL(SAMPLE_SQL).format(weeks=db.weeks),
        {"since": sample_since(daily, ROW_SAMPLE_SIZE), "limit": ROW_SAMPLE_SIZE},
    )
