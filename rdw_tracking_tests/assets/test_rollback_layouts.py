"""The rollback and the restore jobs on every layout: exact, per partition, and safe
while partitions come and go."""

import datetime as dt
import logging

import dagster as dg
import psycopg
import pytest

from rdw_tracking.assets.rollback import RollbackConfig, rollback
from rdw_tracking.demo_layouts import relayout
from rdw_tracking.layout import table_layout
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.rollback import walk as rollback_module
from rdw_tracking_tests.assets.test_rollback import days_ago, restore_config, rollback_config
from rdw_tracking_tests.conftest import materialization_metadata, step_failure_messages

LOG = logging.getLogger("rdw_tracking_tests.layouts")
ROWS = "SELECT tableoid::regclass::text, id, execution_id, updated_at FROM report_data_weeks"


def test_jobs_clear_exactly_the_dry_runs_rows_and_restore_them(
    layout, layout_url, sql_exec, run_job
):
    original = sorted(sql_exec(ROWS))
    dry = run_job("rollback_execution_id", rollback_config(cutoff_date=days_ago(40)))
    assert dry.success, step_failure_messages(dry)
    matched = materialization_metadata(dry, "execution_id_rollback")["matched_rows"]
    assert matched > 0
    real = run_job(
        "rollback_execution_id",
        rollback_config(
            cutoff_date=days_ago(40), dry_run=False, expected_rows=matched, batch_size=100
        ),
    )
    assert real.success, step_failure_messages(real)
    meta = materialization_metadata(real, "execution_id_rollback")
    assert meta["cleared_rows"] == matched
    assert sql_exec("SELECT count(*) FROM execution_id_rollback_backup")[0][0] == matched
    # only the matched rows changed
    changed = {r[:2] for r in set(original) - set(sql_exec(ROWS))}
    assert len(changed) == matched
    restored = run_job("restore_execution_id", restore_config(dry_run=False))
    assert restored.success, step_failure_messages(restored)
    assert sorted(sql_exec(ROWS)) == original


def scans(sql_exec) -> dict:
    sql_exec("SELECT pg_stat_clear_snapshot()")
    return {
        name: seq + idx
        for name, seq, idx in sql_exec(
            "SELECT relname, seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables "
            "WHERE relname LIKE 'report_data_weeks_p%%'"
        )
    }


def test_partitions_before_the_cutoff_are_never_read(database_url, sql_exec):
    relayout(database_url, "range")
    cutoff = dt.date.fromisoformat(days_ago(20))
    before = scans(sql_exec)
    report = rollback(
        TargetDatabase(url=database_url),
        RollbackConfig(cutoff_date=cutoff.isoformat(), dry_run=False),
        LOG,
    )
    assert report.cleared_rows == report.matched_rows > 0
    # the rollback's session flushes its statistics when it ends
    old = {
        f"report_data_weeks_p{m:%Y%m}"
        for m in (cutoff.replace(day=1) - dt.timedelta(days=31 * k) for k in range(1, 11))
    } & set(before)
    assert old, "the table has no partition wholly before the cutoff"
    after = scans(sql_exec)
    for _ in range(20):
        if after != before:
            break
        after = scans(sql_exec)
    assert after != before, "no statistics arrived"
    assert {name: after[name] for name in old} == {name: before[name] for name in old}


@pytest.mark.parametrize("how", ["detach", "no inherit"])
def test_a_partition_leaving_mid_run_is_left_alone(database_url, sql_exec, monkeypatch, how):
    relayout(database_url, "hash" if how == "detach" else "inheritance")
    with psycopg.connect(database_url) as conn:
        found = table_layout(conn, "public", "report_data_weeks")
    leaving = found.leaves[-1]
    original = sorted(sql_exec(f'SELECT id, execution_id, updated_at FROM ONLY "{leaving.name}"'))
    real_wait = rollback_module.wait_for_wal_room
    batches = {"n": 0}

    def leave_at_second_batch(conn, most):
        batches["n"] += 1
        if batches["n"] == 2:
            ddl = (
                f'ALTER TABLE report_data_weeks DETACH PARTITION "{leaving.name}"'
                if how == "detach"
                else f'ALTER TABLE "{leaving.name}" NO INHERIT report_data_weeks'
            )
            sql_exec(ddl)
        return real_wait(conn, most)

    monkeypatch.setattr(rollback_module, "wait_for_wal_room", leave_at_second_batch)
    report = rollback(
        TargetDatabase(url=database_url),
        RollbackConfig(cutoff_date=days_ago(40), dry_run=False, batch_size=100),
        LOG,
    )
    assert batches["n"] >= 2
    assert leaving.label in report.leaves_left_alone
    # the rows that left with it are as they were, but for those a batch cleared (and
    # backed up) before it left; every row still in the table is cleared
    cleared_there = {
        r[0]
        for r in sql_exec(
            "SELECT id FROM execution_id_rollback_backup WHERE relid = %s", [leaving.oid]
        )
    }
    now = sorted(sql_exec(f'SELECT id, execution_id, updated_at FROM "{leaving.name}"'))
    assert [r for r in now if r[0] not in cleared_there] == [
        r for r in original if r[0] not in cleared_there
    ]
    assert all(r[1] is None for r in now if r[0] in cleared_there)
    assert len(now) == len(original)
    assert not sql_exec(
        "SELECT 1 FROM report_data_weeks WHERE execution_id IS NOT NULL "
        "AND created_at >= %s::date AND updated_at < %s",
        [days_ago(40), report.upper_bound],
    )


