"""Population snapshot of `report_data_weeks.execution_id`, with its three checks.

The spec's data-quality queries (population count, the 7-day breakdown, the orphan
anti-join, a sample of the latest rows) become one asset: the overall and window figures
and the per-day table come from a single pass over the table, and the checks judge that
same snapshot instead of scanning again.
"""

import datetime as dt
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import dagster as dg
import pandas as pd
import psycopg
from psycopg import sql
from psycopg.rows import class_row, dict_row
from pydantic import Field, field_validator

from rdw_tracking import catalog
from rdw_tracking.assets import (
    DAILY_SNAPSHOT_FRESHNESS,
    GROUP,
    READ_RETRY,
    daily,
    tallying,
    verdict,
)
from rdw_tracking.assets.metadata import metadata_table
from rdw_tracking.assets.tables import report_data_weeks, workflow_executions
from rdw_tracking.assets.verdict import MAX_EXECUTIONS, valid_ids
from rdw_tracking.errors import refuse
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.tally import DayTally, Tally, rate

ASSET = "execution_id_population"
RATE_CHECK = "execution_id_recent_population_rate"
ORPHAN_CHECK = "execution_ids_exist"
TREND_CHECK = "execution_id_population_trend"
ORPHAN_SAMPLE_SIZE = 10
ROW_SAMPLE_SIZE = 5
DAILY_COLUMNS = ["creation_date", "total_records", "with_execution_id", "population_rate"]


def parse_timestamp(value: str) -> dt.datetime:
    """An ISO 8601 date or timestamp as an aware datetime; without an offset it is UTC."""
    parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


class PopulationConfig(dg.Config):
    """Run config of `execution_id_population` and its checks (`ops.execution_id_population.config`).

    Validators raise `refuse(...)` rather than ValueError: pydantic passes it through
    untouched, so a bad value fails the step once, naming the field, instead of being
    retried by READ_RETRY like a dropped connection.
    """

    window_days: int = Field(
        default=7,
        description="The recent window: rows with created_at >= CURRENT_DATE - window_days (UTC).",
    )
    tracking_started_at: str | None = Field(
        default=None,
        description=(
            "When the fix that stamps execution_id was deployed (ISO 8601, UTC unless an "
            "offset is given). The recent rate then counts only rows created since then, "
            "so legacy rows in the window don't drag it down."
        ),
    )
    min_recent_population_pct: float = Field(
        default=99.0,
        description="execution_id_recent_population_rate fails below this rate (0-100).",
    )
    trend_margin_pct: float = Field(
        default=5.0,
        description=(
            "execution_id_population_trend warns when the latest complete day's rate is "
            "more than this many percentage points below the trailing days' rate."
        ),
    )

    execution_ids: list[str] = Field(
        default=[],
        description=(
            "workflow_executions ids to judge with execution_id_run_stamped (the sensors "
            "fill this in); a collection run's rdw/execution_id tag is judged too."
        ),
    )
    refresh_days: int = Field(
        default=1,
        description=(
            "Days before today whose execution_id_daily_population partitions this run "
            "re-materializes, besides the days it recounted (the daily schedule uses 3)."
        ),
    )

    @field_validator("execution_ids")
    @classmethod
    def _ids(cls, value: list[str], info) -> list[str]:
        try:
            ids = valid_ids(value)
        except ValueError as err:
            raise refuse(f"{info.field_name}: {err}; give workflow_executions ids") from None
        if len(ids) > MAX_EXECUTIONS:
            raise refuse(
                f"{info.field_name} lists {len(ids)} executions; at most {MAX_EXECUTIONS} per run"
            )
        return ids

    @field_validator("refresh_days")
    @classmethod
    def _refresh(cls, value: int, info) -> int:
        if not 0 <= value <= 366:
            raise refuse(f"{info.field_name} must be between 0 and 366 days, got {value}")
        return value

    @field_validator("window_days")
    @classmethod
    def _window(cls, value: int, info) -> int:
        if not 1 <= value <= 366:
            raise refuse(f"{info.field_name} must be between 1 and 366 days, got {value}")
        return value

    @field_validator("min_recent_population_pct", "trend_margin_pct")
    @classmethod
    def _pct(cls, value: float, info) -> float:
        if not 0 <= value <= 100:
            raise refuse(f"{info.field_name} must be between 0 and 100, got {value}")
        return value

    @field_validator("tracking_started_at")
    @classmethod
    def _started(cls, value: str | None, info) -> str | None:
        if value is None:
            return None
        try:
            started = parse_timestamp(value)
        except ValueError:
            raise refuse(
                f"{info.field_name} must be an ISO 8601 timestamp such as "
                f"2024-05-01T09:30:00Z, got {value!r}"
            ) from None
        now = dt.datetime.now(dt.timezone.utc)
        if started > now:
            # A deploy time still to come would leave no row to judge.
            raise refuse(
                f"{info.field_name} {started.isoformat()} is in the future (now is "
                f"{now:%Y-%m-%dT%H:%M}Z); set it to when the fix that stamps execution_id "
                "was deployed"
            )
        return value

    def started_at(self) -> dt.datetime | None:
        return parse_timestamp(self.tracking_started_at) if self.tracking_started_at else None


