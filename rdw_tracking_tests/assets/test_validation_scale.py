"""Validation that scales: the per-day tally kept between runs, the per-run verdict, and
the daily-partitioned history with its reconcile; every figure against the table itself."""

import datetime as dt

import dagster as dg
import pytest

from rdw_tracking.assets import daily
from rdw_tracking.tally import DayTally
from rdw_tracking_tests.conftest import check_results, materialization_metadata

ASSET = "execution_id_population"
INDEX_ONLY_CREATED_AT = {
    "ops": {
        "execution_id_indexes": {"config": {"indexes": [], "report_data_weeks_created_at": True}}
    }
}
TABLE_DAYS = """
SELECT w.created_at::date, count(*), count(w.execution_id),
       count(*) FILTER (WHERE w.execution_id IS NOT NULL AND e.id IS NULL)
FROM report_data_weeks w LEFT JOIN workflow_executions e ON e.id = w.execution_id
GROUP BY 1
"""
# A row like the demo's, dated `%(at)s`, with the given execution_id.
INSERT_ROW = """
INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date, status,
                               execution_id, created_at)
SELECT collection_id, week_start_date, week_end_date, 'completed', %(execution_id)s, %(at)s
FROM report_data_weeks LIMIT 1
"""


def build_created_at_index(run_job) -> None:
    result = run_job("create_execution_id_indexes", run_config=INDEX_ONLY_CREATED_AT)
    assert result.success


def validate(run_job, instance, **config):
    result = run_job(
        "post_collection_validation",
        run_config={"ops": {ASSET: {"config": config}}} if config else None,
        instance=instance,
    )
    assert result.success
    return result, materialization_metadata(result, ASSET), check_results(result)


def table_days(sql_exec) -> dict:
    return {day: DayTally(r, s, o) for day, r, s, o in sql_exec(TABLE_DAYS)}


def assert_matches_table(sql_exec, meta, checks) -> None:
    days = table_days(sql_exec)
    assert meta["total_rows"] == sum(c.rows for c in days.values())
    assert meta["with_execution_id"] == sum(c.stamped for c in days.values())
    orphans = checks["execution_ids_exist"].metadata["orphan_count"].value
    assert orphans == sum(c.orphans for c in days.values())
    recent = sql_exec(
        "SELECT count(*), count(execution_id) FROM report_data_weeks "
        "WHERE created_at >= CURRENT_DATE - 7"
    )[0]
    assert (meta["recent_total_rows"], meta["recent_with_execution_id"]) == recent


def assert_history_holds(sql_exec, instance, days: list[dt.date]) -> None:
    stored = daily.stored_days(instance)
    table = table_days(sql_exec)
    for day in days:
        assert stored[day].counts == table.get(day, DayTally(0, 0, 0)), day


