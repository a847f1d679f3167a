"""Least privilege: what each job needs, and a clear refusal, before any change, without it.

Every role here is a fresh LOGIN role (conftest.role_url) on the test's database, where
the tables belong to the superuser the suite connects as. docs/grants.md's "Grants each job
needs" lists the same statements these tests grant.
"""

import datetime as dt

import dagster as dg
import psycopg
import pytest

from rdw_tracking.resources import TargetDatabase
from rdw_tracking.rollback.backup import (
    DEFAULT_BACKUP_TABLE,
    DEFAULT_STATE_TABLE,
    BackupTables,
    create_tables,
)
from rdw_tracking.sensors import (
    ExecutionsPolling,
    collection_run_sensor,
    workflow_executions_sensor,
)
from rdw_tracking.walkthrough import evaluate
from rdw_tracking_tests.assets.test_population import failure_text
from rdw_tracking_tests.conftest import (
    SELECT_ONLY_GRANTS,
    check_results,
    database_checksums,
    materialization_metadata,
    step_failure_messages,
)
from rdw_tracking_tests.test_sensors import drain

PLAN, STORAGE = "execution_id_join_plan", "execution_id_storage"
CUTOFF = (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=30)).isoformat()
OWN_WEEKS = "ALTER TABLE report_data_weeks OWNER TO {role}"
CREATE_IN_PUBLIC = "GRANT CREATE ON SCHEMA public TO {role}"
# docs/grants.md's grants for the rollback and the restore, on existing backup tables.
ROLLBACK_GRANTS = (
    *SELECT_ONLY_GRANTS,
    "GRANT UPDATE (execution_id, updated_at) ON report_data_weeks TO {role}",
    f"GRANT SELECT, INSERT ON {DEFAULT_BACKUP_TABLE} TO {{role}}",
    f"GRANT SELECT, INSERT, UPDATE ON {DEFAULT_STATE_TABLE} TO {{role}}",
)


def use(url: str, monkeypatch) -> str:
    monkeypatch.setenv("RDW_DATABASE_URL", url)
    return url


def refusal(run_job, job: str, run_config: dict | None = None) -> str:
    """Run `job`; it must fail, once, without a retry. Its failure message."""
    result = run_job(job, run_config)
    assert not result.success
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    return "\n".join(step_failure_messages(result))


def rollback_config(**config) -> dict:
    return {"ops": {"execution_id_rollback": {"config": {"cutoff_date": CUTOFF, **config}}}}


# -- read-only: jobs and sensors under SELECT alone ---------------------------------------