# -- the snapshot ----------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    rows: int
    with_execution_id: int

    @property
    def without_execution_id(self) -> int:
        return self.rows - self.with_execution_id

    @property
    def pct(self) -> float | None:
        return rate(self.with_execution_id, self.rows)


@dataclass(frozen=True)
class Day:
    creation_date: dt.date
    total_records: int
    with_execution_id: int

    @property
    def population_rate(self) -> float | None:
        return rate(self.with_execution_id, self.total_records)


class Orphan(NamedTuple):
    """A report_data_weeks row whose execution_id has no workflow_executions row."""

    id: str
    execution_id: str


@dataclass(frozen=True)
class Orphans:
    count: int
    recent_count: int
    sample: list[Orphan]  # newest first


@dataclass(frozen=True)
class Snapshot:
    today: dt.date
    window_start: dt.date
    recent_since: dt.datetime  # the later of window_start and tracking_started_at
    overall: Counts
    recent: Counts
    since_tracking: Counts | None
    daily: list[Day]
    orphans: Orphans | None  # None: workflow_executions does not exist
    sample: list[dict] = field(default_factory=list)


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


def midnight(day: dt.date) -> dt.datetime:
    """Start of a UTC day, as the timestamptz the pass compares against."""
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc)


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
        bounds = window_bounds(cur, window_days, started_at)
        params = pass_params(bounds, window_days, started_at)
        tail = tail_sample(cur, db)
        collect = (
            tail.floor is not None
            and cur.connection.info.server_version >= PARALLEL_ARRAY_AGG
            and few_rows_since(cur, db, tail.floor)
        )
        head, groups = run_pass(
            cur, db, with_executions, params | {"sample_floor": tail.floor}, collect
        )
        if head.future_rows:
            groups |= future_days(cur, db, params)
        daily = window_days_of(bounds.today, bounds.window_start, groups)
        sample = latest_rows(cur, db, head, tail, daily)
        orphans = pass_orphans(cur, db, head) if with_executions else None
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


def pass_orphans(cur: psycopg.Cursor, db: TargetDatabase, head: PassHead) -> Orphans:
    count = head.orphans or 0
    return Orphans(count, head.recent_orphans or 0, orphan_sample(cur, db) if count else [])


# -- the snapshot from a tally (when every leaf has an index led by created_at) ----------

LATEST_SQL = """
SELECT id, collection_id, week_start_date, status, execution_id, created_at
FROM {weeks} WHERE created_at IS NOT NULL ORDER BY created_at DESC LIMIT %(limit)s
"""
PART_OF_DAY_SQL = """
SELECT count(*), count(execution_id) FROM {weeks}
WHERE created_at >= %(since)s AND created_at < %(until)s
"""
ORPHAN_ROWS_SQL = """
SELECT id::text AS id, execution_id::text AS execution_id FROM {weeks}
WHERE execution_id = ANY(%(ids)s::uuid[]) LIMIT %(limit)s
"""


