"""The foreign key job on partitioned and inherited tables (and what it refuses)."""

import dagster as dg
import psycopg
import pytest

from rdw_tracking.assets.foreign_key import orphans
from rdw_tracking.assets.schema import execution_id_schema, schema_checks
from rdw_tracking.assets.tables import external_tables
from rdw_tracking.contract import FK_NAME
from rdw_tracking.indexes.specs import EXECUTION_ID_INDEX
from rdw_tracking.resources import TargetDatabase
from rdw_tracking_tests.assets.test_foreign_key import DELETE_ORPHANS, fk_config, output_metadata
from rdw_tracking_tests.conftest import check_results, database_checksums, step_failure_messages

JOB = "add_execution_id_foreign_key"
PARTITIONED = ("range", "list", "hash", "multilevel")

# Every table of the tree with its FK on execution_id (if any): (table, constraint,
# validated, ON DELETE code, parent constraint's table).
TREE_FKS = """
SELECT t.relid::regclass::text, con.conname, con.convalidated, con.confdeltype,
       (SELECT p.conrelid::regclass::text FROM pg_constraint p WHERE p.oid = con.conparentid)
FROM pg_partition_tree('report_data_weeks') t
LEFT JOIN pg_constraint con ON con.conrelid = t.relid AND con.contype = 'f'
     AND con.confrelid = 'workflow_executions'::regclass
ORDER BY t.level, 1, 2
"""
INSERT_ORPHAN = (
    "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date, status, "
    "created_at, execution_id) SELECT collection_id, week_start_date, week_end_date, status, "
    "created_at, gen_random_uuid() FROM report_data_weeks LIMIT 1"
)


def server_version(sql_exec) -> int:
    return int(sql_exec("SHOW server_version_num")[0][0])


def prepare(sql_exec) -> None:
    """No orphans, and the index the job wants (built here, so this test does not depend on
    the index job's partitioned route)."""
    sql_exec(DELETE_ORPHANS)
    sql_exec(
        f"CREATE INDEX IF NOT EXISTS {EXECUTION_ID_INDEX} ON report_data_weeks (execution_id) "
        "WHERE execution_id IS NOT NULL"
    )


def schema_checks_of(url: str) -> dict:
    result = dg.materialize(
        [*external_tables, execution_id_schema, *schema_checks],
        resources={"target_db": TargetDatabase(url=url)},
        selection=dg.AssetSelection.assets("execution_id_schema"),
        raise_on_error=False,
    )
    return check_results(result)


@pytest.mark.parametrize("layout", PARTITIONED)
def test_fk_added_and_validated_on_every_partition(layout, layout_url, run_job, sql_exec):
    prepare(sql_exec)
    assert not schema_checks_of(layout_url)["execution_id_foreign_key"].passed
    result = run_job(JOB)
    assert result.success, step_failure_messages(result)
    meta = output_metadata(result)
    assert meta["action"] == "added" and meta["layout"] == "partitioned"
    leaves = sql_exec(
        "SELECT count(*) FROM pg_partition_tree('report_data_weeks') t "
        "JOIN pg_class c ON c.oid = t.relid WHERE c.relkind = 'r'"
    )[0][0]
    assert meta["partitions_validated"] == leaves
    rows = sql_exec(TREE_FKS)
    # One validated constraint on each table of the tree, each partition's the parent's own.
    assert [r[0] for r in rows] == [
        r[0]
        for r in sql_exec(
            "SELECT relid::regclass::text FROM pg_partition_tree("
            "'report_data_weeks') ORDER BY level, 1"
        )
    ]
    assert all(r[2] is True and r[3] == "a" for r in rows), rows
    assert rows[0][:2] == ("report_data_weeks", FK_NAME) and rows[0][4] is None
    assert all(r[4] is not None for r in rows[1:])
    if server_version(sql_exec) < 180000:
        assert "PostgreSQL < 18" in meta["route"] and meta["attach_seconds"] >= 0
    else:
        assert "PostgreSQL 18+" in meta["route"]
    assert schema_checks_of(layout_url)["execution_id_foreign_key"].passed

    before = database_checksums(layout_url)
    again = run_job(JOB)
    assert again.success and output_metadata(again)["action"] == "unchanged"
    assert database_checksums(layout_url) == before
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        sql_exec(INSERT_ORPHAN)


