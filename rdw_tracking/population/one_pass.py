"""The snapshot from one pass over the table: overall, window and per-day counts and the
orphans, in a single scan (the table has no created_at index, or no tally yet)."""

import datetime as dt
from dataclasses import dataclass, fields

import psycopg
from psycopg import sql
from psycopg.rows import class_row, dict_row

from rdw_tracking import catalog, premises
from rdw_tracking.errors import refuse
from rdw_tracking.layout import table_layout
from rdw_tracking.population.model import (
    Counts,
    Day,
    Orphans,
    Snapshot,
)
from rdw_tracking.population.orphans import (
    orphan_sample,
)
from rdw_tracking.population.samples import (
    PARALLEL_ARRAY_AGG,
    SAMPLE_CTIDS,
    few_rows_since,
    latest_rows,
    tail_sample,
)
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.tally import midnight


@dataclass(frozen=True)
class Bounds:
    """The window's bounds, fixed once so that every statement of a snapshot agrees on them."""

    today: dt.date
    window_start: dt.date
    recent_since: dt.datetime  # the later of window_start and tracking_started_at


BOUNDS_SQL = """
SELECT CURRENT_DATE AS today, CURRENT_DATE - %(window_days)s::int AS window_start,
       GREATEST((CURRENT_DATE - %(window_days)s::int)::timestamptz, %(started_at)s::timestamptz)
         AS recent_since
"""


def window_bounds(cur: psycopg.Cursor, window_days: int, started_at: dt.datetime | None) -> Bounds:
    with cur.connection.cursor(row_factory=class_row(Bounds)) as by_name:
        return by_name.execute(
            BOUNDS_SQL, {"window_days": window_days, "started_at": started_at}
        ).fetchone()


# The one pass. Every bound is a timestamptz parameter: an expression such as
# `CURRENT_DATE - 7` is re-evaluated (and cast) for every row, which made the pass
# slower than the spec's three queries together. A LEFT JOIN on workflow_executions'
# primary key adds no rows; a non-NULL execution_id that finds no match is an orphan
# (NULLs are not).
#
# Short windows (the default 7 days) count each day with its own FILTER pair: a plain
# aggregate with no grouping, which PostgreSQL runs in parallel. Longer windows meet a
# day list through a hash join on the date instead (one group per day; rows older than
# the window share one group), which stays cheap however many days there are.
FILTER_DAYS_MAX = 31


@dataclass(frozen=True)
class PassHead:
    """The pass's figures over the whole table, each named as HEAD_SQL labels it."""

    rows: int
    stamped: int
    recent_rows: int
    recent_stamped: int
    tracking_rows: int
    tracking_stamped: int
    orphans: int | None  # None: no workflow_executions to join
    recent_orphans: int | None
    future_rows: int  # created after today
    floor_rows: int  # created at or after the sample floor
    sample_ctids: str | None  # their `tableoid@ctid`s, when the pass gathered them


HEAD_COLUMNS = [f.name for f in fields(PassHead)]


SUMMED_COLUMNS = [name for name in HEAD_COLUMNS if name != "sample_ctids"]


HEAD_SQL = """
       count(*) AS rows,
       count(w.execution_id) AS stamped,
       count(*) FILTER (WHERE w.created_at >= %(recent_since)s) AS recent_rows,
       count(w.execution_id) FILTER (WHERE w.created_at >= %(recent_since)s) AS recent_stamped,
       count(*) FILTER (WHERE w.created_at >= %(started_at)s) AS tracking_rows,
       count(w.execution_id) FILTER (WHERE w.created_at >= %(started_at)s) AS tracking_stamped,
       {orphans} AS orphans,
       {recent_orphans} AS recent_orphans,
       count(*) FILTER (WHERE w.created_at >= %(tomorrow)s) AS future_rows,
       count(*) FILTER (WHERE w.created_at >= %(sample_floor)s) AS floor_rows,
       {sample_ctids} AS sample_ctids"""


GROUPED_PASS_SQL = (
    """
SELECT d.day AS day,"""
    + HEAD_SQL
    + """
FROM {weeks} AS w
{join}
LEFT JOIN (SELECT %(window_start)s::date + k AS day
           FROM generate_series(0, %(window_days)s::int) AS k) AS d
       ON d.day = w.created_at::date
GROUP BY d.day
"""
)