def test_tally_follows_inserts_updates_and_deletes(layout_url, run_job, sql_exec):
    """Under a budget, each change is either recounted or seen by the counters; the
    figures always equal the table's, on every layout."""
    build_created_at_index(run_job)
    budget = {"count_budget_hours": 24}
    today = sql_exec("SELECT CURRENT_DATE")[0][0]
    with dg.instance_for_test() as instance:
        _, meta, checks = validate(run_job, instance, **budget)
        assert meta["full_count"] and meta["count_reason"] == "no earlier tally"
        assert_matches_table(sql_exec, meta, checks)

        # A collection run's rows, today: only today is read again.
        execution = sql_exec("SELECT id FROM workflow_executions LIMIT 1")[0][0]
        for _ in range(3):
            sql_exec(
                INSERT_ROW, {"execution_id": execution, "at": dt.datetime.now(dt.timezone.utc)}
            )
        _, meta, checks = validate(run_job, instance, **budget)
        assert not meta["full_count"], meta["count_reason"]
        assert meta["counted"].startswith("days since")
        assert_matches_table(sql_exec, meta, checks)
        assert_history_holds(sql_exec, instance, [today])

        # A late row on a closed day: the inserts do not balance, the whole table is counted.
        late = today - dt.timedelta(days=20)
        sql_exec(INSERT_ROW, {"execution_id": None, "at": f"{late} 12:00+00"})
        _, meta, checks = validate(run_job, instance, **budget)
        assert meta["full_count"] and "dated before" in meta["count_reason"]
        assert_matches_table(sql_exec, meta, checks)
        assert_history_holds(sql_exec, instance, [late])

        # A rollback-like clear on a closed day: an update the counters see.
        cleared = today - dt.timedelta(days=10)
        sql_exec(
            "UPDATE report_data_weeks SET execution_id = NULL WHERE created_at::date = %s",
            [cleared],
        )
        _, meta, checks = validate(run_job, instance, **budget)
        assert meta["full_count"] and "updated" in meta["count_reason"]
        assert_matches_table(sql_exec, meta, checks)
        assert_history_holds(sql_exec, instance, [cleared])

        # An execution deleted: its rows become orphans (orphans are always counted).
        stamped = sql_exec(
            "SELECT execution_id FROM report_data_weeks WHERE execution_id IS NOT NULL "
            "AND created_at < CURRENT_DATE - 3 LIMIT 1"
        )[0][0]
        sql_exec("DELETE FROM workflow_executions WHERE id = %s", [stamped])
        _, meta, checks = validate(run_job, instance, **budget)
        assert_matches_table(sql_exec, meta, checks)

        # That execution inserted again (late): its rows stop being orphans, older days
        # are still taken from the tally.
        sql_exec(
            "INSERT INTO workflow_executions (id, status, created_at, completed_at) "
            "VALUES (%s, 'completed', now() - interval '30 days', now() - interval '30 days')",
            [stamped],
        )
        _, meta, checks = validate(run_job, instance, **budget)
        assert not meta["full_count"], meta["count_reason"]
        assert_matches_table(sql_exec, meta, checks)


def test_run_that_left_rows_unstamped_fails_and_names_them(database_url, run_job, sql_exec):
    build_created_at_index(run_job)
    with dg.instance_for_test() as instance:
        collection = run_job("weekly_collection", instance=instance)
        assert collection.success
        execution = str(
            collection.asset_materializations_for_node("collect_weeks")[0]
            .metadata["execution_id"]
            .value
        )
        _, _, checks = validate(run_job, instance, execution_ids=[execution])
        verdict = checks["execution_id_run_stamped"]
        assert verdict.passed, verdict.description
        assert verdict.metadata["executions"].value == 1
        stamped = sql_exec(
            "SELECT count(*) FROM report_data_weeks WHERE execution_id = %s", [execution]
        )[0][0]
        assert verdict.metadata["stamped_rows"].value == stamped > 0

        # A collection path that forgot to stamp: rows written while the execution ran.
        span = sql_exec(
            "SELECT created_at + (completed_at - created_at) / 2 FROM workflow_executions "
            "WHERE id = %s",
            [execution],
        )[0][0]
        for _ in range(2):
            sql_exec(INSERT_ROW, {"execution_id": None, "at": span})
        leaked = {
            r[0]
            for r in sql_exec(
                "SELECT id::text FROM report_data_weeks WHERE created_at = %s", [span]
            )
        }
        result, _, checks = validate(run_job, instance, execution_ids=[execution])
        verdict = checks["execution_id_run_stamped"]
        assert not verdict.passed and verdict.severity == dg.AssetCheckSeverity.ERROR
        assert verdict.metadata["unstamped_rows"].value == 2
        assert execution in verdict.description
        sample = {r.data["id"] for r in verdict.metadata["unstamped_sample"].value.records}
        assert sample == leaked
        per_execution = verdict.metadata["per_execution"].value.records
        assert per_execution[0].data["unstamped_rows"] == 2

        # An id with no workflow_executions row fails by name.
        ghost = "00000000-0000-0000-0000-00000000beef"
        _, _, checks = validate(run_job, instance, execution_ids=[ghost])
        assert not checks["execution_id_run_stamped"].passed
        assert ghost in checks["execution_id_run_stamped"].description


