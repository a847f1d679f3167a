"""Sensors: validation follows every collection, without anyone switching it on.

Both sensors default to running, so the daemon of `make ui` (or of a deployment)
evaluates them from its first start:

- `collection_run_sensor` watches Dagster's own runs: each successful
  `weekly_collection` run requests one `post_collection_validation` run, keyed by the
  collection run's id (so a re-evaluated tick never requests it twice).
- `workflow_executions_sensor` is for collection systems outside Dagster: it polls
  `workflow_executions` for executions completed since its cursor and requests one
  `post_collection_validation` run per tick that saw any.
"""

# No `from __future__ import annotations`: Dagster reads resource annotations at runtime.

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import dagster as dg
import psycopg
from psycopg import sql
from psycopg.rows import class_row
from pydantic import Field

from rdw_tracking import catalog
from rdw_tracking.assets.verdict import MAX_EXECUTIONS
from rdw_tracking.errors import StatementTimeout, TargetDatabaseError
from rdw_tracking.jobs import (
    post_collection_validation,
    restore_execution_id,
    rollback_execution_id,
    weekly_collection,
)
from rdw_tracking.resources import TargetDatabase, redact

INDEX_NAME = "idx_workflow_executions_completed_at"
NO_INDEX_CAUSE = "no_completed_at_index"  # in the cursor's `warned` once logged
TICK_STATEMENT_TIMEOUT_MS = 20_000  # well inside Dagster's 60 s sensor evaluation limit


# -- collection_run_sensor ----------------------------------------------------------------


@dg.run_status_sensor(
    name="collection_run_sensor",
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[weekly_collection],
    request_job=post_collection_validation,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=15,
    description=(
        "After each successful weekly_collection run, requests post_collection_validation "
        "(run key and tag rdw/triggered_by_run: the collection's run id; tag "
        "rdw/execution_id: the workflow_executions id it stamped). Failed collections and "
        "other jobs' runs request nothing."
    ),
)
def collection_run_sensor(context: dg.RunStatusSensorContext):
    """After each successful `weekly_collection` run, requests `post_collection_validation`.

    The run key is the collection run's id, and the id is in the tags
    (`rdw/triggered_by_run`), with the `workflow_executions` id it stamped
    (`rdw/execution_id`), so the validation run links back to the collection it validates. Runs of any other job, and failed collection runs, request nothing.
    """
    return collection_request(context)


def collection_request(context: dg.RunStatusSensorContext) -> dg.RunRequest | dg.SkipReason:
    """What collection_run_sensor asks for after one collection run (see its docstring)."""
    run = context.dagster_run
    # monitored_jobs already filters; this keeps the sensor from ever triggering itself
    # should someone widen the monitored jobs.
    if run.job_name != weekly_collection.name:
        return dg.SkipReason(f"run {run.run_id} is {run.job_name}, not {weekly_collection.name}")
    tags = {"rdw/trigger": "collection_run_sensor", "rdw/triggered_by_run": run.run_id}
    execution_id = stamped_execution_id(context.instance, run.run_id)
    if execution_id:
        tags["rdw/execution_id"] = execution_id
    return dg.RunRequest(
        run_key=run.run_id,
        tags=tags,
        run_config=judge_config([execution_id] if execution_id else []),
    )


def judge_config(execution_ids: list[str]) -> dict:
    """Run config of post_collection_validation that judges these executions."""
    if not execution_ids:
        return {}
    return {"ops": {"execution_id_population": {"config": {"execution_ids": execution_ids}}}}


