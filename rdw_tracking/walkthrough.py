"""`make demo`: the pipeline end to end on the embedded database, with a summary table.

Runs go through the Dagster instance of DAGSTER_HOME, so everything the demo does is
visible afterwards in `make ui`.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from typing import Any, NamedTuple

import dagster as dg
from psycopg import sql

from rdw_tracking import catalog, demo
from rdw_tracking.resources import TargetDatabase

# Figures worth a glance per asset, in the order they are printed.
KEY_FIGURES = {
    "execution_id_schema": ["data_type", "is_nullable", "column_default", "fk_constraint"],
    "execution_id_indexes": ["created", "rebuilt", "unchanged", "index_bytes"],
    "execution_id_population": [
        "total_rows",
        "population_pct",
        "recent_total_rows",
        "recent_population_pct",
    ],
    "execution_id_join_plan": ["execution_ms", "uses_index", "index_names"],
    "execution_id_storage": ["total_bytes", "index_bytes", "execution_id_bytes"],
    "execution_id_rollback": ["dry_run", "matched_rows", "cleared_rows", "rollback_id"],
}
# Written by weekly_collection: which execution stamped how many rows.
KEY_FIGURES["report_data_weeks"] = ["rows_written", "execution_id"]


def ensure_demo_data(rows: int, rebuild: bool = False) -> None:
    """Build the demo tables in the demo's database (`rdw-tracking demo`/`ui` set
    RDW_DATABASE_URL to it) if missing, or always with `rebuild`. `demo.build` drops
    only tables it marked as its own, and refuses otherwise."""
    db = TargetDatabase()
    with db.cursor() as cur:
        present = catalog.table_exists(cur, db.schema_name, db.weeks_table)
    if rebuild or not present:
        summary = demo.build(db.resolved_url(), demo.DemoShape(rows=rows))
        print(
            f"demo data: {summary['rows']:,} report_data_weeks rows "
            f"({summary['with_execution_id']:,} with execution_id), "
            f"{summary['workflow_executions']:,} workflow_executions, "
            f"{summary['collections']:,} collections in {summary['seconds']} s"
        )


# assets.daily.HISTORY_START_ENV, spelled again: importing that module fixes the history's
# partitions, which this has to set first.
HISTORY_START_ENV = "RDW_HISTORY_START"


def start_history_at_demo_data() -> str:
    """Set RDW_HISTORY_START to the first day of the demo's report_data_weeks rows, for
    this process and the UI's code server it starts: the daily history's partitions then
    begin where the data does, and none before it shows as Missing. Returns the day.

    Premise: the definitions are not imported yet in this process (checked)."""
    if "rdw_tracking.assets.daily" in sys.modules:
        raise RuntimeError(
            "start_history_at_demo_data: the definitions are imported already, so their "
            "daily partitions are fixed; call it before importing rdw_tracking.definitions"
        )
    db = TargetDatabase()
    with db.cursor() as cur:
        first = cur.execute(
            sql.SQL("SELECT min(created_at)::date FROM {}").format(db.weeks)
        ).fetchone()[0]
    day = (first or dt.datetime.now(dt.timezone.utc).date()).isoformat()
    os.environ[HISTORY_START_ENV] = day
    return day


def _value(entry: Any) -> Any:
    return getattr(entry, "value", entry)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def summarize(result: dg.ExecuteInProcessResult) -> list[str]:
    """Lines of the summary table for one job run: figures per asset, then each check."""
    lines = []
    days = []
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        name = materialization.asset_key.to_user_string()
        if materialization.partition:  # a day of the history: one line for them all
            pct = _value(materialization.metadata.get("population_pct"))
            days.append(f"{materialization.partition} {pct}%")
            continue
        figures = [
            f"{key}={_short(_value(materialization.metadata[key]))}"
            for key in KEY_FIGURES.get(name, [])
            if key in materialization.metadata
        ]
        lines.append(f"  {name:<28} {', '.join(figures)}")
    if days:
        shown = ", ".join(days[-3:])
        lines.append(
            f"  {'execution_id_daily_population':<28} {len(days)} day(s) stored, latest: {shown}"
        )
    for evaluation in result.get_asset_check_evaluations():
        verdict = "PASS" if evaluation.passed else f"FAIL ({evaluation.severity.value})"
        lines.append(
            f"  check {evaluation.check_name:<38} {verdict:<13} {evaluation.description or ''}"
        )
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            error = event.event_specific_data.error
            lines.append(
                f"  step {event.step_key} failed: {error.message.strip() if error else ''}"
            )
    return lines


def run_job(
    instance: dg.DagsterInstance, name: str, run_config: dict | None = None
) -> dg.ExecuteInProcessResult:
    from rdw_tracking.definitions import defs

    job = defs.resolve_job_def(name)
    # Dagster's step-by-step DEBUG lines would drown the summary; the UI has them all.
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    result = job.execute_in_process(
        instance=instance, run_config={**quiet, **(run_config or {})}, raise_on_error=False
    )
    print(f"\n{name}: {'succeeded' if result.success else 'FAILED'} (run {result.run_id[:8]})")
    print("\n".join(summarize(result)))
    return result


def sensor_outcome(
    result: Any, context: dg.SensorEvaluationContext | None = None
) -> tuple[list[dg.RunRequest], str | None, str | None]:
    """(run requests, skip message, cursor) of whatever a sensor function returned."""
    cursor = context.cursor if context is not None else None
    if isinstance(result, dg.SensorResult):
        skip = result.skip_reason.skip_message if result.skip_reason else None
        cursor = result.cursor if result.cursor is not None else cursor
        return list(result.run_requests or []), skip, cursor
    if isinstance(result, dg.SkipReason):
        return [], result.skip_message, cursor
    if isinstance(result, dg.RunRequest):
        return [result], None, cursor
    return [], None, cursor


class Tick(NamedTuple):
    """A sensor's answer as the daemon reads it."""

    run_requests: list[dg.RunRequest]
    skip_message: str | None
    cursor: str | None