DAY_SQL = """
       count(*) FILTER (WHERE w.created_at >= %(day{k})s AND w.created_at < %(day{n})s)
         AS {rows},
       count(w.execution_id) FILTER (WHERE w.created_at >= %(day{k})s AND w.created_at < %(day{n})s)
         AS {stamped}"""


def day_columns(k: int) -> tuple[str, str]:
    """The labels of window day `k`'s (rows, stamped) in the FILTER pass."""
    return f"day{k}_rows", f"day{k}_stamped"


def day_sql(k: int) -> str:
    rows, stamped = day_columns(k)
    return DAY_SQL.format(k=k, n=k + 1, rows=rows, stamped=stamped)


# Rows dated after today count under their own date; only asked when the pass saw some.
FUTURE_DAYS_SQL = """
SELECT created_at::date, count(*), count(execution_id)
FROM {weeks} WHERE created_at >= %(tomorrow)s GROUP BY 1
"""


ORPHAN = "w.execution_id IS NOT NULL AND e.id IS NULL"


def pass_query(
    db: TargetDatabase, with_executions: bool, days: int | None = None, collect_ctids: bool = False
) -> sql.Composed:
    """The one pass; `days` window days counted by FILTER pairs, or grouped when None.

    With `collect_ctids` it also gathers where the rows at or after the sample floor are."""
    parts: dict = {"sample_ctids": sql.SQL(SAMPLE_CTIDS if collect_ctids else "NULL::text")}
    if with_executions:
        parts |= {
            "join": sql.SQL("LEFT JOIN {} AS e ON e.id = w.execution_id").format(db.executions),
            "orphans": sql.SQL(f"count(*) FILTER (WHERE {ORPHAN})"),
            "recent_orphans": sql.SQL(
                f"count(*) FILTER (WHERE {ORPHAN} AND w.created_at >= %(orphan_since)s)"
            ),
        }
    else:
        null = sql.SQL("NULL::bigint")
        parts |= {"join": sql.SQL(""), "orphans": null, "recent_orphans": null}
    if days is None:
        return sql.SQL(GROUPED_PASS_SQL).format(weeks=db.weeks, **parts)
    columns = "".join("," + day_sql(k) for k in range(days))
    statement = "SELECT" + HEAD_SQL + columns + "\nFROM {weeks} AS w\n{join}"
    return sql.SQL(statement).format(weeks=db.weeks, **parts)


def run_pass(
    cur: psycopg.Cursor,
    db: TargetDatabase,
    with_executions: bool,
    params: dict,
    collect_ctids: bool = False,
) -> tuple[PassHead, dict[dt.date, Counts]]:
    """(the head figures, the counts of each day of the window)."""
    days = (params["today"] - params["window_start"]).days + 1
    with cur.connection.cursor(row_factory=dict_row) as by_name:
        if days <= FILTER_DAYS_MAX:
            return filter_pass(by_name, db, with_executions, params, days, collect_ctids)
        return grouped_pass(by_name, db, with_executions, params, collect_ctids)


def filter_pass(
    cur: psycopg.Cursor,
    db: TargetDatabase,
    with_executions: bool,
    params: dict,
    days: int,
    collect_ctids: bool,
) -> tuple[PassHead, dict[dt.date, Counts]]:
    """The pass of a short window: one row, each day's pair labelled by `day_columns`."""
    window_start = params["window_start"]
    bounds = {f"day{k}": midnight(window_start + dt.timedelta(days=k)) for k in range(days + 1)}
    statement = pass_query(db, with_executions, days, collect_ctids)
    row = cur.execute(statement, params | bounds).fetchone()
    groups = {}
    for k in range(days):
        rows, stamped = day_columns(k)
        groups[window_start + dt.timedelta(days=k)] = Counts(row[rows], row[stamped])
    return PassHead(**{name: row[name] for name in HEAD_COLUMNS}), groups


def grouped_pass(
    cur: psycopg.Cursor,
    db: TargetDatabase,
    with_executions: bool,
    params: dict,
    collect_ctids: bool,
) -> tuple[PassHead, dict[dt.date, Counts]]:
    """The pass of a long window: a row per day (and one for older rows), summed here."""
    rows = cur.execute(pass_query(db, with_executions, None, collect_ctids), params).fetchall()
    head = {name: sum(row[name] or 0 for row in rows) for name in SUMMED_COLUMNS}
    if not with_executions:
        head |= {"orphans": None, "recent_orphans": None}
    ctids = [row["sample_ctids"] for row in rows if row["sample_ctids"]]
    head["sample_ctids"] = "{" + ",".join(c.strip("{}") for c in ctids) + "}" if ctids else None
    groups = {
        row["day"]: Counts(row["rows"], row["stamped"]) for row in rows if row["day"] is not None
    }
    return PassHead(**head), groups


