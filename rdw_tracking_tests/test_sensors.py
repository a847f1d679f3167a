"""Sensors and schedules, evaluated as the daemon evaluates them.

The run-status sensor reads real runs from a real (temporary) Dagster instance; the
polling sensor reads a real `workflow_executions` table.
"""

import datetime as dt
import json

import dagster as dg
import psycopg
import pytest

from rdw_tracking.definitions import defs
from rdw_tracking.resources import TargetDatabase, TargetDatabaseError
from rdw_tracking.schedules import daily_population_snapshot, weekly_execution_tracking_verification
from rdw_tracking.sensors import (
    INDEX_NAME,
    ExecutionsCursor,
    ExecutionsPolling,
    advance,
    collection_run_sensor,
    workflow_executions_sensor,
)
from rdw_tracking.walkthrough import evaluate

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"

# -- collection_run_sensor -------------------------------------------------------------


def drain(sensor, instance, cursor):
    """`sensor` called for every run that succeeded since `cursor`, oldest first, as the
    daemon calls a run-status sensor (public APIs only); (run requests, cursor after)."""
    changes = instance.fetch_run_status_changes(
        dg.DagsterEventType.RUN_SUCCESS, limit=100, cursor=cursor, ascending=True
    )
    requests = []
    for record in changes.records:
        entry = record.event_log_entry
        context = dg.build_run_status_sensor_context(
            sensor_name=sensor.name,
            dagster_event=entry.dagster_event,
            dagster_instance=instance,
            dagster_run=instance.get_run_by_id(entry.run_id),
        )
        outcome = sensor(context)
        if isinstance(outcome, dg.RunRequest):
            requests.append(outcome)
    return requests, changes.cursor if changes.records else cursor


def test_run_status_sensor_fires_after_successful_collection_only(database_url, run_job):
    with dg.instance_for_test() as instance:
        first, cursor = drain(collection_run_sensor, instance, None)
        assert not first

        ok = run_job("weekly_collection", instance=instance)
        failed = run_job(
            "weekly_collection",
            instance=instance,
            resources={"target_db": TargetDatabase(url=UNREACHABLE)},
        )
        validation = run_job("post_collection_validation", instance=instance)
        assert ok.success and not failed.success and validation.success

        requests, _ = drain(collection_run_sensor, instance, cursor)
    assert [r.run_key for r in requests] == [ok.run_id]
    assert requests[0].tags["rdw/triggered_by_run"] == ok.run_id
    stamped = ok.asset_materializations_for_node("collect_weeks")[0].metadata["execution_id"]
    assert requests[0].tags["rdw/execution_id"] == stamped.value
    judged = requests[0].run_config["ops"]["execution_id_population"]["config"]["execution_ids"]
    assert judged == [stamped.value]


def test_run_status_sensor_function_ignores_other_jobs(database_url, run_job):
    with dg.instance_for_test() as instance:
        validation = run_job("post_collection_validation", instance=instance)
        context = dg.build_run_status_sensor_context(
            sensor_name="collection_run_sensor",
            dagster_event=validation.get_run_success_event(),
            dagster_instance=instance,
            dagster_run=validation.dagster_run,
        )
        assert isinstance(collection_run_sensor(context), dg.SkipReason)


# -- workflow_executions_sensor --------------------------------------------------------


def tick(cursor, url, lookback_minutes=10, max_per_tick=1000):
    """One evaluation; returns the SensorExecutionData (cursor: the one to keep)."""
    resources = {
        "target_db": TargetDatabase(url=url),
        "executions_polling": ExecutionsPolling(
            lookback_minutes=lookback_minutes, max_per_tick=max_per_tick
        ),
    }
    # entered, so its resources (and their ephemeral instance) are released here
    with dg.build_sensor_context(cursor=cursor, resources=resources) as context:
        data = evaluate(workflow_executions_sensor, context)
        if data.cursor is None:
            data = data._replace(cursor=context.cursor)
    return data


def complete(sql_exec, count=1, at="now()"):
    """Insert `count` completed executions with completed_at = `at`; their ids."""
    rows = sql_exec(
        "INSERT INTO workflow_executions (status, completed_at) "
        f"SELECT 'completed', {at} FROM generate_series(1, %s) RETURNING id::text",
        [count],
    )
    return sorted(r[0] for r in rows)


def test_first_tick_sets_cursor_at_latest_completion_and_requests_nothing(database_url, sql_exec):
    data = tick(None, database_url)
    assert not data.run_requests
    assert "first tick" in data.skip_message
    latest = sql_exec("SELECT max(completed_at) FROM workflow_executions")[0][0]
    assert ExecutionsCursor.from_json(data.cursor).watermark == latest

    again = tick(data.cursor, database_url)
    assert not again.run_requests and "no execution completed since" in again.skip_message
    assert again.cursor == data.cursor