def counts_since(
    cur: psycopg.Cursor, db: TargetDatabase, tally: Tally, since: dt.datetime
) -> Counts:
    """Rows created at or after `since`: whole days from the tally, the rest of a day
    that `since` starts within counted from the table (an index range)."""
    day = since.astimezone(dt.timezone.utc).date()
    if since == midnight(day):
        total = tally.total(day)
        return Counts(total.rows, total.stamped)
    after = tally.total(day + dt.timedelta(days=1))
    rows, stamped = cur.execute(
        sql.SQL(PART_OF_DAY_SQL).format(weeks=db.weeks),
        {"since": since, "until": midnight(day + dt.timedelta(days=1))},
    ).fetchone()
    return Counts(after.rows + rows, after.stamped + stamped)


def tally_orphan_sample(cur: psycopg.Cursor, db: TargetDatabase, tally: Tally) -> list[Orphan]:
    if tally.orphan_ids is None:
        return orphan_sample(cur, db)
    newest = sorted(
        tally.orphan_ids,
        key=lambda i: max((d for d in tally.orphan_ids[i] if d), default=dt.date.min),
        reverse=True,
    )[:ORPHAN_SAMPLE_SIZE]
    if not newest:
        return []
    with cur.connection.cursor(row_factory=class_row(Orphan)) as by_name:
        by_name.execute(
            sql.SQL(ORPHAN_ROWS_SQL).format(weeks=db.weeks),
            {"ids": newest, "limit": ORPHAN_SAMPLE_SIZE},
        )
        return by_name.fetchall()


def snapshot_from_tally(
    cur: psycopg.Cursor,
    db: TargetDatabase,
    tally: Tally,
    window_days: int,
    started_at: dt.datetime | None,
) -> Snapshot:
    """The snapshot `take_snapshot` would take, from an up-to-date tally: only the rows
    of part of a day and the five latest rows are read from the table."""
    bounds = window_bounds(cur, window_days, started_at)
    today, window_start = bounds.today, bounds.window_start
    overall = tally.total()
    recent = counts_since(cur, db, tally, bounds.recent_since)
    since_tracking = counts_since(cur, db, tally, started_at) if started_at else None
    groups = {
        d: Counts(c.rows, c.stamped)
        for d, c in tally.days.items()
        if d is not None and d >= window_start
    }
    daily = window_days_of(today, window_start, groups)
    orphans = None
    if tally.with_executions:
        total = tally.total().orphans
        recent_orphans = tally.total(today - dt.timedelta(days=1)).orphans
        orphans = Orphans(
            total, recent_orphans, tally_orphan_sample(cur, db, tally) if total else []
        )
    sample = fetch_rows(cur, sql.SQL(LATEST_SQL).format(weeks=db.weeks), {"limit": ROW_SAMPLE_SIZE})
    return Snapshot(
        today=today,
        window_start=window_start,
        recent_since=bounds.recent_since,
        overall=Counts(overall.rows, overall.stamped),
        recent=recent,
        since_tracking=since_tracking,
        daily=daily,
        orphans=orphans,
        sample=sample,
    )


def daily_frame(daily: list[Day]) -> pd.DataFrame:
    frame = pd.DataFrame(
        [(d.creation_date, d.total_records, d.with_execution_id, d.population_rate) for d in daily],
        columns=DAILY_COLUMNS,
    )
    frame["creation_date"] = pd.to_datetime(frame["creation_date"])
    frame["population_rate"] = frame["population_rate"].astype(float)
    return frame


def daily_table(daily: list[Day]) -> dg.TableMetadataValue:
    return metadata_table(
        {
            "creation_date": "date",
            "total_records": "int",
            "with_execution_id": "int",
            "population_rate": "float",
        },
        (
            {
                "creation_date": d.creation_date.isoformat(),
                "total_records": d.total_records,
                "with_execution_id": d.with_execution_id,
                "population_rate": d.population_rate,
            }
            for d in daily
        ),
        descriptions={"population_rate": "percent, 2 decimals"},
    )


SAMPLE_COLUMNS = ["id", "collection_id", "week_start_date", "status", "execution_id", "created_at"]


def sample_table(rows: list[dict]) -> dg.TableMetadataValue:
    return metadata_table(
        dict.fromkeys(SAMPLE_COLUMNS, "string"),
        ({c: None if row[c] is None else str(row[c]) for c in SAMPLE_COLUMNS} for row in rows),
    )