@pytest.mark.parametrize("layout", ("ordinary", *PARTITIONED))
def test_refused_with_orphans_naming_the_count(layout, layout_url, db, run_job, sql_exec):
    sql_exec(
        "UPDATE report_data_weeks SET execution_id = gen_random_uuid() "
        "WHERE id IN (SELECT id FROM report_data_weeks ORDER BY id LIMIT 7)"
    )
    expected = sql_exec(
        "SELECT count(*) FROM report_data_weeks w WHERE execution_id IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id)"
    )[0][0]
    assert orphans(db)[0] == expected >= 7
    before = database_checksums(layout_url)
    result = run_job(JOB)
    assert not result.success
    (message,) = step_failure_messages(result)
    assert f"public.report_data_weeks.execution_id has {expected} orphaned value(s)" in message
    assert database_checksums(layout_url) == before


def test_orphans_counted_over_parent_and_children(database_url, db, sql_exec):
    from rdw_tracking.demo_layouts import relayout

    relayout(database_url, "inheritance")
    sql_exec(DELETE_ORPHANS)
    sql_exec(
        "UPDATE report_data_weeks_child_2 SET execution_id = gen_random_uuid() "
        "WHERE id IN (SELECT id FROM report_data_weeks_child_2 ORDER BY id LIMIT 3)"
    )
    sql_exec(
        "UPDATE ONLY report_data_weeks SET execution_id = gen_random_uuid() "
        "WHERE id IN (SELECT id FROM ONLY report_data_weeks ORDER BY id LIMIT 2)"
    )
    assert orphans(db)[0] == 5


@pytest.mark.parametrize("layout", ["hash", "multilevel"])
def test_on_delete_set_null_on_every_partition(layout, layout_url, run_job, sql_exec):
    prepare(sql_exec)
    result = run_job(JOB, fk_config(on_delete="SET NULL"))
    assert result.success, step_failure_messages(result)
    assert {r[3] for r in sql_exec(TREE_FKS)} == {"n"}
    (execution,) = sql_exec(
        "SELECT execution_id FROM report_data_weeks WHERE execution_id IS NOT NULL LIMIT 1"
    )[0]
    sql_exec("DELETE FROM workflow_executions WHERE id = %s", [execution])
    assert sql_exec(
        "SELECT count(*) FROM report_data_weeks WHERE execution_id = %s", [execution]
    ) == [(0,)]
    # Asking for another ON DELETE than the one in place changes nothing.
    refused = run_job(JOB, fk_config(on_delete="CASCADE"))
    assert not refused.success
    assert "exists with ON DELETE SET NULL" in step_failure_messages(refused)[0]


@pytest.mark.parametrize("layout", ["range"])
def test_an_interrupted_run_resumes(layout, layout_url, run_job, sql_exec):
    """Some partitions already validated, one NOT VALID, the rest untouched: the run takes
    them all into the parent's constraint, scanning only what is not validated yet."""
    prepare(sql_exec)
    leaves = [
        r[0]
        for r in sql_exec(
            "SELECT relid::regclass::text FROM pg_partition_tree('report_data_weeks') "
            "WHERE isleaf ORDER BY 1"
        )
    ]
    for leaf in leaves[:2]:
        sql_exec(
            f"ALTER TABLE {leaf} ADD CONSTRAINT {FK_NAME} FOREIGN KEY (execution_id) "
            "REFERENCES workflow_executions (id) NOT VALID"
        )
    sql_exec(f"ALTER TABLE {leaves[0]} VALIDATE CONSTRAINT {FK_NAME}")
    result = run_job(JOB)
    assert result.success, step_failure_messages(result)
    meta = output_metadata(result)
    assert meta["partitions_validated"] == len(leaves) - 1  # the first was validated already
    rows = sql_exec(TREE_FKS)
    assert all(r[2] for r in rows) and all(r[4] for r in rows[1:])
    assert len(rows) == len(leaves) + 1  # the partitions' constraints were taken over