def evaluate(sensor: dg.SensorDefinition, context: dg.SensorEvaluationContext) -> Tick:
    """`sensor`'s own function called directly with `context` (Dagster's public way to
    test a sensor): its run requests, skip message and the cursor to keep."""
    return Tick(*sensor_outcome(sensor(context), context))


def report_tick(name: str, requests: list[dg.RunRequest], skip: str | None) -> None:
    why = f" ({skip})" if skip else ""
    print(f"  sensor {name}: {len(requests)} run request(s){why}")


def tick_polling_sensor(
    instance: dg.DagsterInstance, cursor: str | None
) -> tuple[list[dg.RunRequest], str | None]:
    """One tick of `workflow_executions_sensor` as the daemon makes it: its own function,
    the instance, the Definitions' resources and the cursor. Returns (requests, cursor)."""
    from rdw_tracking.definitions import defs
    from rdw_tracking.sensors import workflow_executions_sensor

    # Called directly, a sensor gets only the resources its context is given.
    # Entered, so the resources it builds are released when the tick is done.
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, resources=dict(defs.resources or {})
    ) as context:
        requests, skip, cursor = sensor_outcome(workflow_executions_sensor(context), context)
    report_tick(workflow_executions_sensor.name, requests, skip)
    return requests, cursor


def tick_collection_sensor(
    instance: dg.DagsterInstance, collection: dg.ExecuteInProcessResult
) -> list[dg.RunRequest]:
    """`collection_run_sensor` evaluated for one finished collection run, as the daemon
    calls it for each successful run it sees (a failed run never reaches it)."""
    from rdw_tracking.sensors import collection_run_sensor

    if not collection.success:
        report_tick(collection_run_sensor.name, [], "the collection run failed")
        return []
    context = dg.build_run_status_sensor_context(
        sensor_name=collection_run_sensor.name,
        dagster_event=collection.get_run_success_event(),
        dagster_instance=instance,
        dagster_run=collection.dagster_run,
    )
    requests, skip, _ = sensor_outcome(collection_run_sensor(context))
    report_tick(collection_run_sensor.name, requests, skip)
    return requests


def launch(
    instance: dg.DagsterInstance, sensor_name: str, request: dg.RunRequest
) -> dg.ExecuteInProcessResult:
    """Run what a sensor requested, in process, tagged the way the daemon tags it."""
    from rdw_tracking.definitions import defs

    job_name = request.job_name or defs.resolve_sensor_def(sensor_name).job_name
    tags = {**request.tags, "dagster/sensor_name": sensor_name}
    if request.run_key:
        tags["dagster/run_key"] = request.run_key
    job = defs.resolve_job_def(job_name)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    result = job.execute_in_process(
        instance=instance,
        run_config={**quiet, **request.run_config},
        tags=tags,
        raise_on_error=False,
    )
    print(
        f"\n{job_name} requested by {sensor_name}: "
        f"{'succeeded' if result.success else 'FAILED'} (run {result.run_id[:8]})"
    )
    print("\n".join(summarize(result)))
    return result


