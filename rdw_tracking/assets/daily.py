"""Population history by UTC creation day: the daily-partitioned asset
`execution_id_daily_population`, how its days are published, and the reconcile check.

A day is computed once and kept: each partition's materialization carries its own
figures (`total_rows`, `with_execution_id`, `population_pct`, `orphan_count`), so the UI
plots every day since tracking began. Partitions are materialized three ways:

- by `execution_id_population` (sensor-triggered validation and the daily schedule),
  which publishes only the days it recounted or saw change, plus the last
  `refresh_days`;
- by a backfill of this asset: one run for any range of days (single-run backfill
  policy), one query over that range;
- never by recounting days nobody touched.

`execution_id_daily_history_matches` (in the weekly verification) compares every stored
day with the table and names the days that drifted.
"""

import datetime as dt
import os
import warnings
from dataclasses import dataclass

import dagster as dg
import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row

from rdw_tracking import catalog
from rdw_tracking.assets import DAILY_SNAPSHOT_FRESHNESS, GROUP, READ_RETRY
from rdw_tracking.assets.metadata import metadata_table
from rdw_tracking.assets.tables import report_data_weeks, workflow_executions
from rdw_tracking.fleet import FLEET_ENV, database_of
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.tally import DayTally, Tables, count_all, midnight, rate

ASSET = "execution_id_daily_population"
RECONCILE_CHECK = "execution_id_daily_history_matches"
HISTORY_START_ENV = "RDW_HISTORY_START"
DEFAULT_HISTORY_START = "2025-01-01"
MISMATCH_SAMPLE = 50


def history_start() -> str:
    """The first day of the history: env RDW_HISTORY_START (YYYY-MM-DD), else 2025-01-01."""
    value = os.environ.get(HISTORY_START_ENV, "").strip() or DEFAULT_HISTORY_START
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{HISTORY_START_ENV}={value!r} is not a date; set it to the first day of the "
            "history as YYYY-MM-DD (e.g. 2025-01-01)"
        ) from None
    return value


# One partition per UTC day, today's included (end_offset=1): today's figures move
# until the day closes, and the daily schedule re-materializes the last few days.
daily_partitions = dg.DailyPartitionsDefinition(
    start_date=history_start(), end_offset=1, timezone="UTC"
)


def partition_days(today: dt.date) -> tuple[dt.date, dt.date]:
    """(first, last) day that has a partition."""
    return dt.date.fromisoformat(history_start()), today


# -- counting days straight from the table --------------------------------------------------

DAYS_RANGE_SQL = """
SELECT w.created_at::date AS day, count(*) AS rows, count(w.execution_id) AS stamped,
       {orphans} AS orphans
FROM {weeks} AS w {join}
WHERE w.created_at >= %(start)s AND w.created_at < %(end)s
GROUP BY 1
"""


# Past this many days, a range is counted the way the tally counts the whole table (each
# distinct execution_id asked about once) rather than by joining every row.
LONG_RANGE_DAYS = 31


def count_days(cur: psycopg.Cursor, db: TargetDatabase, first: dt.date, last: dt.date) -> dict:
    """{day: DayTally} for every day from `first` to `last` (days without rows: zeros)."""
    with_executions = catalog.table_exists(cur, db.schema_name, db.executions_table)
    if (last - first).days >= LONG_RANGE_DAYS:
        return _long_range(cur, db, with_executions, first, last)
    parts = {
        "weeks": db.weeks,
        "join": sql.SQL("LEFT JOIN {} AS e ON e.id = w.execution_id").format(db.executions)
        if with_executions
        else sql.SQL(""),
        "orphans": sql.SQL(
            "count(*) FILTER (WHERE w.execution_id IS NOT NULL AND e.id IS NULL)"
            if with_executions
            else "0"
        ),
    }
    with cur.connection.cursor(row_factory=namedtuple_row) as by_name:
        by_name.execute(
            sql.SQL(DAYS_RANGE_SQL).format(**parts),
            {"start": midnight(first), "end": midnight(last + dt.timedelta(days=1))},
        )
        found = {row.day: DayTally(row.rows, row.stamped, row.orphans) for row in by_name}
    days = (last - first).days + 1
    return {
        first + dt.timedelta(days=k): found.get(first + dt.timedelta(days=k), DayTally(0, 0))
        for k in range(days)
    }


def day_status(counts: DayTally) -> str:
    """`ok`, or what makes the day stand out."""
    if counts.orphans:
        return f"FAILING: {counts.orphans} row(s) point at no workflow_executions row"
    return "ok"


def day_metadata(counts: DayTally) -> dict:
    return {
        "day_status": day_status(counts),
        "total_rows": counts.rows,
        "with_execution_id": counts.stamped,
        "without_execution_id": counts.rows - counts.stamped,
        "population_pct": rate(counts.stamped, counts.rows),
        "orphan_count": counts.orphans,
    }