def snapshot_metadata(snapshot: Snapshot, window_days: int) -> dict:
    metadata = {
        "total_rows": snapshot.overall.rows,
        "with_execution_id": snapshot.overall.with_execution_id,
        "without_execution_id": snapshot.overall.without_execution_id,
        "population_pct": snapshot.overall.pct,
        "window_days": window_days,
        "window_start": snapshot.window_start.isoformat(),
        "recent_since": snapshot.recent_since.isoformat(),
        "recent_total_rows": snapshot.recent.rows,
        "recent_with_execution_id": snapshot.recent.with_execution_id,
        "recent_population_pct": snapshot.recent.pct,
        "daily": daily_table(snapshot.daily),
        "sample": sample_table(snapshot.sample),
    }
    if snapshot.since_tracking:
        metadata |= {
            "since_tracking_total_rows": snapshot.since_tracking.rows,
            "since_tracking_with_execution_id": snapshot.since_tracking.with_execution_id,
            "since_tracking_population_pct": snapshot.since_tracking.pct,
        }
    return metadata


# -- execution_id_recent_population_rate ---------------------------------------------


def rate_check(snapshot: Snapshot, threshold: float, where: str) -> dg.AssetCheckResult:
    recent = snapshot.recent
    since = f"since {snapshot.recent_since:%Y-%m-%d %H:%M} UTC"
    metadata = {
        "recent_population_pct": recent.pct,
        "min_recent_population_pct": threshold,
        "recent_total_rows": recent.rows,
        "recent_without_execution_id": recent.without_execution_id,
    }
    if recent.rows == 0:
        return dg.AssetCheckResult(
            check_name=RATE_CHECK,
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=(
                f"no {where} rows created {since}: nothing to judge; is the collection "
                "running, or is tracking_started_at in the future?"
            ),
            metadata=metadata,
        )
    passed = recent.pct >= threshold
    verdict = "at or above" if passed else "below"
    return dg.AssetCheckResult(
        check_name=RATE_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"{recent.pct}% of {recent.rows} {where} rows created {since} have an "
            f"execution_id, {verdict} the {threshold}% threshold"
        ),
        metadata=metadata,
    )


# -- execution_id_population_trend ----------------------------------------------------


def trend_days(snapshot: Snapshot, started_at: dt.datetime | None) -> tuple[Day | None, list[Day]]:
    """(the latest complete day, the trailing days of the window before it).

    With `tracking_started_at`, days that began before it are left out: they mix legacy
    rows in and would make the baseline meaningless.
    """
    latest_date = snapshot.today - dt.timedelta(days=1)

    def comparable(day: Day) -> bool:
        begins = dt.datetime.combine(day.creation_date, dt.time(), dt.timezone.utc)
        return started_at is None or begins >= started_at

    latest = next((d for d in snapshot.daily if d.creation_date == latest_date), None)
    trailing = [
        d
        for d in snapshot.daily
        if snapshot.window_start <= d.creation_date < latest_date and comparable(d)
    ]
    return (latest if latest and comparable(latest) else None), trailing


def pooled_rate(days: list[Day]) -> float | None:
    return rate(sum(d.with_execution_id for d in days), sum(d.total_records for d in days))


def trend_check(
    snapshot: Snapshot, margin: float, started_at: dt.datetime | None
) -> dg.AssetCheckResult:
    latest, trailing = trend_days(snapshot, started_at)
    baseline = pooled_rate(trailing)
    latest_rate = latest.population_rate if latest else None
    drop = None if latest_rate is None or baseline is None else round(baseline - latest_rate, 2)
    if latest_rate is None:
        passed, description = True, "no rows on the latest complete day: nothing to compare"
    elif baseline is None:
        passed, description = (
            True,
            "no rows on the trailing days of the window: nothing to compare with",
        )
    elif drop > margin:
        passed, description = (
            False,
            (
                f"population rate fell to {latest_rate}% on {latest.creation_date} from "
                f"{baseline}% on the trailing days ({drop} points, margin {margin}): a "
                "collection path may have stopped stamping execution_id"
            ),
        )
    else:
        passed, description = (
            True,
            (f"{latest_rate}% on {latest.creation_date} vs {baseline}% on the trailing days"),
        )
    return dg.AssetCheckResult(
        check_name=TREND_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={
            "latest_date": latest.creation_date.isoformat() if latest else None,
            "latest_rate": latest_rate,
            "latest_records": latest.total_records if latest else 0,
            "trailing_rate": baseline,
            "trailing_records": sum(d.total_records for d in trailing),
            "drop_pct": drop,
            "trend_margin_pct": margin,
        },
    )


