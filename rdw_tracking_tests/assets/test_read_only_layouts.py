"""The read-only assets on every layout: storage sums the tree, the schema asset reports
it, the join plan sees partition indexes; and what they report on a view."""

import json

import dagster as dg
import psycopg
import pytest

from rdw_tracking.assets.performance import indexes_used
from rdw_tracking_tests.assets.test_performance import PLAN, STORAGE, run_asset
from rdw_tracking_tests.conftest import check_results, materialization_metadata

SCHEMA = "execution_id_schema"

# Every table of report_data_weeks' tree, partitions and inheritance children alike.
TREE = """
WITH RECURSIVE tree(oid, level) AS (
    SELECT 'report_data_weeks'::regclass::oid, 0
    UNION ALL SELECT i.inhrelid, t.level + 1 FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid
)
SELECT c.oid, c.oid::regclass::text AS name, c.relkind::text AS relkind, t.level
FROM tree t JOIN pg_class c ON c.oid = t.oid
"""

EXPECTED = {
    "ordinary": ("ordinary", None, None),
    "range": ("partitioned", "range", "RANGE (created_at)"),
    "list": ("partitioned", "list", "LIST (status)"),
    "hash": ("partitioned", "hash", "HASH (id)"),
    "multilevel": ("partitioned", "range", "RANGE (created_at)"),
    "inheritance": ("inheritance", None, None),
}


def test_storage_sums_every_table_holding_rows(layout, layout_url, sql_exec, run_job):
    meta, _ = run_asset(run_job, STORAGE)
    # Only tables holding rows have storage: a partitioned parent's sizes are all 0.
    heap, table, total, indexes, tables = sql_exec(
        f"SELECT sum(pg_relation_size(oid)), sum(pg_table_size(oid)), "
        f"sum(pg_total_relation_size(oid)), sum(pg_indexes_size(oid)), count(*) "
        f"FROM ({TREE}) tree WHERE relkind = 'r'"
    )[0]
    assert total > heap > 0 and indexes > 0
    assert (meta["heap_bytes"], meta["table_bytes"]) == (heap, table)
    assert (meta["total_bytes"], meta["index_bytes"]) == (total, indexes)
    column = sql_exec("SELECT sum(pg_column_size(execution_id)) FROM report_data_weeks")[0][0]
    assert meta["execution_id_bytes"] == column
    assert meta["execution_id_sampled"] is False and meta["row_estimate"] == 2600
    assert meta["layout"] == EXPECTED[layout][0]
    for key in ("table_bytes", "total_bytes", "index_bytes", "execution_id_bytes"):
        assert type(meta[key]) is int, key
    if layout == "ordinary":
        assert "partition_sizes" not in meta
        return
    members = sql_exec(f"SELECT name, pg_total_relation_size(oid) FROM ({TREE}) tree")
    records = {r.data["table"]: r.data for r in meta["partition_sizes"].records}
    assert {f"public.{name}": size for name, size in members} == {
        label: r["total_bytes"] for label, r in records.items()
    }
    assert meta["partitions"] == len(members) - 1
    # Each index counts its partitions: the primary key's are on every partition.
    pkeys = {r.data["index"]: r.data for r in meta["indexes"].records}
    if layout != "inheritance":
        pkey = pkeys["report_data_weeks_pkey"]
        assert pkey["partitions"] == len(members) - 1 >= tables  # every partition, any level
        assert pkey["bytes"] == meta["index_bytes.report_data_weeks_pkey"]
        assert (
            pkey["bytes"]
            == sql_exec(
                "SELECT sum(pg_relation_size(relid)) FROM pg_partition_tree('report_data_weeks_pkey')"
            )[0][0]
        )
    else:  # each child has its own primary key
        assert len(pkeys) == 3 and sum(r["bytes"] for r in pkeys.values()) == indexes