def _long_range(
    cur: psycopg.Cursor, db: TargetDatabase, with_executions: bool, first: dt.date, last: dt.date
) -> dict:
    from rdw_tracking.assets.tallying import weeks_layout

    tables = Tables(db.weeks, db.executions if with_executions else None, weeks_layout(cur, db))
    counted = count_all(cur, tables)
    days = (last - first).days + 1
    return {
        first + dt.timedelta(days=k): counted.get(first + dt.timedelta(days=k), DayTally(0, 0))
        for k in range(days)
    }


def run_database(context) -> str | None:
    """The fleet database this run is for; None outside a fleet (one database)."""
    if not os.environ.get(FLEET_ENV):
        return None
    return database_of(context.run.tags)


def history_key(day: dt.date, database: str | None) -> str:
    """A day's partition key: `YYYY-MM-DD`, or `<database>|YYYY-MM-DD` in a fleet."""
    if database is None:
        return day.isoformat()
    return str(dg.MultiPartitionKey({"database": database, "day": day.isoformat()}))


def materializations(days: dict, database: str | None = None) -> list[dg.AssetMaterialization]:
    """One materialization of `execution_id_daily_population` per day (within the history)."""
    return [
        dg.AssetMaterialization(
            asset_key=ASSET,
            partition=history_key(day, database),
            metadata=day_metadata(counts),
            description=f"{counts.rows} rows created on {day} (UTC): {day_status(counts)}",
        )
        for day, counts in sorted(days.items())
    ]


def in_history(days: dict, today: dt.date) -> dict:
    first, last = partition_days(today)
    return {d: c for d, c in days.items() if d is not None and first <= d <= last}


# -- what is stored ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredDay:
    counts: DayTally
    stored_at: float  # timestamp of the materialization


def stored_days(
    instance: dg.DagsterInstance, database: str | None = None
) -> dict[dt.date, StoredDay]:
    """The latest materialization of every partition of the history (of one database, in
    a fleet), read from Dagster's event log (no table scan)."""
    key = dg.AssetKey(ASSET)
    latest = instance.get_latest_storage_id_by_partition(
        key, dg.DagsterEventType.ASSET_MATERIALIZATION
    )
    stored: dict[dt.date, StoredDay] = {}
    if database is not None:
        latest = {k: v for k, v in latest.items() if k.split("|")[0] == database}
    ids = list(latest.values())
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, storage_ids=chunk), limit=len(chunk)
        ).records
        for record in records:
            materialization = record.asset_materialization
            if materialization is None or materialization.partition is None:
                continue
            meta = materialization.metadata

            def value(name: str, meta=meta) -> int:
                entry = meta.get(name)
                return int(entry.value) if entry is not None and entry.value is not None else 0

            day = str(materialization.partition).split("|")[-1]
            stored[dt.date.fromisoformat(day)] = StoredDay(
                DayTally(value("total_rows"), value("with_execution_id"), value("orphan_count")),
                record.timestamp,
            )
    return stored


# -- the asset ------------------------------------------------------------------------------


def execution_id_daily_population(
    context: dg.AssetExecutionContext, target_db: TargetDatabase
) -> dg.MaterializeResult:
    """Population of `execution_id` per UTC creation day, one partition per day.

    A backfill of many days is one run (single-run backfill policy). With
    `idx_report_data_weeks_created_at` on every partition, the days come from the per-day
    tally brought up to date (the first time, one count of the whole table); without it,
    one grouped query over the range. Each partition
    records its own `total_rows`, `with_execution_id`, `population_pct` and `orphan_count`.
    """
    window = context.partition_time_window
    first = window.start.date()
    last = (window.end - dt.timedelta(days=1)).date()
    from rdw_tracking.assets import tallying

    with target_db.cursor() as cur:
        opened = tallying.begin(cur, target_db)
        layout, note = opened.layout, opened.note
        if note:
            context.log.warning(note)
            days = count_days(cur, target_db, first, last)
        else:
            # The per-day tally brought up to date: only what changed since it is read.
            tally = tallying.bring_up_to_date(cur, target_db, context.instance, layout).tally
            context.log.info(("counted the whole table: " if tally.full else "") + tally.reason)
            days = {
                first + dt.timedelta(days=k): tally.days.get(
                    first + dt.timedelta(days=k), DayTally(0, 0)
                )
                for k in range((last - first).days + 1)
            }
    database = run_database(context)
    for day, counts in days.items():
        context.add_asset_metadata(day_metadata(counts), partition_key=history_key(day, database))
    total = sum(c.rows for c in days.values())
    context.log.info(f"{len(days)} day(s) from {first} to {last}: {total} rows")
    return dg.MaterializeResult()