def backfill_history(instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    """Every day of the demo's data into execution_id_daily_population, as one run (what
    a backfill launched from the UI does with its single-run policy)."""
    from rdw_tracking.assets import daily
    from rdw_tracking.definitions import defs

    db = TargetDatabase()
    with db.cursor() as cur:
        first, today = cur.execute(
            sql.SQL("SELECT min(created_at)::date, CURRENT_DATE FROM {}").format(db.weeks)
        ).fetchone()
    first = max(first or today, dt.date.fromisoformat(daily.history_start()))
    job = defs.resolve_implicit_global_asset_job_def()
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    result = job.get_subset(asset_selection={dg.AssetKey(daily.ASSET)}).execute_in_process(
        instance=instance,
        run_config=quiet,
        tags={
            "dagster/asset_partition_range_start": first.isoformat(),
            "dagster/asset_partition_range_end": today.isoformat(),
        },
        raise_on_error=False,
    )
    print(
        f"\nbackfill of {daily.ASSET}, {first} to {today}, one run: "
        f"{'succeeded' if result.success else 'FAILED'} (run {result.run_id[:8]})"
    )
    print("\n".join(summarize(result)))
    return result


def collection_and_sensors(instance: dg.DagsterInstance) -> list[dg.ExecuteInProcessResult]:
    """A collection run, then both sensors evaluated as the daemon would, then the runs
    they ask for.

    The polling sensor's first tick only sets its cursor (at the latest completed
    execution), exactly as on a fresh daemon; the tick after the collection sees it. The
    run-status sensor is evaluated for the collection run itself.
    """
    _, cursor = tick_polling_sensor(instance, None)
    collection = run_job(instance, "weekly_collection")
    results = [collection]
    for request in tick_collection_sensor(instance, collection):
        results.append(launch(instance, "collection_run_sensor", request))
    requests, _ = tick_polling_sensor(instance, cursor)
    results += [launch(instance, "workflow_executions_sensor", r) for r in requests]
    return results


def run_table(results: list[dg.ExecuteInProcessResult]) -> list[str]:
    """One line per run: job, what started it, outcome, checks passed."""
    lines = []
    for result in results:
        tags = result.dagster_run.tags
        trigger = tags.get("dagster/sensor_name", "demo")
        if "rdw/triggered_by_run" in tags:
            trigger += f" <- run {tags['rdw/triggered_by_run'][:8]}"
        checks = result.get_asset_check_evaluations()
        passed = sum(e.passed for e in checks)
        job = result.dagster_run.job_name
        if "dagster/asset_partition_range_start" in tags:
            job = "backfill (one run)"
        lines.append(
            f"  {job:<28} {trigger:<44} "
            f"{'succeeded' if result.success else 'FAILED':<10} checks {passed}/{len(checks)} passed"
        )
    return lines


def run(rows: int = 20_000) -> int:
    ensure_demo_data(rows, rebuild=True)
    start_history_at_demo_data()
    instance = (
        dg.DagsterInstance.get()
        if os.environ.get("DAGSTER_HOME")
        else dg.DagsterInstance.ephemeral()
    )
    # With the opt-in created_at index, validation reads only what changed.
    indexes = {"ops": {"execution_id_indexes": {"config": {"report_data_weeks_created_at": True}}}}
    results = [run_job(instance, "create_execution_id_indexes", indexes)]
    results.append(backfill_history(instance))
    results.append(run_job(instance, "verify_execution_tracking"))
    results.append(run_job(instance, "post_collection_validation"))
    results += collection_and_sensors(instance)
    # The rollback, as a dry run: what clearing the last four weeks would touch.
    cutoff = (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=28)).isoformat()
    rollback = {"ops": {"execution_id_rollback": {"config": {"cutoff_date": cutoff}}}}
    results.append(run_job(instance, "rollback_execution_id", rollback))
    failed = [r.dagster_run.job_name for r in results if not r.success]
    print("\nsummary")
    print("\n".join(run_table(results)))
    if failed:
        print(f"\nfailed jobs: {', '.join(failed)}")
        return 1
    print("\nEverything above is in the Dagster UI: make ui")
    return 0