def stamped_execution_id(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """The workflow_executions id a weekly_collection run stamped, from its materialization
    of report_data_weeks; None if it recorded none."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    for record in records:
        materialization = record.event_log_entry.asset_materialization
        if materialization and "execution_id" in materialization.metadata:
            return str(materialization.metadata["execution_id"].value)
    return None


# -- rollback_history_sensor ---------------------------------------------------------------

MAX_REFRESH_DAYS = 366


@dg.run_status_sensor(
    name="rollback_history_sensor",
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[rollback_execution_id, restore_execution_id],
    request_job=post_collection_validation,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=15,
    description=(
        "After a rollback or restore that changed rows (not a dry run), requests "
        "post_collection_validation with refresh_days reaching back to its cutoff_date, so "
        "execution_id_daily_population shows the days it changed."
    ),
)
def rollback_history_sensor(context: dg.RunStatusSensorContext):
    """After a rollback or restore that changed rows, re-publishes every day since its
    cutoff to the history (closed days included), whether or not the created_at index
    lets the validation see the change by itself."""
    return history_request(context)


def history_request(context: dg.RunStatusSensorContext) -> dg.RunRequest | dg.SkipReason:
    run = context.dagster_run
    written = write_outcome(context.instance, run.run_id)
    if written is None:
        return dg.SkipReason(f"run {run.run_id} was a dry run or changed nothing")
    today = dt.datetime.now(dt.timezone.utc).date()
    days = min(max((today - written).days, 0), MAX_REFRESH_DAYS)
    return dg.RunRequest(
        run_key=run.run_id,
        tags={"rdw/trigger": "rollback_history_sensor", "rdw/triggered_by_run": run.run_id},
        run_config={"ops": {"execution_id_population": {"config": {"refresh_days": days}}}},
    )


def write_outcome(instance: dg.DagsterInstance, run_id: str) -> dt.date | None:
    """The cutoff_date of a rollback or restore run that changed rows; None otherwise."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    for record in records:
        materialization = record.event_log_entry.asset_materialization
        meta = materialization.metadata if materialization else {}
        if "cutoff_date" not in meta or meta.get("dry_run") is None:
            continue
        if meta["dry_run"].value:
            return None
        return dt.date.fromisoformat(str(meta["cutoff_date"].value))
    return None


# -- workflow_executions_sensor -----------------------------------------------------------


class ExecutionsPolling(dg.ConfigurableResource):
    """How `workflow_executions_sensor` polls (resource key `executions_polling`)."""

    lookback_minutes: int = Field(
        default=10,
        ge=0,
        description=(
            "Each tick looks this far behind its watermark again, so an execution whose "
            "transaction commits up to this long after its completed_at is still seen."
        ),
    )
    max_per_tick: int = Field(
        default=1000,
        ge=1,
        description="LIMIT of one tick's query; the rest waits for the next tick.",
    )
    future_tolerance_minutes: int = Field(
        default=5,
        ge=0,
        le=1440,
        description=(
            "An execution completed more than this far after the database's now() (clock "
            "skew, a mistyped date) is reported and skipped: the cursor never moves past "
            "now() plus this, so one row dated 2099 cannot silence the sensor."
        ),
    )


@dataclass(frozen=True)
class ExecutionsCursor:
    """Watermark (latest completed_at seen), the ids seen within the look-back window, and
    the causes already logged as a WARNING (each is logged once, on the tick that first
    meets it, then only named in each tick's status; logged again if it comes back)."""

    watermark: dt.datetime | None = None
    seen: dict[str, dt.datetime] = field(default_factory=dict)
    warned: frozenset[str] = frozenset()

    def to_json(self) -> str:
        data = {
            "watermark": self.watermark.isoformat() if self.watermark else None,
            "seen": {i: t.isoformat() for i, t in sorted(self.seen.items())},
        }
        if self.warned:
            data["warned"] = sorted(self.warned)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "ExecutionsCursor":
        try:
            data = json.loads(text)
            watermark = data.get("watermark")
            return cls(
                watermark=dt.datetime.fromisoformat(watermark) if watermark else None,
                seen={i: dt.datetime.fromisoformat(t) for i, t in data.get("seen", {}).items()},
                warned=frozenset(str(c) for c in data.get("warned", [])),
            )
        except (ValueError, TypeError, AttributeError):
            # Guessing a cursor could skip executions; say so and let a person decide.
            raise ValueError(
                f"workflow_executions_sensor cursor {text[:80]!r} is not the JSON it writes "
                '({"watermark": ..., "seen": {...}}); reset the cursor in the UI (the sensor '
                "starts again from the latest completion) or set a valid one"
            ) from None

    def since(self, lookback: dt.timedelta) -> dt.datetime | None:
        return self.watermark - lookback if self.watermark else None

    def capped(self, horizon: dt.datetime) -> "ExecutionsCursor":
        """This cursor with its watermark no later than `horizon` (and no id seen after it)."""
        if self.watermark is None or self.watermark <= horizon:
            return self
        seen = {i: t for i, t in self.seen.items() if t <= horizon}
        return ExecutionsCursor(horizon, seen, self.warned)


def advance(
    cursor: ExecutionsCursor, rows: list[tuple[str, dt.datetime]], lookback: dt.timedelta
) -> ExecutionsCursor:
    """The cursor after `rows` (id, completed_at) were seen: watermark moves to the latest,
    ids older than the look-back window behind it are forgotten (no query reaches them)."""
    seen = {**cursor.seen, **{str(i): t for i, t in rows}}
    watermark = max([t for t in [cursor.watermark, *seen.values()] if t is not None], default=None)
    if watermark is None:
        return cursor
    horizon = watermark - lookback
    return ExecutionsCursor(
        watermark, {i: t for i, t in seen.items() if t >= horizon}, cursor.warned
    )


# Executions completed at or after `since` that the cursor has not seen, oldest first.
# A range on completed_at: with idx_workflow_executions_completed_at an index scan that
# stops at the LIMIT; without it a scan of the whole table.
NEW_COMPLETIONS = """
SELECT id::text AS id, completed_at FROM {executions}
WHERE completed_at >= %(since)s::timestamptz AND id <> ALL(%(seen)s::uuid[])
ORDER BY completed_at, id
LIMIT %(limit)s
"""

# First tick: the latest completion up to the horizon (the database's now() plus the
# tolerance) and every id within the look-back window behind it, and any dated later.
LATEST_COMPLETIONS = """
SELECT id::text AS id, completed_at FROM {executions}
WHERE completed_at >= (SELECT max(completed_at) FROM {executions}
                       WHERE completed_at <= %(horizon)s::timestamptz) - %(lookback)s
   OR completed_at > %(horizon)s::timestamptz
"""


class Completion(NamedTuple):
    """A workflow_executions row that completed."""

    id: str
    completed_at: dt.datetime


@dataclass(frozen=True)
class Poll:
    rows: list[Completion]
    index_names: list[str]
    first_tick: bool
    # Rows completed after `horizon` (the database's now() plus the tolerance): reported,
    # never counted, never moving the cursor.
    future: list[Completion] = field(default_factory=list)
    horizon: dt.datetime | None = None
    # The cursor the tick started from, when its watermark lay beyond the horizon.
    capped_from: dt.datetime | None = None


def poll(
    db: TargetDatabase,
    cursor: ExecutionsCursor | None,
    lookback: dt.timedelta,
    limit: int,
    tolerance: dt.timedelta = dt.timedelta(minutes=5),
) -> Poll:
    """One tick's read: raises TargetDatabaseError naming the table or server when it can't."""
    try:
        return _poll(db, cursor, lookback, limit, tolerance)
    except StatementTimeout:
        raise TargetDatabaseError(
            f"workflow_executions_sensor: the tick's query on {db.qualified(db.executions_table)} "
            f"ran past {TICK_STATEMENT_TIMEOUT_MS // 1000} s; build the opt-in {INDEX_NAME} "
            "(create_execution_id_indexes) or lower executions_polling.max_per_tick"
        ) from None
    except psycopg.Error as err:
        # e.g. lock_timeout behind an ALTER TABLE: one line naming the table, no traceback
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TargetDatabaseError(
            f"workflow_executions_sensor could not read {db.qualified(db.executions_table)} "
            f"on {db.describe()}: {redact(reason, db.resolved_url())}; the next tick retries "
            "from the same cursor"
        ) from None


def _poll(
    db: TargetDatabase,
    cursor: ExecutionsCursor | None,
    lookback: dt.timedelta,
    limit: int,
    tolerance: dt.timedelta,
) -> Poll:
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(TICK_STATEMENT_TIMEOUT_MS))
        horizon = cur.execute("SELECT now()").fetchone()[0] + tolerance
        capped_from = None
        if cursor is not None and cursor.watermark and cursor.watermark > horizon:
            capped_from, cursor = cursor.watermark, cursor.capped(horizon)
        if not catalog.table_exists(cur, db.schema_name, db.executions_table):
            raise TargetDatabaseError(
                f"table {db.qualified(db.executions_table)} does not exist; create it or set "
                "target_db.executions_table; the sensor's cursor stays where it was"
            )
        indexes = catalog.indexes_leading_with(
            cur, db.schema_name, db.executions_table, "completed_at"
        )
        rows = completions(conn, db, cursor, lookback, limit, horizon)
        conn.rollback()
    return Poll(
        rows=[r for r in rows if r.completed_at <= horizon],
        index_names=indexes,
        first_tick=cursor is None,
        future=[r for r in rows if r.completed_at > horizon],
        horizon=horizon,
        capped_from=capped_from,
    )


