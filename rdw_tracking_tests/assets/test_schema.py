"""Schema verification of execution_id and its foreign key, case by case."""

import dagster as dg
import pytest

from rdw_tracking.assets.schema import execution_id_schema, schema_checks
from rdw_tracking.assets.tables import external_tables
from rdw_tracking.resources import TargetDatabase
from rdw_tracking_tests.conftest import (
    check_results,
    materialization_metadata,
    step_failure_messages,
)


def verify(db: TargetDatabase):
    return dg.materialize(
        [*external_tables, execution_id_schema, *schema_checks],
        resources={"target_db": db},
        selection=dg.AssetSelection.assets("execution_id_schema"),
        raise_on_error=False,
    )


def test_correct_column(db, run_job):
    result = run_job("verify_execution_tracking")
    assert result.success
    meta = materialization_metadata(result, "execution_id_schema")
    assert meta["data_type"] == "uuid"
    assert meta["is_nullable"] is True
    assert meta["column_default"] is None
    assert meta["workflow_executions_exists"] is True
    assert meta["fk_constraint"] is None and meta["fk_validated"] is False
    assert meta["dagster/table_name"].endswith("public.report_data_weeks")
    columns = [c.name for c in meta["dagster/column_schema"].columns]
    assert columns[:6] == [
        "id",
        "collection_id",
        "week_start_date",
        "week_end_date",
        "status",
        "execution_id",
    ]
    checks = check_results(result)
    assert checks["execution_id_column_contract"].passed
    assert checks["execution_id_column_contract"].severity == dg.AssetCheckSeverity.ERROR
    fk = checks["execution_id_foreign_key"]
    assert not fk.passed and fk.severity == dg.AssetCheckSeverity.WARN
    assert "no foreign key" in fk.description
    ddl = fk.metadata["safe_ddl"].value
    assert "NOT VALID" in ddl and "VALIDATE CONSTRAINT" in ddl


@pytest.mark.parametrize(
    "alter,expected",
    [
        (
            "ALTER TABLE report_data_weeks ALTER COLUMN execution_id TYPE text",
            "is text, expected uuid",
        ),
        (
            "UPDATE report_data_weeks SET execution_id = gen_random_uuid() WHERE execution_id IS NULL;"
            "ALTER TABLE report_data_weeks ALTER COLUMN execution_id SET NOT NULL",
            "is NOT NULL, expected nullable",
        ),
        (
            "ALTER TABLE report_data_weeks ALTER COLUMN execution_id SET DEFAULT gen_random_uuid()",
            "has default gen_random_uuid(), expected NULL",
        ),
    ],
    ids=["text", "not-null", "default"],
)
def test_column_contract_violations(db, sql_exec, alter, expected):
    sql_exec(alter)
    result = verify(db)
    check = check_results(result)["execution_id_column_contract"]
    assert not check.passed
    assert check.severity == dg.AssetCheckSeverity.ERROR
    assert f"public.report_data_weeks.execution_id {expected}" in check.description
    assert check.metadata["violation_count"].value == 1


def test_explicit_default_null_is_fine(db, sql_exec):
    sql_exec("ALTER TABLE report_data_weeks ALTER COLUMN execution_id SET DEFAULT NULL")
    assert check_results(verify(db))["execution_id_column_contract"].passed


def test_blocking_check_stops_downstream(db, sql_exec):
    sql_exec("ALTER TABLE report_data_weeks ALTER COLUMN execution_id TYPE text")
    checks = {c.key.name: c for c in schema_checks[0].check_specs}
    assert checks["execution_id_column_contract"].blocking


def test_missing_column_fails_naming_it(db, sql_exec):
    sql_exec("ALTER TABLE report_data_weeks DROP COLUMN execution_id")
    result = verify(db)
    assert not result.success
    assert any(
        "public.report_data_weeks.execution_id does not exist" in m
        for m in step_failure_messages(result)
    )
    check = check_results(result).get("execution_id_column_contract")
    assert check is None or not check.passed


def test_missing_table_fails_naming_it(db, sql_exec):
    sql_exec("DROP TABLE report_data_weeks")
    result = verify(db)
    assert not result.success
    assert any(
        "table public.report_data_weeks does not exist" in m for m in step_failure_messages(result)
    )


def test_missing_workflow_executions(db, sql_exec):
    sql_exec("DROP TABLE workflow_executions")
    result = verify(db)
    assert result.success
    assert (
        materialization_metadata(result, "execution_id_schema")["workflow_executions_exists"]
        is False
    )
    fk = check_results(result)["execution_id_foreign_key"]
    assert not fk.passed and "FK constraint not possible" in fk.description


def test_valid_foreign_key_passes(db, sql_exec):
    sql_exec(
        "DELETE FROM report_data_weeks w WHERE execution_id IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id)"
    )
    sql_exec(
        "ALTER TABLE report_data_weeks ADD CONSTRAINT fk_exec FOREIGN KEY (execution_id) "
        "REFERENCES workflow_executions(id)"
    )
    result = verify(db)
    meta = materialization_metadata(result, "execution_id_schema")
    assert meta["fk_constraint"] == "fk_exec" and meta["fk_validated"] is True
    fk = check_results(result)["execution_id_foreign_key"]
    assert fk.passed, fk.description


def test_not_valid_foreign_key_warns(db, sql_exec):
    sql_exec(
        "ALTER TABLE report_data_weeks ADD CONSTRAINT fk_exec FOREIGN KEY (execution_id) "
        "REFERENCES workflow_executions(id) NOT VALID"
    )
    result = verify(db)
    fk = check_results(result)["execution_id_foreign_key"]
    assert not fk.passed and "NOT VALID" in fk.description
    assert fk.severity == dg.AssetCheckSeverity.WARN
    ddl = fk.metadata["safe_ddl"].value
    assert 'VALIDATE CONSTRAINT "fk_exec"' in ddl and "ADD CONSTRAINT" not in ddl


def test_decoy_table_in_another_schema_is_ignored(db, sql_exec):
    sql_exec(
        "CREATE SCHEMA decoy; CREATE TABLE decoy.report_data_weeks (id int, execution_id text NOT NULL)"
    )
    result = verify(db)
    assert check_results(result)["execution_id_column_contract"].passed
    assert materialization_metadata(result, "execution_id_schema")["data_type"] == "uuid"
    # ...and configured to look at the decoy schema, the decoy is what is judged.
    result = verify(TargetDatabase(url=db.url, schema_name="decoy"))
    check = check_results(result)["execution_id_column_contract"]
    assert not check.passed and "decoy.report_data_weeks.execution_id is text" in check.description


def test_schema_name_that_needs_quoting(empty_database_url):
    from rdw_tracking import demo

    names = demo.DemoNames(schema="Report Data")
    demo.build(empty_database_url, demo.DemoShape(rows=104), names)
    db = TargetDatabase(url=empty_database_url, schema_name="Report Data")
    result = verify(db)
    assert result.success
    assert check_results(result)["execution_id_column_contract"].passed
    meta = materialization_metadata(result, "execution_id_schema")
    assert meta["dagster/table_name"].endswith("Report Data.report_data_weeks")
