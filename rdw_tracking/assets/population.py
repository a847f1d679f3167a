"""The population snapshot as Dagster runs it: run config, the `execution_id_population`
asset and its three checks (recent rate, orphaned ids, daily trend).

Taking the snapshot (one pass, or the tally and the rows since) is the package
`rdw_tracking.population`; this module picks the way, judges the snapshot and turns it
into metadata, and publishes the days it recounted to the daily history.
"""

import datetime as dt
import os

import dagster as dg
import pandas as pd
from pydantic import Field, field_validator

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
from rdw_tracking.population.from_tally import (
    snapshot_from_tally,
)
from rdw_tracking.population.model import (
    Day,
    Orphans,
    Snapshot,
)
from rdw_tracking.population.one_pass import (
    take_snapshot,
)
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.tally import DayTally, Tally, rate

ASSET = "execution_id_population"
RATE_CHECK = "execution_id_recent_population_rate"
ORPHAN_CHECK = "execution_ids_exist"
TREND_CHECK = "execution_id_population_trend"
DAILY_COLUMNS = ["creation_date", "total_records", "with_execution_id", "population_rate"]
BUDGET_ENV = "RDW_COUNT_BUDGET_HOURS"


def default_budget_hours() -> float:
    """env RDW_COUNT_BUDGET_HOURS, else 0: every run counts every day."""
    value = os.environ.get(BUDGET_ENV, "").strip() or "0"
    try:
        hours = float(value)
    except ValueError:
        hours = -1.0
    if not 0 <= hours <= 24 * 31:
        raise ValueError(
            f"{BUDGET_ENV}={value!r} is not a number of hours between 0 and 744; unset it "
            "(every run counts every day) or set the budget, e.g. 24"
        )
    return hours


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

    count_budget_hours: float = Field(
        default=default_budget_hours(),
        description=(
            "0 (default): every run counts every day, so every figure is the table's in "
            "the run's snapshot. Above 0 (opt-in): days before the recent window may be "
            "taken from an earlier count at most this many hours old, while the server's "
            "counters show no change and every premise they rest on holds; metadata "
            "day_sources says which days come from which count. Orphans are always "
            "counted. Default from env RDW_COUNT_BUDGET_HOURS."
        ),
    )

    @field_validator("count_budget_hours")
    @classmethod
    def _budget(cls, value: float, info) -> float:
        if not 0 <= value <= 24 * 31:
            raise refuse(f"{info.field_name} must be between 0 and 744 hours, got {value}")
        return value

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


# -- the snapshot from a tally (when every leaf has an index led by created_at) ----------


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
    if orphans.proof:
        description = f"no {weeks} can be orphaned: {orphans.proof}"
    elif orphans.count:
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
            "orphans_proven_by": orphans.proof or "counted: an anti-join over every row",
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
        opened = tallying.begin(cur, target_db, config.count_budget_hours)
        note = opened.note
        judged = verdict.judge(cur, target_db, ids)
        if not note:
            budget = tallying.budget(
                cur, config.count_budget_hours, opened.hints, config.window_days
            )
            current = tallying.bring_up_to_date(
                cur, target_db, context.instance, opened.layout, budget
            )
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
        "day_sources": sources_table(tally),
    }


def sources_table(tally: Tally) -> dg.TableMetadataValue:
    """Which days come from which count, and when that count was taken."""
    return metadata_table(
        {"counted_at": "string", "first_day": "date", "last_day": "date", "days": "int"},
        (
            {
                "counted_at": f"{s.counted_at:%Y-%m-%d %H:%M:%S} UTC"
                + (" (this run)" if s.counted_at == tally.taken_at else ""),
                "first_day": None if s.first is None else s.first.isoformat(),
                "last_day": None if s.last is None else s.last.isoformat(),
                "days": s.days,
            }
            for s in tally.sources()
        ),
        descriptions={"counted_at": "when the rows of these days were counted"},
    )


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