def completions(
    conn: psycopg.Connection,
    db: TargetDatabase,
    cursor: ExecutionsCursor | None,
    lookback: dt.timedelta,
    limit: int,
    horizon: dt.datetime,
) -> list[Completion]:
    """The first tick's latest completions, or those since the cursor not seen yet."""
    with conn.cursor(row_factory=class_row(Completion)) as by_name:
        if cursor is None:
            by_name.execute(
                sql.SQL(LATEST_COMPLETIONS).format(executions=db.executions),
                {"lookback": lookback, "horizon": horizon},
            )
        else:
            since = cursor.since(lookback)
            by_name.execute(
                sql.SQL(NEW_COMPLETIONS).format(executions=db.executions),
                {
                    "since": since.isoformat() if since else "-infinity",
                    "seen": list(cursor.seen),
                    "limit": limit,
                },
            )
        return by_name.fetchall()


def index_note(db: TargetDatabase, index_names: list[str]) -> str:
    table = db.qualified(db.executions_table)
    if index_names:
        return f"completed_at index: {', '.join(index_names)}"
    return (
        f"no index on {table}(completed_at): every tick scans the whole table; build the "
        f"opt-in {INDEX_NAME} with the create_execution_id_indexes job (run config "
        "ops.execution_id_indexes.config.workflow_executions_completed_at: true)"
    )