@pytest.mark.parametrize("layout", ["list"])
def test_partition_fk_with_another_on_delete(layout, layout_url, run_job, sql_exec):
    prepare(sql_exec)
    leaf = sql_exec(
        "SELECT relid::regclass::text FROM pg_partition_tree('report_data_weeks') "
        "WHERE isleaf ORDER BY 1 LIMIT 1"
    )[0][0]
    sql_exec(
        f"ALTER TABLE {leaf} ADD CONSTRAINT own_fk FOREIGN KEY (execution_id) "
        "REFERENCES workflow_executions (id) ON DELETE CASCADE"
    )
    before = database_checksums(layout_url)
    result = run_job(JOB)
    if server_version(sql_exec) < 180000:
        # It would not be taken over: the parent's ADD would scan that partition again
        # under a lock that blocks its writers.
        assert not result.success
        (message,) = step_failure_messages(result)
        assert f"{leaf} (own_fk, ON DELETE CASCADE)" in message
        assert "nothing was changed" in message
        assert database_checksums(layout_url) == before
    else:  # the parent's NOT VALID constraint gets its own copy there, validated online
        assert result.success, step_failure_messages(result)
        assert schema_checks_of(layout_url)["execution_id_foreign_key"].passed


@pytest.mark.parametrize("layout", ["inheritance"])
def test_inheritance_is_refused_and_checked_per_table(layout, layout_url, run_job, sql_exec):
    prepare(sql_exec)
    before = database_checksums(layout_url)
    result = run_job(JOB)
    assert not result.success
    (message,) = step_failure_messages(result)
    assert "foreign keys are not inherited by child tables" in message
    assert "nothing was changed" in message and "declarative partitioning" in message
    assert database_checksums(layout_url) == before

    # A constraint on the parent alone checks none of the children's rows.
    sql_exec(
        f"ALTER TABLE report_data_weeks ADD CONSTRAINT {FK_NAME} FOREIGN KEY (execution_id) "
        "REFERENCES workflow_executions (id)"
    )
    check = schema_checks_of(layout_url)["execution_id_foreign_key"]
    assert not check.passed
    assert "public.report_data_weeks_child_1, public.report_data_weeks_child_2" in (
        check.description
    )
    ddl = check.metadata["safe_ddl"].value
    assert "report_data_weeks_child_1" in ddl and "report_data_weeks_child_2" in ddl
    for child in ("report_data_weeks_child_1", "report_data_weeks_child_2"):
        sql_exec(
            f"ALTER TABLE {child} ADD CONSTRAINT {FK_NAME} FOREIGN KEY (execution_id) "
            "REFERENCES workflow_executions (id)"
        )
    assert schema_checks_of(layout_url)["execution_id_foreign_key"].passed


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
def test_views_are_refused_before_any_change(database_url, run_job, sql_exec, ddl, kind):
    sql_exec(DELETE_ORPHANS)
    sql_exec("ALTER TABLE report_data_weeks RENAME TO weeks_real")
    sql_exec(ddl)
    before = database_checksums(database_url)
    result = run_job(JOB)
    assert not result.success
    (message,) = step_failure_messages(result)
    assert f"public.report_data_weeks is a {kind}" in message and "nothing was changed" in message
    assert database_checksums(database_url) == before


@pytest.mark.parametrize("layout", ["multilevel"])
def test_the_checks_safe_ddl_works_by_hand(layout, layout_url, sql_exec):
    """The statements the check suggests, run one by one as a person would, on any
    version: each partition NOT VALID and VALIDATE, then the parent's ADD."""
    prepare(sql_exec)
    check = schema_checks_of(layout_url)["execution_id_foreign_key"]
    assert not check.passed
    ddl = check.metadata["safe_ddl"].value.split("```sql\n")[1].split("\n```")[0]
    statements = ddl.splitlines()
    assert "NOT VALID" not in statements[-1] and all("ONLY" not in s for s in statements)
    for statement in statements:
        sql_exec(statement)
    assert schema_checks_of(layout_url)["execution_id_foreign_key"].passed
    assert all(r[2] for r in sql_exec(TREE_FKS))