def test_verdict_without_the_index_says_so(database_url, run_job, sql_exec):
    execution = sql_exec("SELECT id::text FROM workflow_executions LIMIT 1")[0][0]
    with dg.instance_for_test() as instance:
        _, meta, checks = validate(run_job, instance, execution_ids=[execution])
    verdict = checks["execution_id_run_stamped"]
    assert meta["created_at_index"] == "missing"
    assert verdict.metadata["created_at_index"].value == "missing"
    assert "idx_report_data_weeks_created_at" in verdict.description


def test_collection_run_tag_is_judged(database_url, run_job, sql_exec):
    execution = sql_exec("SELECT id::text FROM workflow_executions LIMIT 1")[0][0]
    with dg.instance_for_test() as instance:
        result = run_job(
            "post_collection_validation", instance=instance, tags={"rdw/execution_id": execution}
        )
    table = check_results(result)["execution_id_run_stamped"].metadata["per_execution"].value
    assert [r.data["execution_id"] for r in table.records] == [execution]


@pytest.mark.parametrize("value", ["not-a-uuid", "12345"])
def test_bad_execution_id_is_refused_naming_the_field(database_url, run_job, value):
    from rdw_tracking_tests.conftest import launch_refusal

    message = launch_refusal(
        run_job,
        "post_collection_validation",
        {"ops": {ASSET: {"config": {"execution_ids": [value]}}}},
    )
    assert "execution_ids" in message and value in message


def backfill(run_job, instance, first: dt.date, last: dt.date):
    """The history from `first` to `last` as one run (a single-run backfill)."""
    from rdw_tracking.definitions import defs

    job = defs.resolve_implicit_global_asset_job_def()
    return job.get_subset(asset_selection={dg.AssetKey(daily.ASSET)}).execute_in_process(
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": first.isoformat(),
            "dagster/asset_partition_range_end": last.isoformat(),
        },
        raise_on_error=False,
    )


def test_backfill_is_one_run_and_every_day_matches(database_url, run_job, sql_exec):
    today = sql_exec("SELECT CURRENT_DATE")[0][0]
    first = today - dt.timedelta(days=40)
    with dg.instance_for_test() as instance:
        result = backfill(run_job, instance, first, today)
        assert result.success
        days = [first + dt.timedelta(days=k) for k in range(41)]
        assert_history_holds(sql_exec, instance, days)
        assert len(instance.get_runs()) == 1
        pct = daily.stored_days(instance)[today - dt.timedelta(days=1)]
        assert pct.counts.rows > 0


@pytest.mark.parametrize("indexed", [False, True], ids=["one-pass", "tally"])
def test_late_row_on_a_closed_day_shows_after_the_daily_run(
    database_url, run_job, sql_exec, indexed
):
    if indexed:
        build_created_at_index(run_job)
    today = sql_exec("SELECT CURRENT_DATE")[0][0]
    with dg.instance_for_test() as instance:
        assert backfill(run_job, instance, today - dt.timedelta(days=10), today).success
        closed = today - dt.timedelta(days=2)
        before = daily.stored_days(instance)[closed].counts
        sql_exec(INSERT_ROW, {"execution_id": None, "at": f"{closed} 08:00+00"})
        validate(run_job, instance, refresh_days=3)  # what daily_population_snapshot runs
        after = daily.stored_days(instance)[closed].counts
    assert after.rows == before.rows + 1 and after.stamped == before.stamped


def reconcile_only(instance):
    from rdw_tracking.definitions import defs

    key = dg.AssetCheckKey(dg.AssetKey(daily.ASSET), daily.RECONCILE_CHECK)
    job = defs.resolve_implicit_global_asset_job_def()
    return job.get_subset(asset_selection=set(), asset_check_selection={key}).execute_in_process(
        instance=instance, raise_on_error=False
    )


