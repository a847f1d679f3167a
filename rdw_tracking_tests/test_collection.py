"""The fix: a tracked execution stamps every row it writes, and says how it ended."""

import pytest

from rdw_tracking.collection import first_collections, tracked_execution, write_collection_weeks
from rdw_tracking.resources import TargetDatabaseError

from .conftest import step_failure_messages


def execution_row(sql_exec, execution_id):
    return sql_exec(
        "SELECT status, completed_at, workflow_name FROM workflow_executions WHERE id = %s",
        [execution_id],
    )[0]


def test_tracked_execution_stamps_every_row_and_completes(db, sql_exec):
    ids = first_collections(db, 10)
    with tracked_execution(db, "weekly_collection") as execution:
        status, completed_at, name = execution_row(sql_exec, execution.id)
        assert (status, completed_at, name) == ("running", None, "weekly_collection")
        assert write_collection_weeks(db, execution.id, ids) == 10

    status, completed_at, _ = execution_row(sql_exec, execution.id)
    assert status == "completed" and completed_at is not None
    rows = sql_exec(
        "SELECT collection_id, execution_id, week_start_date = date_trunc('week', CURRENT_DATE)::date "
        "FROM report_data_weeks WHERE created_at >= %s",
        [execution.created_at],
    )
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert all(r[1] == execution.id and r[2] for r in rows), rows


def test_failed_block_marks_execution_failed_and_reraises(db, sql_exec):
    with pytest.raises(RuntimeError, match="upstream API down"):
        with tracked_execution(db, "weekly_collection") as execution:
            write_collection_weeks(db, execution.id, first_collections(db, 3))
            raise RuntimeError("upstream API down")
    status, completed_at, _ = execution_row(sql_exec, execution.id)
    assert status == "failed" and completed_at is not None
    # rows written before the failure keep their stamp: the failed execution is traceable
    stamped = sql_exec(
        "SELECT count(*) FROM report_data_weeks WHERE execution_id = %s", [execution.id]
    )
    assert stamped == [(3,)]


def test_unknown_collection_ids_are_refused_by_name(db, sql_exec):
    missing = "00000000-0000-0000-0000-000000000001"
    with tracked_execution(db) as execution:
        with pytest.raises(TargetDatabaseError, match=missing):
            write_collection_weeks(db, execution.id, [*first_collections(db, 1), missing])
    assert sql_exec(
        "SELECT count(*) FROM report_data_weeks WHERE execution_id = %s", [execution.id]
    ) == [(0,)]


def test_spec_minimal_executions_table_without_workflow_name(db, sql_exec):
    sql_exec("ALTER TABLE workflow_executions DROP COLUMN workflow_name")
    with tracked_execution(db, "weekly_collection") as execution:
        write_collection_weeks(db, execution.id, first_collections(db, 2))
    assert sql_exec("SELECT status FROM workflow_executions WHERE id = %s", [execution.id]) == [
        ("completed",)
    ]


def test_weekly_collection_job_stamps_the_current_week(database_url, sql_exec, run_job):
    result = run_job(
        "weekly_collection", {"ops": {"collect_weeks": {"config": {"collections": 20}}}}
    )
    assert result.success, step_failure_messages(result)
    output = next(
        e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"
    ).event_specific_data.metadata
    execution_id = output["execution_id"].value
    assert output["rows_written"].value == 20
    assert sql_exec(
        "SELECT e.status, count(w.id) FROM workflow_executions e "
        "JOIN report_data_weeks w ON w.execution_id = e.id WHERE e.id = %s GROUP BY e.status",
        [execution_id],
    ) == [("completed", 20)]


def test_weekly_collection_fails_with_a_clear_message_when_the_table_is_missing(
    database_url, sql_exec, run_job
):
    sql_exec("ALTER TABLE workflow_executions RENAME TO workflow_executions_old")
    result = run_job("weekly_collection")
    assert not result.success
    assert any(
        "public.workflow_executions does not exist" in m for m in step_failure_messages(result)
    )


def test_weekly_collection_stamps_rows_on_every_layout(layout, layout_url, sql_exec, run_job):
    result = run_job(
        "weekly_collection", {"ops": {"collect_weeks": {"config": {"collections": 10}}}}
    )
    assert result.success, step_failure_messages(result)
    assert sql_exec(
        "SELECT count(*) FROM report_data_weeks w JOIN workflow_executions e "
        "ON e.id = w.execution_id WHERE e.status = 'completed' AND w.created_at >= now() - "
        "interval '1 minute'"
    ) == [(10,)]