with warnings.catch_warnings():
    # backfill_policy is beta in Dagster 1.13, chosen knowingly: no warning on every load.
    warnings.simplefilter("ignore", dg.BetaWarning)
    execution_id_daily_population = dg.asset(
        key=ASSET,
        group_name=GROUP,
        deps=[report_data_weeks, workflow_executions],
        kinds={"postgres"},
        partitions_def=daily_partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        freshness_policy=DAILY_SNAPSHOT_FRESHNESS,
        retry_policy=READ_RETRY,
        description=(
            "Population of execution_id per UTC creation day: rows, rows with an execution_id, "
            "population_pct and orphaned ids of that day. Each day is computed once and "
            "re-materialized when it changes (validation after a collection run publishes the "
            "days it touched; the daily schedule the last few days). A backfill of any range "
            "runs as one run with one query over the range."
        ),
    )(execution_id_daily_population)


# -- execution_id_daily_history_matches -------------------------------------------------------


def reconcile(stored: dict, table: dict, first: dt.date, last: dt.date) -> dict:
    """{day: (stored, table)} for each day of [first, last] where they differ; a day
    never stored counts as differing only if the table has rows on it."""
    drift = {}
    for k in range((last - first).days + 1):
        day = first + dt.timedelta(days=k)
        now = table.get(day, DayTally(0, 0))
        kept = stored.get(day)
        if kept is None:
            if now.rows:
                drift[day] = (None, now)
        elif kept.counts != now:
            drift[day] = (kept.counts, now)
    return drift


def drift_table(drift: dict) -> dg.TableMetadataValue:
    def figures(counts: DayTally | None) -> dict:
        if counts is None:
            return {"rows": None, "stamped": None, "orphans": None}
        return {"rows": counts.rows, "stamped": counts.stamped, "orphans": counts.orphans}

    records = []
    for day, (kept, now) in sorted(drift.items())[:MISMATCH_SAMPLE]:
        stored, table = figures(kept), figures(now)
        records.append(
            {
                "day": day.isoformat(),
                "stored_rows": stored["rows"],
                "table_rows": table["rows"],
                "stored_with_execution_id": stored["stamped"],
                "table_with_execution_id": table["stamped"],
                "stored_orphans": stored["orphans"],
                "table_orphans": table["orphans"],
            }
        )
    columns = {"day": "date"} | {
        f"{side}_{what}": "int"
        for what in ("rows", "with_execution_id", "orphans")
        for side in ("stored", "table")
    }
    return metadata_table(columns, records)


def reconcile_result(drift: dict, checked: int, how: str) -> dg.AssetCheckResult:
    days = sorted(drift)
    if drift:
        never = sum(1 for kept, _ in drift.values() if kept is None)
        listed = ", ".join(d.isoformat() for d in days[:10]) + (" ..." if len(days) > 10 else "")
        description = (
            f"{len(days)} of {checked} stored day(s) of {ASSET} no longer match the table "
            f"({never} never materialized): {listed}; re-materialize those partitions "
            "(a backfill of that range is one run)"
        )
    else:
        description = f"all {checked} day(s) of {ASSET} match the table ({how})"
    return dg.AssetCheckResult(
        check_name=RECONCILE_CHECK,
        asset_key=ASSET,
        passed=not drift,
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={
            "days_checked": checked,
            "days_drifted": len(days),
            "drifted_days": [d.isoformat() for d in days[:MISMATCH_SAMPLE]],
            "drift": drift_table(drift),
            "table_counted": how,
        },
    )


@dg.asset_check(
    asset=ASSET,
    name=RECONCILE_CHECK,
    retry_policy=READ_RETRY,
    description=(
        "Every stored day of execution_id_daily_population still matches the table "
        "(WARN); names the days that drifted (late rows, rollbacks, deleted executions)."
    ),
)
def execution_id_daily_history_matches(
    context: dg.AssetCheckExecutionContext, target_db: TargetDatabase
) -> dg.AssetCheckResult:
    """Compares every stored day of the history with the table and names the days that
    drifted. With `idx_report_data_weeks_created_at`, the table's side is the per-day
    tally brought up to date (only what changed is read); without it, one pass over the
    history's range."""
    from rdw_tracking.assets import tallying

    stored = stored_days(context.instance, run_database(context))
    with target_db.cursor() as cur:
        cur.execute(tallying.SNAPSHOT)
        today = cur.execute("SELECT CURRENT_DATE").fetchone()[0]
        layout = tallying.weeks_layout(cur, target_db)
        note = tallying.index_note(target_db, tallying.unindexed_leaves(cur, layout))
        first, last = partition_days(today)
        if note:
            context.log.warning(note)
            table = count_days(cur, target_db, first, last)
            how = "one pass over the history's range"
        else:
            tally = tallying.bring_up_to_date(cur, target_db, context.instance, layout).tally
            table = tally.days
            how = "whole table counted" if tally.full else tally.reason
    checked = sum(1 for d in stored if first <= d <= last)
    return reconcile_result(reconcile(stored, table, first, last), checked, how)


daily_assets = [execution_id_daily_population]
daily_checks = [execution_id_daily_history_matches]