@pytest.mark.parametrize("indexed", [False, True], ids=["one-pass", "tally"])
def test_reconcile_names_the_days_that_drifted(database_url, run_job, sql_exec, indexed):
    if indexed:
        build_created_at_index(run_job)
    today = sql_exec("SELECT CURRENT_DATE")[0][0]
    first = dt.date.fromisoformat(daily.history_start())
    with dg.instance_for_test() as instance:
        assert backfill(
            run_job, instance, max(first, today - dt.timedelta(days=400)), today
        ).success
        result = run_job("verify_execution_tracking", instance=instance)
        reconcile = check_results(result)[daily.RECONCILE_CHECK]
        assert reconcile.passed, reconcile.description

        drifted = today - dt.timedelta(days=5)
        sql_exec(
            "UPDATE report_data_weeks SET execution_id = NULL "
            "WHERE id = (SELECT id FROM report_data_weeks WHERE created_at::date = %s "
            "AND execution_id IS NOT NULL LIMIT 1)",
            [drifted],
        )
        # The check alone: within verify_execution_tracking, the population step may
        # publish the changed day first and so heal the history before it is compared.
        reconcile = check_results(reconcile_only(instance))[daily.RECONCILE_CHECK]
    assert not reconcile.passed and reconcile.severity == dg.AssetCheckSeverity.WARN
    assert reconcile.metadata["drifted_days"].value == [drifted.isoformat()]
    assert drifted.isoformat() in reconcile.description


def test_created_at_index_is_built_and_judged_on_every_layout(layout_url, run_job, sql_exec):
    every = {"ops": {"execution_id_indexes": {"config": {"report_data_weeks_created_at": True}}}}
    assert run_job("create_execution_id_indexes", run_config=every).success
    result = run_job("verify_execution_tracking")
    check = check_results(result)["execution_id_indexes_valid"]
    assert check.passed, check.description
    assert "idx_report_data_weeks_created_at" in check.description
    leaves = sql_exec(
        "SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relname LIKE 'report_data_weeks%%'"
    )[0][0]
    built = sql_exec(
        "SELECT count(*) FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid "
        "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0] "
        "WHERE t.relkind = 'r' AND t.relname LIKE 'report_data_weeks%%' "
        "AND a.attname = 'created_at' AND i.indisvalid"
    )[0][0]
    assert built == leaves


@pytest.mark.parametrize("indexed", [False, True], ids=["one-pass", "tally"])
def test_rollback_on_closed_days_shows_in_the_history(database_url, run_job, sql_exec, indexed):
    """A rollback's days reach the history through rollback_history_sensor's run, even
    days older than the daily schedule's refresh window."""
    from rdw_tracking.sensors import rollback_history_sensor
    from rdw_tracking_tests.test_sensors import drain

    if indexed:
        build_created_at_index(run_job)
    today = sql_exec("SELECT CURRENT_DATE")[0][0]
    cutoff = today - dt.timedelta(days=12)
    with dg.instance_for_test() as instance:
        assert backfill(run_job, instance, today - dt.timedelta(days=20), today).success
        _, cursor = drain(rollback_history_sensor, instance, None)
        config = {"cutoff_date": cutoff.isoformat(), "dry_run": False}
        rollback = run_job(
            "rollback_execution_id",
            run_config={"ops": {"execution_id_rollback": {"config": config}}},
            instance=instance,
        )
        assert rollback.success
        requests, _ = drain(rollback_history_sensor, instance, cursor)
        assert len(requests) == 1
        assert requests[0].run_config["ops"][ASSET]["config"]["refresh_days"] == 12
        validation = run_job(
            "post_collection_validation", run_config=requests[0].run_config, instance=instance
        )
        assert validation.success
        days = [cutoff + dt.timedelta(days=k) for k in range(13)]
        assert_history_holds(sql_exec, instance, days)
        assert all(daily.stored_days(instance)[d].counts.stamped == 0 for d in days[1:-1])