def future_note(db: TargetDatabase, result: Poll) -> str:
    """What the tick skipped as dated in the future, or ''."""
    if not result.future:
        return ""
    latest = max(r.completed_at for r in result.future)
    sample = ", ".join(r.id for r in result.future[:5])
    return (
        f"{len(result.future)} execution(s) in {db.qualified(db.executions_table)} have "
        f"completed_at after the database's now() plus the tolerance ({result.horizon.isoformat()}), "
        f"latest {latest.isoformat()} (e.g. {sample}): skipped, and the cursor does not move "
        "past now(); fix their completed_at or the writer's clock. "
    )


def run_key(watermark: dt.datetime, ids: list[str]) -> str:
    """Watermark plus a digest of the new ids: a late commit seen under an unchanged
    watermark still gets a run key of its own."""
    digest = hashlib.sha1(",".join(sorted(ids)).encode()).hexdigest()[:12]
    return f"workflow_executions:{watermark.isoformat()}:{digest}"


@dg.sensor(
    name="workflow_executions_sensor",
    job=post_collection_validation,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "For collection systems outside Dagster: polls workflow_executions for executions "
        "completed since its cursor and requests one post_collection_validation per tick "
        "that saw any (tags: rdw/new_executions, rdw/watermark). A look-back window "
        "(resource executions_polling) catches ties and late commits; the first tick only "
        "sets the cursor; when the database is unreachable the tick fails and the cursor "
        "stays. Each tick says whether idx_workflow_executions_completed_at exists."
    ),
)
def workflow_executions_sensor(
    context: dg.SensorEvaluationContext,
    target_db: TargetDatabase,
    executions_polling: ExecutionsPolling,
):
    """Polls `workflow_executions` for executions completed since the last tick and requests
    one `post_collection_validation` run per tick that saw any (for collection systems
    outside Dagster).

    Nothing is missed or repeated: the cursor keeps the latest `completed_at` seen and
    the ids seen within a look-back window (`executions_polling.lookback_minutes`), and
    each tick re-reads that window. Executions sharing a `completed_at`, and a long
    transaction that commits after the cursor passed its earlier `completed_at`, are
    each reported exactly once. The first tick only sets the cursor at the latest
    completion. When the database or the table is unavailable the tick fails with a
    message naming it, and the cursor stays where it was. Each tick says whether the
    opt-in `idx_workflow_executions_completed_at` exists.

    An execution whose `completed_at` lies beyond the database's `now()` plus
    `executions_polling.future_tolerance_minutes` is reported (log and skip message) and
    skipped, and never moves the cursor: one row dated 2099 cannot silence the sensor.
    """
    outcome = tick(context.log, target_db, executions_polling, context.cursor)
    if outcome.request is None:
        if outcome.cursor is not None:
            context.update_cursor(outcome.cursor)
        return dg.SkipReason(outcome.skip)
    return dg.SensorResult(run_requests=[outcome.request], cursor=outcome.cursor)


