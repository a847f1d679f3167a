"""The join plan and storage assets, and the whole read-only set under a SELECT-only role."""

import dagster as dg
import pytest

from rdw_tracking_tests.assets.test_population import failure_text
from rdw_tracking_tests.conftest import check_results, launch_refusal, materialization_metadata

PLAN, STORAGE = "execution_id_join_plan", "execution_id_storage"
BUSY = "00000000-0000-0000-0000-00000000b005"


def run_asset(run_job, asset, **config):
    result = run_job(
        "verify_execution_tracking",
        run_config={"ops": {asset: {"config": config}}} if config else None,
        asset_selection=[dg.AssetKey(asset)],
    )
    assert result.success, failure_text(result)
    return materialization_metadata(result, asset), check_results(result)


@pytest.fixture
def busy_collection(sql_exec):
    """A collection with 60 weeks, more than any other (the demo's have 52)."""
    sql_exec("INSERT INTO report_data_collections (id, name) VALUES (%s, 'busy')", [BUSY])
    sql_exec(
        "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date, execution_id) "
        "SELECT %s, CURRENT_DATE - 7 * g, CURRENT_DATE - 7 * g + 6, "
        "(SELECT id FROM workflow_executions ORDER BY id LIMIT 1) FROM generate_series(1, 60) g",
        [BUSY],
    )
    sql_exec("ANALYZE report_data_weeks")
    return BUSY


def test_plan_without_an_index_warns(db, sql_exec, run_job, busy_collection):
    meta, checks = run_asset(run_job, PLAN)
    assert meta["collection_id"] == busy_collection
    assert "pg_stats" in meta["collection_chosen_by"]
    assert meta["rows"] == 60
    assert meta["uses_index"] is False and meta["index_names"] == ""
    assert type(meta["execution_ms"]) is float and meta["execution_ms"] > 0
    assert type(meta["planning_ms"]) is float and meta["planning_ms"] > 0
    assert "Seq Scan on report_data_weeks rdw" in meta["plan"]
    assert meta["plan_json"]["Plan"]["Node Type"] == "Sort"
    check = checks["execution_id_join_uses_index"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "(collection_id)" in check.description


def test_plan_with_an_index_on_collection_id_passes(db, sql_exec, run_job, busy_collection):
    sql_exec("CREATE INDEX idx_rdw_collection ON report_data_weeks (collection_id)")
    sql_exec("ANALYZE report_data_weeks")
    meta, checks = run_asset(run_job, PLAN)
    assert meta["uses_index"] is True
    assert meta["index_names"] == "idx_rdw_collection"
    assert "idx_rdw_collection" in meta["plan"]
    assert meta["rows"] == 60
    check = checks["execution_id_join_uses_index"]
    assert check.passed and check.severity == dg.AssetCheckSeverity.WARN


def test_plan_for_a_configured_collection(db, sql_exec, run_job):
    collection = sql_exec("SELECT id::text FROM report_data_collections ORDER BY id LIMIT 1")[0][0]
    meta, _ = run_asset(run_job, PLAN, collection_id=collection.upper())
    assert meta["collection_id"] == collection and meta["collection_chosen_by"] == "configured"
    expected = sql_exec(
        "SELECT count(*) FROM report_data_weeks WHERE collection_id = %s", [collection]
    )[0][0]
    assert meta["rows"] == expected == 52


def forget_statistics(sql_exec):
    """As if the table had never been analyzed (ANALYZE keeps old statistics)."""
    sql_exec("DELETE FROM pg_statistic WHERE starelid = 'report_data_weeks'::regclass")
    sql_exec("UPDATE pg_class SET reltuples = -1 WHERE oid = 'report_data_weeks'::regclass")


def test_busiest_collection_without_statistics(db, sql_exec, run_job, busy_collection):
    forget_statistics(sql_exec)
    assert not sql_exec(
        "SELECT 1 FROM pg_stats WHERE tablename = 'report_data_weeks' AND attname = 'collection_id'"
    )
    meta, _ = run_asset(run_job, PLAN)
    assert meta["collection_id"] == busy_collection
    assert "count over the whole table" in meta["collection_chosen_by"]


def test_plan_on_an_empty_table(db, sql_exec, run_job):
    sql_exec("TRUNCATE report_data_weeks")
    forget_statistics(sql_exec)
    meta, checks = run_asset(run_job, PLAN)
    assert meta["rows"] == 0 and "has no rows" in meta["collection_chosen_by"]
    assert not checks["execution_id_join_uses_index"].passed


def test_bad_collection_id_is_refused(db, run_job):
    message = launch_refusal(
        run_job,
        "verify_execution_tracking",
        {"ops": {PLAN: {"config": {"collection_id": "collection-7"}}}},
        asset_selection=[dg.AssetKey(PLAN)],
    )
    assert "collection_id must be a UUID" in message


def test_storage_matches_the_catalog(db, sql_exec, run_job):
    meta, _ = run_asset(run_job, STORAGE)
    table, total, indexes, heap = sql_exec(
        "SELECT pg_table_size('report_data_weeks'), pg_total_relation_size('report_data_weeks'), "
        "pg_indexes_size('report_data_weeks'), pg_relation_size('report_data_weeks')"
    )[0]
    assert (meta["table_bytes"], meta["total_bytes"], meta["index_bytes"]) == (
        table,
        total,
        indexes,
    )
    assert meta["heap_bytes"] == heap
    column = sql_exec("SELECT sum(pg_column_size(execution_id)) FROM report_data_weeks")[0][0]
    assert meta["execution_id_bytes"] == column == 16 * 400
    assert meta["execution_id_sampled"] is False and meta["execution_id_method"].startswith("exact")
    assert meta["row_estimate"] == 2600
    pkey = sql_exec("SELECT pg_relation_size('report_data_weeks_pkey')")[0][0]
    assert meta["index_bytes.report_data_weeks_pkey"] == pkey
    assert [r.data["index"] for r in meta["indexes"].records] == ["report_data_weeks_pkey"]
    for key in ("table_bytes", "total_bytes", "index_bytes", "execution_id_bytes"):
        assert type(meta[key]) is int, key


def test_storage_samples_a_large_table(db, sql_exec, run_job):
    sql_exec("CREATE INDEX idx_rdw_collection ON report_data_weeks (collection_id)")
    heap = sql_exec("SELECT pg_relation_size('report_data_weeks')")[0][0]
    meta, _ = run_asset(run_job, STORAGE, sample_above_bytes=8192, sample_bytes=heap // 2)
    assert meta["execution_id_sampled"] is True
    assert "TABLESAMPLE SYSTEM" in meta["execution_id_method"]
    assert meta["row_estimate"] == 2600
    # A page sample of evenly spread ids: within a third of the exact 6,400 bytes.
    assert 16 * 400 * 2 / 3 < meta["execution_id_bytes"] < 16 * 400 * 4 / 3
    assert "idx_rdw_collection" in {r.data["index"] for r in meta["indexes"].records}
    assert meta["index_bytes"] == sql_exec("SELECT pg_indexes_size('report_data_weeks')")[0][0]


def test_bad_storage_config_is_refused(db, run_job):
    message = launch_refusal(
        run_job,
        "verify_execution_tracking",
        {"ops": {STORAGE: {"config": {"sample_bytes": 0}}}},
        asset_selection=[dg.AssetKey(STORAGE)],
    )
    assert "sample_bytes must be between 8192" in message
