"""The column schema change check on `execution_id_schema`, on every layout."""

import dagster as dg

from rdw_tracking_tests.conftest import check_results, materialization_metadata

SCHEMA = "execution_id_schema"
CHANGE_CHECK = "column_schema_change"


def verify_schema(run_job, instance):
    result = run_job(
        "verify_execution_tracking", asset_selection=[dg.AssetKey(SCHEMA)], instance=instance
    )
    assert result.success
    return result


def test_a_column_added_to_report_data_weeks_is_reported(layout, layout_url, sql_exec, run_job):
    with dg.instance_for_test() as instance:
        first = verify_schema(run_job, instance)
        columns = materialization_metadata(first, SCHEMA)["dagster/column_schema"].columns
        assert {"id", "execution_id", "created_at"} <= {c.name for c in columns}
        assert check_results(first)[CHANGE_CHECK].passed  # nothing to compare with yet

        unchanged = check_results(verify_schema(run_job, instance))[CHANGE_CHECK]
        assert unchanged.passed and "no column added" in unchanged.description

        # On a partitioned or inheritance parent the column reaches every table below.
        sql_exec("ALTER TABLE report_data_weeks ADD COLUMN review_note text")
        changed = check_results(verify_schema(run_job, instance))[CHANGE_CHECK]
    assert not changed.passed and changed.severity == dg.AssetCheckSeverity.WARN
    assert "added review_note (text)" in changed.description
    assert changed.metadata["changes"].value == ["added review_note (text)"]