@pytest.mark.parametrize("layout", ["range", "inheritance"])
def test_storage_samples_a_large_tree(layout, layout_url, sql_exec, run_job):
    sql_exec("ANALYZE")  # every child's own row estimate, as autovacuum would leave it
    heap = sql_exec(f"SELECT sum(pg_relation_size(oid)) FROM ({TREE}) tree")[0][0]
    meta, _ = run_asset(run_job, STORAGE, sample_above_bytes=8192, sample_bytes=int(heap) // 2)
    assert meta["execution_id_sampled"] is True and meta["row_estimate"] == 2600
    exact = sql_exec("SELECT sum(pg_column_size(execution_id)) FROM report_data_weeks")[0][0]
    assert exact * 0.5 < meta["execution_id_bytes"] < exact * 1.5


def test_schema_reports_the_layout(layout, layout_url, sql_exec, run_job):
    result = run_job("verify_execution_tracking", asset_selection=[dg.AssetKey(SCHEMA)])
    assert result.success
    meta = materialization_metadata(result, SCHEMA)
    kind, strategy, key = EXPECTED[layout]
    assert (meta["layout"], meta["partition_strategy"], meta["partition_key"]) == (
        kind,
        strategy,
        key,
    )
    below = sql_exec(f"SELECT name FROM ({TREE}) tree WHERE level > 0 ORDER BY name")
    assert meta["partitions"] == len(below)
    leaves = sql_exec(f"SELECT count(*) FROM ({TREE}) tree WHERE relkind = 'r'")[0][0]
    assert meta["leaf_tables"] == leaves
    assert meta["data_type"] == "uuid"  # and the column contract as before
    assert check_results(result)["execution_id_column_contract"].passed
    if layout == "ordinary":
        assert "layout_members" not in meta
        return
    records = [r.data for r in meta["layout_members"].records]
    assert sorted(r["table"] for r in records if r["level"] > 0) == [
        f"public.{name}" for (name,) in below
    ]
    if layout == "inheritance":
        assert meta["children"] == (
            "public.report_data_weeks_child_1, public.report_data_weeks_child_2"
        )
    else:
        assert all(r["bound"] for r in records if r["level"] > 0)
    if layout == "multilevel":
        assert {r["level"] for r in records} == {0, 1, 2}


def test_join_plan_runs_on_every_layout(layout, layout_url, sql_exec, run_job):
    sql_exec("CREATE INDEX idx_rdw_collection ON report_data_weeks (collection_id)")
    sql_exec("ANALYZE report_data_weeks")
    meta, checks = run_asset(run_job, PLAN)
    check = checks["execution_id_join_uses_index"]
    assert check.passed == meta["uses_index"]
    assert (
        meta["rows"]
        == sql_exec(
            "SELECT count(*) FROM report_data_weeks WHERE collection_id = %s",
            [meta["collection_id"]],
        )[0][0]
    )


@pytest.mark.parametrize("layout", ["hash", "multilevel", "inheritance"])
def test_an_index_scan_on_a_partition_counts(layout, layout_url, sql_exec):
    """The plan names each partition's own index, on the partition: that is an index on
    report_data_weeks."""
    sql_exec("CREATE INDEX idx_rdw_collection ON report_data_weeks (collection_id)")
    if layout == "inheritance":  # inheritance children get no index from their parent
        for child in ("report_data_weeks_child_1", "report_data_weeks_child_2"):
            sql_exec(f"CREATE INDEX ON {child} (collection_id)")
    with psycopg.connect(layout_url) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = conn.execute(
            "EXPLAIN (FORMAT JSON) SELECT * FROM report_data_weeks WHERE collection_id = "
            "(SELECT collection_id FROM report_data_weeks LIMIT 1)"
        ).fetchone()[0]
    plan = plan if isinstance(plan, list) else json.loads(plan)
    relations = {
        name.removeprefix("public.") for (name,) in sql_exec(f"SELECT name FROM ({TREE}) t")
    }
    used = indexes_used(plan[0]["Plan"], relations)
    # Not the partitioned index's name: each partition's or child's own.
    assert len([name for name in used if name != "idx_rdw_collection"]) >= 2
    on_parent = indexes_used(plan[0]["Plan"], "report_data_weeks")
    # Only an inheritance parent holds rows (and an index scan) of its own.
    assert on_parent == (["idx_rdw_collection"] if layout == "inheritance" else [])


@pytest.mark.parametrize(
    "ddl, kind",
    [
        ("CREATE VIEW report_data_weeks AS SELECT * FROM weeks_real", "view"),
        (
            "CREATE MATERIALIZED VIEW report_data_weeks AS SELECT * FROM weeks_real",
            "materialized view",
        ),
    ],
)
def test_read_only_job_reports_what_it_can_on_a_view(database_url, sql_exec, run_job, ddl, kind):
    sql_exec("ALTER TABLE report_data_weeks RENAME TO weeks_real")
    sql_exec(ddl)
    selection = [dg.AssetKey(SCHEMA), dg.AssetKey(STORAGE), dg.AssetKey(PLAN)]
    result = run_job("verify_execution_tracking", asset_selection=selection)
    assert result.success
    schema = materialization_metadata(result, SCHEMA)
    assert schema["layout"] == kind and schema["data_type"] == "uuid"
    assert schema["partitions"] == 0
    checks = check_results(result)
    assert checks["execution_id_column_contract"].passed
    fk = checks["execution_id_foreign_key"]
    assert not fk.passed and f"public.report_data_weeks is a {kind}" in fk.description
    storage = materialization_metadata(result, STORAGE)
    assert storage["layout"] == kind
    if kind == "view":  # no storage of its own; its rows live in weeks_real
        assert storage["total_bytes"] == 0 and storage["execution_id_bytes"] is None
        assert "not measured" in storage["execution_id_method"]
    else:
        total = sql_exec("SELECT pg_total_relation_size('report_data_weeks')")[0][0]
        assert storage["total_bytes"] == total > 0
        assert storage["execution_id_bytes"] == 16 * 400
    plan = materialization_metadata(result, PLAN)
    assert plan["rows"] > 0