@dataclass(frozen=True)
class Tick:
    """One database's part of a tick: the cursor to keep (None: unchanged), and either a
    run request or why there is none."""

    cursor: str | None
    request: dg.RunRequest | None = None
    skip: str = ""


def tick(
    log, target_db: TargetDatabase, executions_polling: ExecutionsPolling, cursor_json: str | None
) -> Tick:
    """Poll one database from its cursor; raises TargetDatabaseError when it cannot."""
    lookback = dt.timedelta(minutes=executions_polling.lookback_minutes)
    tolerance = dt.timedelta(minutes=executions_polling.future_tolerance_minutes)
    cursor = ExecutionsCursor.from_json(cursor_json) if cursor_json else None
    result = poll(target_db, cursor, lookback, executions_polling.max_per_tick, tolerance)
    note = index_note(target_db, result.index_names)
    # The missing index is a WARNING once; every later tick's status still names it.
    warned = frozenset() if result.index_names else frozenset({NO_INDEX_CAUSE})
    if warned - (cursor.warned if cursor else frozenset()):
        log.warning(note)
    if result.capped_from is not None:
        log.warning(
            f"the cursor's watermark {result.capped_from.isoformat()} lay in the future; "
            f"moved back to {result.horizon.isoformat()} (the database's now() plus the tolerance)"
        )
        cursor = cursor.capped(result.horizon)
    future = future_note(target_db, result)
    if future:
        log.warning(future)
    note = future + note
    warned_before = cursor.warned if cursor else frozenset()
    cursor = replace(cursor, warned=warned) if cursor else None
    new_cursor = replace(
        advance(cursor or ExecutionsCursor(), result.rows, lookback), warned=warned
    )
    if result.first_tick:
        latest = new_cursor.watermark.isoformat() if new_cursor.watermark else "none yet"
        return Tick(
            new_cursor.to_json(),
            skip=f"first tick: cursor set at the latest completion ({latest}); no run requested. {note}",
        )
    if not result.rows:
        since = cursor.watermark.isoformat() if cursor and cursor.watermark else "the start"
        # keep a capped watermark, or a change in what was warned about
        changed = result.capped_from is not None or warned != warned_before
        return Tick(
            cursor.to_json() if changed else None,
            skip=f"no execution completed since {since}. {note}",
        )
    ids = [r.id for r in result.rows]
    log.info(f"{len(ids)} new completed execution(s), watermark {new_cursor.watermark}")
    request = dg.RunRequest(
        run_key=run_key(new_cursor.watermark, ids),
        # judged by execution_id_run_stamped, at most MAX_EXECUTIONS per run
        run_config=judge_config(ids[:MAX_EXECUTIONS]),
        tags={
            "rdw/trigger": "workflow_executions_sensor",
            "rdw/new_executions": str(len(ids)),
            "rdw/watermark": new_cursor.watermark.isoformat(),
            "rdw/completed_at_index": "present" if result.index_names else "missing",
        },
    )
    return Tick(new_cursor.to_json(), request)


sensors = [collection_run_sensor, rollback_history_sensor, workflow_executions_sensor]