# -- execution_ids_exist ---------------------------------------------------------------


def orphan_check(orphans: Orphans | None, db: TargetDatabase) -> dg.AssetCheckResult:
    weeks = db.qualified(db.weeks_table, "execution_id")
    executions = db.qualified(db.executions_table)
    if orphans is None:
        return dg.AssetCheckResult(
            check_name=ORPHAN_CHECK,
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description=(
                f"table {executions} does not exist: no execution_id in {weeks} can be "
                "validated; check target_db.executions_table and schema_name"
            ),
            metadata={"workflow_executions_exists": False},
        )
    sample = metadata_table(
        {"id": "uuid", "execution_id": "uuid"},
        ({"id": row.id, "execution_id": row.execution_id} for row in orphans.sample),
    )
    if orphans.count:
        description = (
            f"{orphans.count} rows of {weeks} ({orphans.recent_count} created since "
            f"yesterday) point at no {executions} row; see orphan_sample, and fix or clear "
            "them before adding the foreign key"
        )
    else:
        description = f"every non-NULL {weeks} has its {executions} row"
    return dg.AssetCheckResult(
        check_name=ORPHAN_CHECK,
        passed=orphans.count == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata={
            "orphan_count": orphans.count,
            "recent_orphan_count": orphans.recent_count,
            "orphan_sample": sample,
            "workflow_executions_exists": True,
        },
    )


# -- the asset --------------------------------------------------------------------------


@dg.asset(
    key=ASSET,
    group_name=GROUP,
    deps=[report_data_weeks, workflow_executions, "execution_id_schema"],
    kinds={"postgres", "pandas"},
    retry_policy=READ_RETRY,
    freshness_policy=DAILY_SNAPSHOT_FRESHNESS,
    check_specs=[
        dg.AssetCheckSpec(
            RATE_CHECK,
            asset=ASSET,
            description="The recent population rate is at least min_recent_population_pct (ERROR).",
        ),
        dg.AssetCheckSpec(
            ORPHAN_CHECK,
            asset=ASSET,
            description="Every non-NULL execution_id has its workflow_executions row (ERROR).",
        ),
        dg.AssetCheckSpec(
            TREND_CHECK,
            asset=ASSET,
            description="The latest complete day's rate has not dropped below the trailing days' (WARN).",
        ),
        dg.AssetCheckSpec(
            verdict.CHECK,
            asset=ASSET,
            description=(
                "Each execution validated by this run stamped every row created while it ran "
                "(ERROR); names the rows it left without an execution_id."
            ),
        ),
    ],
)
def execution_id_population(
    context: dg.AssetExecutionContext, config: PopulationConfig, target_db: TargetDatabase
):
    # No return annotation: with check outputs, Dagster would read it as the output types.
    """How many `report_data_weeks` rows carry an `execution_id`: overall, in the recent
    window, and per creation day; and, for the executions being validated, whether each
    stamped every row it wrote.

    With `idx_report_data_weeks_created_at` (opt-in, create_execution_id_indexes), a run
    reads only what changed: the per-day tally kept from the previous run is brought up
    to date by recounting its last days, and the server's counters prove older days did
    not change (else the whole table is counted again, and the metadata says why). Without
    it, the spec's data-quality queries run as one pass over the table. Either way the
    recent window (`created_at >= CURRENT_DATE - window_days`, UTC days), every day of it,
    and the five latest rows. Set `tracking_started_at` to the fix's deploy time so the
    recent rate counts only rows created since then. The days this run recounted are
    published as partitions of `execution_id_daily_population`. The checks judge this
    same snapshot: the recent rate against a threshold, orphaned execution_ids, a
    day-over-trailing-days drop, and each validated execution's own rows.
    """
    started_at = config.started_at()
    ids = verdict.requested(context, config.execution_ids)
    with target_db.cursor() as cur:
        # One connection and one snapshot for everything this run reads.
        layout, note = tallying.begin(cur, target_db)
        judged = verdict.judge(cur, target_db, ids)
        if not note:
            current = tallying.bring_up_to_date(cur, target_db, context.instance, layout)
            snapshot = snapshot_from_tally(
                cur, target_db, current.tally, config.window_days, started_at
            )
    touched = set().union(*(j.days() for j in judged)) if judged else set()
    if note:
        context.log.warning(note)
        snapshot = take_snapshot(target_db, config.window_days, started_at)
        counted = {"created_at_index": "missing", "counted": "whole table (one pass)"}
        days = publishable(target_db, snapshot.today, refresh_from(snapshot, config), touched)
    else:
        tally = current.tally
        context.log.info(("counted the whole table: " if tally.full else "") + tally.reason)
        counted = tally_metadata(tally)
        first = refresh_from(snapshot, config)
        days = changed_days(current.previous, tally, first, snapshot.today, touched)
    publish_days(context, days, snapshot.today)
    return dg.MaterializeResult(
        value=daily_frame(snapshot.daily),
        metadata=snapshot_metadata(snapshot, config.window_days) | counted,
        check_results=population_checks(snapshot, config, target_db, judged, note),
    )


