"""Safe FK addition: refused while orphans exist, NOT VALID then VALIDATE, idempotent."""

import time

import psycopg
import pytest

from rdw_tracking.assets.foreign_key import ForeignKeyConfig, orphans
from rdw_tracking.contract import FK_NAME
from rdw_tracking.indexes.specs import EXECUTION_ID_INDEX
from rdw_tracking.jobs import DB_WRITES_TAG
from rdw_tracking.writes import exclusive_write
from rdw_tracking_tests.conftest import check_results, step_failure_messages

JOB = "add_execution_id_foreign_key"
DELETE_ORPHANS = (
    "DELETE FROM report_data_weeks w WHERE execution_id IS NOT NULL AND NOT EXISTS "
    "(SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id)"
)


def fk_config(**config) -> dict:
    return {"ops": {"add_foreign_key": {"config": config}}}


def constraint(sql_exec) -> tuple | None:
    """(name, validated, ON DELETE code) of the FK on execution_id, if any."""
    rows = sql_exec(
        "SELECT conname, convalidated, confdeltype FROM pg_constraint "
        "WHERE conrelid = 'public.report_data_weeks'::regclass AND contype = 'f' "
        "AND conname <> 'fk_collection_id'"
    )
    return rows[0] if rows else None


def index_exists(sql_exec) -> bool:
    return bool(sql_exec("SELECT 1 FROM pg_class WHERE relname = %s", [EXECUTION_ID_INDEX]))


def output_metadata(result) -> dict:
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = event.event_specific_data.metadata
    return {key: getattr(value, "value", value) for key, value in metadata.items()}


def test_refused_while_orphans_exist(db, run_job, sql_exec):
    # Orphans of our own, whatever the template holds: ids no execution ever had.
    sql_exec(
        "UPDATE report_data_weeks SET execution_id = gen_random_uuid() "
        "WHERE id IN (SELECT id FROM report_data_weeks ORDER BY id LIMIT 12)"
    )
    count, sample = orphans(db)
    assert count >= 12 and len(sample) == 10
    result = run_job(JOB)
    assert not result.success
    (message,) = step_failure_messages(result)
    assert f"public.report_data_weeks.execution_id has {count} orphaned value(s)" in message
    assert sample[0] in message
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    metadata = failure.event_specific_data.user_failure_data.metadata
    assert metadata["orphan_count"].value == count
    assert metadata["orphan_sample"].value == sample
    assert constraint(sql_exec) is None and not index_exists(sql_exec)


def test_adds_validated_fk_after_orphans_are_gone(db, run_job, sql_exec):
    from rdw_tracking.definitions import defs

    assert defs.resolve_job_def(JOB).tags[DB_WRITES_TAG] == "true"
    sql_exec(DELETE_ORPHANS)
    result = run_job(JOB)
    assert result.success, step_failure_messages(result)
    meta = output_metadata(result)
    assert meta["action"] == "added" and meta["index_action"] == "created"
    assert meta["on_delete"] == "NO ACTION" and meta["constraint"] == FK_NAME
    assert constraint(sql_exec) == (FK_NAME, True, "a")  # a = NO ACTION
    assert index_exists(sql_exec)
    verify = run_job("verify_execution_tracking")
    assert check_results(verify)["execution_id_foreign_key"].passed

    again = run_job(JOB)
    assert again.success and output_metadata(again)["action"] == "unchanged"
    # The constraint enforces new writes.
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        sql_exec(
            "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date, "
            "execution_id) SELECT collection_id, week_start_date, week_end_date, "
            "gen_random_uuid() FROM report_data_weeks LIMIT 1"
        )


def test_on_delete_is_configurable(db, run_job, sql_exec):
    sql_exec(DELETE_ORPHANS)
    result = run_job(JOB, fk_config(on_delete="set null"))
    assert result.success, step_failure_messages(result)
    assert constraint(sql_exec) == (FK_NAME, True, "n")
    # Asking for another ON DELETE than the one in place changes nothing.
    result = run_job(JOB, fk_config(on_delete="CASCADE"))
    assert not result.success
    (message,) = step_failure_messages(result)
    assert "exists with ON DELETE SET NULL, config asks for CASCADE" in message
    assert constraint(sql_exec) == (FK_NAME, True, "n")
    with pytest.raises(ValueError, match="on_delete must be one of"):
        ForeignKeyConfig(on_delete="DROP TABLE")


def test_validates_a_not_valid_fk(db, database_url, run_job, sql_exec):
    sql_exec(
        "ALTER TABLE report_data_weeks ADD CONSTRAINT fk_exec FOREIGN KEY (execution_id) "
        "REFERENCES workflow_executions(id) NOT VALID"
    )
    sql_exec(DELETE_ORPHANS)
    sql_exec(
        f"CREATE INDEX {EXECUTION_ID_INDEX} ON report_data_weeks (execution_id) "
        "WHERE execution_id IS NOT NULL"
    )
    # VALIDATE's lock lets writers keep going, so a writer idle in its transaction is fine.
    with psycopg.connect(database_url, application_name="idle_writer") as writer:
        writer.execute(
            "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date) "
            "SELECT collection_id, week_start_date, week_end_date FROM report_data_weeks LIMIT 1"
        )
        result = run_job(JOB)
        writer.commit()
    assert result.success, step_failure_messages(result)
    meta = output_metadata(result)
    assert meta["action"] == "validated" and meta["index_action"] == "unchanged"
    assert constraint(sql_exec) == ("fk_exec", True, "a")


def test_gives_up_on_a_held_lock_changing_nothing(db, database_url, run_job, sql_exec):
    sql_exec(DELETE_ORPHANS)
    sql_exec(
        f"CREATE INDEX {EXECUTION_ID_INDEX} ON report_data_weeks (execution_id) WHERE execution_id IS NOT NULL"
    )
    with psycopg.connect(database_url, application_name="stuck_collector") as blocker:
        blocker.execute("UPDATE workflow_executions SET status = status WHERE false")
        blocker.execute("LOCK TABLE workflow_executions IN ROW EXCLUSIVE MODE")
        started = time.monotonic()
        result = run_job(
            JOB,
            {
                **fk_config(lock_retries=1, retry_backoff_s=0.1),
                "resources": {"target_db": {"config": {"lock_timeout_ms": 300}}},
            },
        )
        assert time.monotonic() - started < 10
        assert not result.success
        (message,) = step_failure_messages(result)
        assert f"pid {blocker.info.backend_pid} (application 'stuck_collector'" in message
        assert "nothing was changed" in message
        blocker.rollback()
    assert constraint(sql_exec) is None


def test_second_write_job_is_refused(db, run_job, sql_exec):
    sql_exec(DELETE_ORPHANS)
    with exclusive_write(db, "create_execution_id_indexes"):
        result = run_job(JOB)
    assert not result.success
    (message,) = step_failure_messages(result)
    assert f"{JOB} refused" in message and "rdw_tracking:create_execution_id_indexes" in message
    assert constraint(sql_exec) is None
