"""The layout lookup on every supported layout and on what the write jobs refuse."""

import psycopg
import pytest

from rdw_tracking.layout import is_member, table_layout

EXPECTED_KIND = {
    "ordinary": ("ordinary", None),
    "range": ("partitioned", "range"),
    "list": ("partitioned", "list"),
    "hash": ("partitioned", "hash"),
    "multilevel": ("partitioned", "range"),
    "inheritance": ("inheritance", None),
}


def test_every_layout_is_read_with_its_leaves(layout, layout_url, sql_exec):
    with psycopg.connect(layout_url) as conn:
        found = table_layout(conn, "public", "report_data_weeks")
        assert (found.kind, found.strategy) == EXPECTED_KIND[layout]
        assert found.refusal("rollback_execution_id") is None
        # the leaves hold every row, each exactly once
        total = conn.execute("SELECT count(*) FROM report_data_weeks").fetchone()[0]
        per_leaf = sum(
            conn.execute(f'SELECT count(*) FROM ONLY "{m.schema}"."{m.name}"').fetchone()[0]
            for m in found.leaves
        )
        assert per_leaf == total == 2_600
        assert all(is_member(conn, found.root.oid, m.oid) for m in found.leaves)
    if layout == "ordinary":
        assert [m.name for m in found.leaves] == ["report_data_weeks"]
    elif layout == "inheritance":
        assert len(found.leaves) == 3 and found.root in found.leaves
    else:
        assert found.root not in found.leaves and len(found.leaves) >= 3


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
def test_views_are_refused_by_kind(database_url, sql_exec, ddl, kind):
    sql_exec("ALTER TABLE report_data_weeks RENAME TO weeks_real")
    sql_exec(ddl)
    with psycopg.connect(database_url) as conn:
        found = table_layout(conn, "public", "report_data_weeks")
    assert found.kind == kind
    message = found.refusal("rollback_execution_id")
    assert f"public.report_data_weeks is a {kind}" in message and "weeks_table" in message


def test_rules_are_refused_by_name(database_url, sql_exec):
    sql_exec(
        "CREATE RULE keep_ids AS ON UPDATE TO report_data_weeks "
        "WHERE new.execution_id IS NULL DO INSTEAD NOTHING"
    )
    with psycopg.connect(database_url) as conn:
        message = table_layout(conn, "public", "report_data_weeks").refusal("x")
    assert "keep_ids" in message and "DROP RULE" in message


def test_a_detached_partition_is_no_longer_a_member(database_url, sql_exec):
    from rdw_tracking.demo_layouts import relayout

    relayout(database_url, "hash")
    with psycopg.connect(database_url, autocommit=True) as conn:
        before = table_layout(conn, "public", "report_data_weeks")
        leaf = before.leaves[0]
        conn.execute(f'ALTER TABLE report_data_weeks DETACH PARTITION "{leaf.name}"')
        assert not is_member(conn, before.root.oid, leaf.oid)
        after = table_layout(conn, "public", "report_data_weeks")
    assert leaf.oid not in [m.oid for m in after.leaves]