def window_days_of(
    today: dt.date, window_start: dt.date, groups: dict[dt.date, Counts]
) -> list[Day]:
    """Every day from window_start to today, plus later days that have rows."""
    dates = {window_start + dt.timedelta(days=k) for k in range((today - window_start).days + 1)}
    dates |= {day for day in groups if day is not None}
    empty = Counts(0, 0)
    return [
        Day(d, groups.get(d, empty).rows, groups.get(d, empty).with_execution_id)
        for d in sorted(dates)
    ]


def take_snapshot(db: TargetDatabase, window_days: int, started_at: dt.datetime | None) -> Snapshot:
    """The snapshot from one pass over the table (no index led by created_at to keep a
    tally with): the tail's latest rows first, so the pass can tell if they are exact."""
    with db.cursor() as cur:
        with_executions = tables_present(cur, db)
        proof = foreign_key_proof(cur, db) if with_executions else None
        bounds = window_bounds(cur, window_days, started_at)
        params = pass_params(bounds, window_days, started_at)
        tail = tail_sample(cur, db)
        collect = (
            tail.floor is not None
            and cur.connection.info.server_version >= PARALLEL_ARRAY_AGG
            and few_rows_since(cur, db, tail.floor)
        )
        # Under a validated foreign key, no orphan can exist: the pass joins nothing.
        head, groups = run_pass(
            cur, db, with_executions and not proof, params | {"sample_floor": tail.floor}, collect
        )
        if head.future_rows:
            groups |= future_days(cur, db, params)
        daily = window_days_of(bounds.today, bounds.window_start, groups)
        sample = latest_rows(cur, db, head, tail, daily)
        orphans = None
        if with_executions:
            orphans = Orphans(0, 0, [], proof) if proof else pass_orphans(cur, db, head)
    return Snapshot(
        today=bounds.today,
        window_start=bounds.window_start,
        recent_since=bounds.recent_since,
        overall=Counts(head.rows, head.stamped),
        recent=Counts(head.recent_rows, head.recent_stamped),
        since_tracking=Counts(head.tracking_rows, head.tracking_stamped) if started_at else None,
        daily=daily,
        orphans=orphans,
        sample=sample,
    )


def foreign_key_proof(cur: psycopg.Cursor, db: TargetDatabase) -> str | None:
    layout = table_layout(cur, db.schema_name, db.weeks_table)
    return premises.orphan_proof(cur, layout, db.executions) if layout else None


def tables_present(cur: psycopg.Cursor, db: TargetDatabase) -> bool:
    """Whether workflow_executions exists; refused when report_data_weeks does not."""
    if not catalog.table_exists(cur, db.schema_name, db.weeks_table):
        raise refuse(
            f"table {db.qualified(db.weeks_table)} does not exist; "
            "check target_db.schema_name and weeks_table"
        )
    return catalog.table_exists(cur, db.schema_name, db.executions_table)


def pass_params(bounds: Bounds, window_days: int, started_at: dt.datetime | None) -> dict:
    """The pass's parameters: every bound a timestamptz (see HEAD_SQL)."""
    return {
        "window_days": window_days,
        "started_at": started_at,
        "today": bounds.today,
        "window_start": bounds.window_start,
        "recent_since": bounds.recent_since,
        "tomorrow": midnight(bounds.today + dt.timedelta(days=1)),
        "orphan_since": midnight(bounds.today - dt.timedelta(days=1)),
    }


def future_days(cur: psycopg.Cursor, db: TargetDatabase, params: dict) -> dict[dt.date, Counts]:
    cur.execute(sql.SQL(FUTURE_DAYS_SQL).format(weeks=db.weeks), params)
    return {day: Counts(total, with_id) for day, total, with_id in cur.fetchall()}


def pass_orphans(cur: psycopg.Cursor, db: TargetDatabase, head: PassHead) -> Orphans:
    count = head.orphans or 0
    return Orphans(count, head.recent_orphans or 0, orphan_sample(cur, db) if count else [])