def test_read_only_jobs_under_a_select_only_role(select_only_url, run_job, sql_exec):
    with (
        psycopg.connect(select_only_url) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("UPDATE report_data_weeks SET execution_id = NULL")
    with (
        psycopg.connect(select_only_url) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("CREATE INDEX ON report_data_weeks (collection_id)")
    verify = run_job("verify_execution_tracking")
    assert verify.success, failure_text(verify)
    assert {
        "execution_id_schema",
        "execution_id_population",
        PLAN,
        STORAGE,
    } <= {e.asset_key.to_user_string() for e in verify.get_asset_materialization_events()}
    checks = check_results(verify)
    assert {
        "execution_id_column_contract",
        "execution_id_recent_population_rate",
        "execution_ids_exist",
        "execution_id_population_trend",
        "execution_id_join_uses_index",
        "execution_id_indexes_valid",
    } <= set(checks)
    # The template's few orphans are found under SELECT alone, like everything else.
    orphans = sql_exec(
        "SELECT count(*) FROM report_data_weeks w WHERE execution_id IS NOT NULL AND NOT EXISTS"
        " (SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id)"
    )[0][0]
    assert checks["execution_ids_exist"].metadata["orphan_count"].value == orphans > 0
    assert checks["execution_id_recent_population_rate"].passed
    meta = materialization_metadata(verify, STORAGE)
    assert meta["total_bytes"] > 0 and meta["execution_id_bytes"] == 16 * 400
    post = run_job("post_collection_validation")
    assert post.success, failure_text(post)
    assert materialization_metadata(post, "execution_id_population")["total_rows"] == 2600


def test_both_sensors_under_a_select_only_role(database_url, select_only_url, run_job, sql_exec):
    reader = TargetDatabase(url=select_only_url)
    # workflow_executions_sensor polls with SELECT alone.
    resources = {"target_db": reader, "executions_polling": ExecutionsPolling()}
    with dg.build_sensor_context(resources=resources) as context:
        first = evaluate(workflow_executions_sensor, context)
    assert not first.run_requests and first.cursor
    sql_exec(
        "INSERT INTO workflow_executions (status, completed_at) VALUES ('completed', now())",
        url=database_url,
    )
    with dg.build_sensor_context(cursor=first.cursor, resources=resources) as context:
        second = evaluate(workflow_executions_sensor, context)
    assert len(second.run_requests) == 1
    # collection_run_sensor reads only Dagster's runs; the validation it requests then
    # runs as the reader. (The collection itself writes, so it runs as the owner.)
    with dg.instance_for_test() as instance:
        _, cursor = drain(collection_run_sensor, instance, None)
        owner = TargetDatabase(url=database_url)
        collection = run_job("weekly_collection", instance=instance, resources={"target_db": owner})
        assert collection.success, failure_text(collection)
        requests, _ = drain(collection_run_sensor, instance, cursor)
        assert [r.run_key for r in requests] == [collection.run_id]
        validation = run_job("post_collection_validation", instance=instance, tags=requests[0].tags)
        assert validation.success, failure_text(validation)


# -- the index job: the table's owner ---------------------------------------------------------


def test_index_job_needs_to_own_the_table(database_url, select_only_url, run_job):
    before = database_checksums(database_url)
    message = refusal(run_job, "create_execution_id_indexes")
    assert "create_execution_id_indexes needs rights that role rdw_role_" in message
    assert "ownership of public.report_data_weeks (owner " in message
    assert 'GRANT CREATE ON SCHEMA "public"' in message  # CREATE INDEX needs it too
    assert "nothing was changed" in message
    assert database_checksums(database_url) == before


def test_opt_in_index_needs_workflow_executions_owned_too(
    database_url, role_url, run_job, monkeypatch
):
    use(role_url(*SELECT_ONLY_GRANTS, OWN_WEEKS, CREATE_IN_PUBLIC), monkeypatch)
    before = database_checksums(database_url)
    opt_in = {
        "ops": {"execution_id_indexes": {"config": {"workflow_executions_completed_at": True}}}
    }
    message = refusal(run_job, "create_execution_id_indexes", opt_in)
    assert "ownership of public.workflow_executions (owner " in message
    assert "report_data_weeks" not in message
    # Refused before building either index on the table it does own.
    assert database_checksums(database_url) == before
    # The owner of report_data_weeks, superuser or not, builds the two spec indexes.
    built = run_job("create_execution_id_indexes")
    assert built.success, failure_text(built)
    assert materialization_metadata(built, "execution_id_indexes")["created"] == 2


# -- the FK job: owner of report_data_weeks, REFERENCES on workflow_executions -------------


def test_foreign_key_job_needs_owner_and_references(database_url, role_url, run_job, monkeypatch):
    before = database_checksums(database_url)
    use(role_url(*SELECT_ONLY_GRANTS), monkeypatch)
    message = refusal(run_job, "add_execution_id_foreign_key")
    assert "ownership of public.report_data_weeks" in message
    assert "REFERENCES on public.workflow_executions" in message
    # Owning the table is not enough; the orphans would refuse it too, but grants come first.
    role = use(role_url(*SELECT_ONLY_GRANTS, OWN_WEEKS), monkeypatch)
    message = refusal(run_job, "add_execution_id_foreign_key")
    assert "ownership" not in message and "orphaned" not in message
    user = psycopg.conninfo.conninfo_to_dict(role)["user"]
    assert f'GRANT REFERENCES ON "public"."workflow_executions" TO "{user}"' in message
    schema, data = database_checksums(database_url)
    assert data == before[1]  # only the owner changed, by this test's own ALTER TABLE


# -- the rollback: UPDATE on the table, CREATE on the backup schema (or its tables) ---------


def test_rollback_and_restore_need_update_and_backup_rights(
    database_url, role_url, run_job, monkeypatch, sql_exec
):
    use(role_url(*SELECT_ONLY_GRANTS), monkeypatch)
    before = database_checksums(database_url)  # grants are in the schema checksum: after them
    # A dry run needs SELECT only, and says what a real run would lack.
    with dg.instance_for_test() as instance:
        dry = run_job("rollback_execution_id", rollback_config(), instance=instance)
        assert dry.success, failure_text(dry)
        logs = [entry.user_message for entry in instance.all_logs(dry.run_id)]
    warnings = [m for m in logs if "a real run as role" in m]
    assert warnings and "UPDATE on public.report_data_weeks" in warnings[0]
    message = refusal(run_job, "rollback_execution_id", rollback_config(dry_run=False))
    assert "UPDATE on public.report_data_weeks" in message
    assert "CREATE on schema public (to create public.execution_id_rollback_backup)" in message
    assert database_checksums(database_url) == before

    # UPDATE granted, but no backup tables and no CREATE on the schema: still refused.
    update = "GRANT UPDATE (execution_id, updated_at) ON report_data_weeks TO {role}"
    use(role_url(*SELECT_ONLY_GRANTS, update), monkeypatch)
    before = database_checksums(database_url)
    message = refusal(run_job, "rollback_execution_id", rollback_config(dry_run=False))
    assert "UPDATE on" not in message and "CREATE on schema public" in message
    assert database_checksums(database_url) == before

    # docs/grants.md's way: the owner creates the backup tables once, then grants.
    with psycopg.connect(database_url, autocommit=True) as conn:
        create_tables(
            conn,
            TargetDatabase(url=database_url),
            BackupTables("public", DEFAULT_BACKUP_TABLE, DEFAULT_STATE_TABLE),
        )
    restorer = role_url(
        *SELECT_ONLY_GRANTS,
        f"GRANT SELECT ON {DEFAULT_BACKUP_TABLE} TO {{role}}",
        f"GRANT SELECT, UPDATE ON {DEFAULT_STATE_TABLE} TO {{role}}",
    )
    use(role_url(*ROLLBACK_GRANTS), monkeypatch)
    created = database_checksums(database_url)
    done = run_job("rollback_execution_id", rollback_config(dry_run=False))
    assert done.success, failure_text(done)
    meta = materialization_metadata(done, "execution_id_rollback")
    assert meta["cleared_rows"] == meta["matched_rows"] > 0
    cleared = database_checksums(database_url)
    assert cleared[1] != created[1]

    # The restore needs UPDATE on the table too.
    use(restorer, monkeypatch)
    restore = {"ops": {"execution_id_restore": {"config": {"dry_run": False}}}}
    message = refusal(run_job, "restore_execution_id", restore)
    assert "UPDATE on public.report_data_weeks" in message
    assert database_checksums(database_url) == cleared
    # With the rollback's grants it puts every value back.
    use(role_url(*ROLLBACK_GRANTS), monkeypatch)
    back = run_job("restore_execution_id", restore)
    assert back.success, failure_text(back)
    assert (
        materialization_metadata(back, "execution_id_restore")["restored_rows"]
        == meta["cleared_rows"]
    )
    assert database_checksums(database_url)[1] != cleared[1]