def population_checks(
    snapshot: Snapshot,
    config: PopulationConfig,
    db: TargetDatabase,
    judged: list[verdict.Judged],
    note: str,
) -> list[dg.AssetCheckResult]:
    """The four checks, each judging this same snapshot."""
    where = db.qualified(db.weeks_table)
    return [
        rate_check(snapshot, config.min_recent_population_pct, where),
        orphan_check(snapshot.orphans, db),
        trend_check(snapshot, config.trend_margin_pct, config.started_at()),
        verdict.verdict_check(db, judged, note),
    ]


def refresh_from(snapshot: Snapshot, config: PopulationConfig) -> dt.date:
    """The first day of the refresh window this run re-materializes."""
    return snapshot.today - dt.timedelta(days=config.refresh_days)


def publish_days(
    context: dg.AssetExecutionContext, days: dict[dt.date, DayTally], today: dt.date
) -> None:
    """Report `days` as materializations of execution_id_daily_population partitions."""
    history = daily.in_history(days, today)
    for event in daily.materializations(history, daily.run_database(context)):
        context.log_event(event)


def tally_metadata(tally: Tally) -> dict:
    return {
        "created_at_index": "present",
        "counted": "whole table" if tally.full else f"days since {tally.recounted_from}",
        "count_reason": tally.reason,
        "full_count": tally.full,
    }


def changed_days(
    previous: Tally | None, tally: Tally, first: dt.date, today: dt.date, touched: set[dt.date]
) -> dict[dt.date, DayTally]:
    """The days to publish: those recounted (or changed, after a whole-table count), the
    refresh window from `first`, and the days the judged executions ran on."""
    empty = DayTally(0, 0, 0)
    if tally.full:
        before = previous.days if previous else {}
        days = {d for d, c in tally.days.items() if before.get(d) != c}
        days |= {d for d in before if d not in tally.days}
    else:
        days = {d for d in tally.days if d is not None and d >= tally.recounted_from}
    days |= {first + dt.timedelta(days=k) for k in range((today - first).days + 1)}
    days |= touched
    return {d: tally.days.get(d, empty) for d in days if d is not None}


def publishable(
    db: TargetDatabase, today: dt.date, first: dt.date, touched: set[dt.date]
) -> dict[dt.date, DayTally]:
    """Without a created_at index: the refresh window and the executions' days, counted
    from the table (one pass over the range)."""
    start = min([first, *touched])
    with db.cursor() as cur:
        days = daily.count_days(cur, db, start, max([today, *touched]))
    return {d: c for d, c in days.items() if d >= first or d in touched}


population_assets = [execution_id_population]