def test_a_partition_attached_mid_run_ends_it_failed_and_a_rerun_finishes(
    database_url, sql_exec, monkeypatch
):
    relayout(database_url, "list")
    # A table of rows that look matched, attached as a partition while the run is going.
    sql_exec("CREATE TABLE late_rows (LIKE report_data_weeks INCLUDING DEFAULTS)")
    sql_exec(
        "INSERT INTO late_rows (id, collection_id, week_start_date, week_end_date, status, "
        "execution_id, created_at, updated_at) SELECT gen_random_uuid(), collection_id, "
        "week_start_date, week_end_date, 'archived', execution_id, created_at, updated_at "
        "FROM report_data_weeks WHERE execution_id IS NOT NULL LIMIT 300"
    )
    late = sorted(sql_exec("SELECT id, execution_id, updated_at FROM late_rows"))
    real_wait = rollback_module.wait_for_wal_room
    batches = {"n": 0}

    def attach_at_second_batch(conn, most):
        batches["n"] += 1
        if batches["n"] == 2:
            sql_exec(
                "ALTER TABLE report_data_weeks ATTACH PARTITION late_rows FOR VALUES IN ('archived')"
            )
        return real_wait(conn, most)

    monkeypatch.setattr(rollback_module, "wait_for_wal_room", attach_at_second_batch)
    config = RollbackConfig(cutoff_date=days_ago(300), dry_run=False, batch_size=100)
    with pytest.raises(dg.Failure) as failure:
        rollback(TargetDatabase(url=database_url), config, LOG)
    assert batches["n"] >= 2
    # the run says what it left, and where; it left those rows as they were
    assert "public.late_rows (300)" in failure.value.description
    assert failure.value.metadata["rows_left"].value == 300
    assert sorted(sql_exec("SELECT id, execution_id, updated_at FROM late_rows")) == late
    assert sql_exec("SELECT phase FROM execution_id_rollback_runs") == [("sweeping",)]
    # the rerun continues the same rollback, now with the partition, and finishes it
    again = rollback(TargetDatabase(url=database_url), config, LOG)
    assert again.resumed and again.rows_left == 0
    assert not sql_exec("SELECT 1 FROM late_rows WHERE execution_id IS NOT NULL")
    assert sql_exec(
        "SELECT count(*) FROM execution_id_rollback_backup b JOIN late_rows l USING (id)"
    ) == [(300,)]
    assert sql_exec("SELECT phase FROM execution_id_rollback_runs") == [("finished",)]


def test_a_lost_write_lock_stops_the_rollback_before_its_next_batch(
    database_url, sql_exec, monkeypatch, run_job
):
    relayout(database_url, "range")
    real_wait = rollback_module.wait_for_wal_room
    batches = {"n": 0}

    def lose_the_lock_at_second_batch(conn, most):
        batches["n"] += 1
        if batches["n"] == 2:
            sql_exec(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'rdw_tracking:rollback_execution_id' "
                "AND datname = current_database()"
            )
        return real_wait(conn, most)

    monkeypatch.setattr(rollback_module, "wait_for_wal_room", lose_the_lock_at_second_batch)
    result = run_job(
        "rollback_execution_id",
        rollback_config(cutoff_date=days_ago(60), dry_run=False, batch_size=100),
    )
    assert not result.success
    assert any("write lock" in m and "was lost" in m for m in step_failure_messages(result))
    # one batch went through before the loss, none after it
    assert sql_exec("SELECT batches FROM execution_id_rollback_runs") == [(1,)]