def test_ties_are_each_reported_once_across_ticks(database_url, sql_exec):
    cursor = tick(None, database_url).cursor
    tied = complete(sql_exec, 5, at="now()")

    reported = []
    for _ in range(3):  # LIMIT 2: three ticks see 2 + 2 + 1
        data = tick(cursor, database_url, max_per_tick=2)
        assert len(data.run_requests) == 1
        request = data.run_requests[0]
        before = set(ExecutionsCursor.from_json(cursor).seen)
        seen = set(ExecutionsCursor.from_json(data.cursor).seen)
        reported += sorted(seen - before)
        assert int(request.tags["rdw/new_executions"]) == len(seen - before)
        config = request.run_config["ops"]["execution_id_population"]["config"]
        assert sorted(config["execution_ids"]) == sorted(seen - before)
        assert request.tags["rdw/watermark"] in request.run_key
        cursor = data.cursor
    assert sorted(reported) == tied
    final = tick(cursor, database_url)
    assert not final.run_requests and final.cursor == cursor


def test_late_commit_behind_the_watermark_is_reported_once(database_url, sql_exec):
    cursor = tick(None, database_url).cursor
    # A long transaction stamps completed_at = now() (its start) but has not committed...
    late = psycopg.connect(database_url)
    late_id = late.execute(
        "INSERT INTO workflow_executions (status, completed_at) "
        "VALUES ('completed', now()) RETURNING id::text"
    ).fetchone()[0]
    try:
        # ...while a later execution commits and a tick moves the watermark past it.
        [early] = complete(sql_exec, 1, at="clock_timestamp() + interval '1 second'")
        data = tick(cursor, database_url)
        assert data.run_requests[0].tags["rdw/new_executions"] == "1"
        cursor = data.cursor
        assert late_id not in ExecutionsCursor.from_json(cursor).seen
        late.commit()
    finally:
        late.close()
    late_completed = sql_exec(
        "SELECT completed_at FROM workflow_executions WHERE id = %s", [late_id]
    )[0][0]
    assert late_completed < ExecutionsCursor.from_json(cursor).watermark

    data = tick(cursor, database_url)
    assert data.run_requests and data.run_requests[0].tags["rdw/new_executions"] == "1"
    assert set(ExecutionsCursor.from_json(data.cursor).seen) >= {late_id, early}
    assert not tick(data.cursor, database_url).run_requests

    # Behind the look-back window is beyond what the sensor promises: documented limit.
    complete(sql_exec, 1, at="now() - interval '1 hour'")
    assert not tick(data.cursor, database_url).run_requests


def test_late_insert_with_past_completed_at_gets_its_own_run_key(database_url, sql_exec):
    cursor = tick(None, database_url).cursor
    complete(sql_exec, 1, at="now()")
    first = tick(cursor, database_url)
    complete(sql_exec, 1, at="now() - interval '2 minutes'")
    second = tick(first.cursor, database_url)
    assert second.run_requests, second.skip_message
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert (
        ExecutionsCursor.from_json(second.cursor).watermark
        == ExecutionsCursor.from_json(first.cursor).watermark
    )


def test_database_outage_fails_the_tick_and_keeps_the_cursor(database_url, sql_exec):
    cursor = tick(None, database_url).cursor
    ids = complete(sql_exec, 2)
    for _ in range(2):  # every tick during the outage fails the same quick way
        resources = {
            "target_db": TargetDatabase(url=UNREACHABLE),
            "executions_polling": ExecutionsPolling(),
        }
        with dg.build_sensor_context(cursor=cursor, resources=resources) as context:
            with pytest.raises(
                TargetDatabaseError, match="cannot connect to PostgreSQL at .*nowhere"
            ):
                evaluate(workflow_executions_sensor, context)
            assert context.cursor == cursor
    # back up: nothing was lost
    data = tick(cursor, database_url)
    assert data.run_requests[0].tags["rdw/new_executions"] == "2"
    assert set(ids) <= set(ExecutionsCursor.from_json(data.cursor).seen)


def test_missing_table_fails_the_tick_by_name(database_url, sql_exec):
    cursor = tick(None, database_url).cursor
    sql_exec("ALTER TABLE workflow_executions RENAME TO workflow_executions_old")
    with pytest.raises(TargetDatabaseError, match=r"public\.workflow_executions does not exist"):
        tick(cursor, database_url)


def test_tick_says_whether_the_completed_at_index_exists(database_url, sql_exec, run_job):
    cursor = tick(None, database_url).cursor
    missing = tick(cursor, database_url)
    assert "no index on public.workflow_executions(completed_at)" in missing.skip_message
    assert INDEX_NAME in missing.skip_message
    # built the way the index job builds it, opt-in
    opt_in = {"workflow_executions_completed_at": True}
    built = run_job(
        "create_execution_id_indexes", {"ops": {"execution_id_indexes": {"config": opt_in}}}
    )
    assert built.success
    complete(sql_exec, 1)
    present = tick(cursor, database_url)
    assert present.run_requests[0].tags["rdw/completed_at_index"] == "present"
    assert f"completed_at index: {INDEX_NAME}" in tick(present.cursor, database_url).skip_message


def test_missing_index_is_a_warning_once_then_in_each_ticks_status(database_url, sql_exec, capsys):
    """Issue 26.4: not a WARNING every 30 s; logged again when the index goes and comes back.
    (The sensor's log is Dagster's console logger, on stderr.)"""

    def warnings_of(cursor):
        capsys.readouterr()
        data = tick(cursor, database_url)
        return data, capsys.readouterr().err.count("WARNING - no index on")

    first, warned = warnings_of(None)
    assert warned == 1
    cursor = first.cursor
    for _ in range(2):
        data, warned = warnings_of(cursor)
        assert warned == 0
        assert "no index on public.workflow_executions(completed_at)" in data.skip_message
        cursor = data.cursor
    complete(sql_exec, 1)
    data, warned = warnings_of(cursor)
    assert warned == 0 and data.run_requests[0].tags["rdw/completed_at_index"] == "missing"
    cursor = data.cursor
    # the index built, then dropped again: a new cause, one new warning
    sql_exec(f"CREATE INDEX {INDEX_NAME} ON workflow_executions (completed_at)")
    data, warned = warnings_of(cursor)
    assert warned == 0 and "completed_at index" in data.skip_message
    cursor = data.cursor
    sql_exec(f"DROP INDEX {INDEX_NAME}")
    data, warned = warnings_of(cursor)
    assert warned == 1
    data, warned = warnings_of(data.cursor)
    assert warned == 0


def test_cursor_forgets_ids_behind_the_lookback_window():
    t0 = dt.datetime(2026, 1, 5, 12, tzinfo=dt.timezone.utc)
    old = ("a", t0)
    cursor = advance(ExecutionsCursor(), [old], dt.timedelta(minutes=10))
    cursor = advance(cursor, [("b", t0 + dt.timedelta(minutes=30))], dt.timedelta(minutes=10))
    assert set(cursor.seen) == {"b"} and cursor.watermark == t0 + dt.timedelta(minutes=30)
    assert ExecutionsCursor.from_json(cursor.to_json()) == cursor
    assert json.loads(cursor.to_json())["watermark"] == "2026-01-05T12:30:00+00:00"


# -- schedules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, job, when",
    [
        (daily_population_snapshot, "post_collection_validation", "2026-03-02T06:00:00+00:00"),
        (
            weekly_execution_tracking_verification,
            "verify_execution_tracking",
            "2026-03-02T07:00:00+00:00",
        ),
    ],
)
def test_schedule_ticks(schedule, job, when):
    assert schedule.execution_timezone == "UTC"
    assert schedule.job_name == job
    scheduled = dt.datetime.fromisoformat(when)
    data = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=scheduled))
    assert len(data.run_requests) == 1
    from dagster._utils.schedules import cron_string_iterator

    upcoming = cron_string_iterator(scheduled.timestamp(), schedule.cron_schedule, "UTC")
    times = [next(upcoming) for _ in range(3)]
    assert times[0] == scheduled
    gap = dt.timedelta(days=1 if schedule is daily_population_snapshot else 7)
    assert [times[1] - times[0], times[2] - times[1]] == [gap, gap]


def test_sensors_and_schedules_run_by_default_and_are_wired():
    for name in ("collection_run_sensor", "workflow_executions_sensor"):
        sensor = defs.resolve_sensor_def(name)
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
        assert sensor.job_name == "post_collection_validation"
        assert sensor.description
    for name in ("daily_population_snapshot", "weekly_execution_tracking_verification"):
        assert defs.resolve_schedule_def(name).default_status == dg.DefaultScheduleStatus.RUNNING


def test_a_cursor_it_did_not_write_fails_the_tick_with_the_way_out(database_url):
    with pytest.raises(ValueError, match="reset the cursor"):
        tick("not json", database_url)


def test_a_locked_table_fails_the_tick_quickly_by_name(database_url):
    cursor = tick(None, database_url).cursor
    db = TargetDatabase(url=database_url, lock_timeout_ms=300)
    resources = {"target_db": db, "executions_polling": ExecutionsPolling()}
    with dg.build_sensor_context(cursor=cursor, resources=resources) as context:
        with psycopg.connect(database_url) as locker:
            locker.execute("LOCK TABLE workflow_executions IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(
                TargetDatabaseError,
                match=r"could not read public\.workflow_executions.*lock timeout",
            ):
                evaluate(workflow_executions_sensor, context)
        assert context.cursor == cursor
