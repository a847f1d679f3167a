"""The tally's storage key: distinct targets never share one (issue 28, point 8).

Before, the key read `host:port/db/schema.table`: schema `x.y` with table `z` and schema
`x` with table `y.z` shared a key, and so did two servers told apart only by `hostaddr`;
a run on one then took the other's stored per-day tally as its own.
"""

import dagster as dg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from rdw_tracking import demo
from rdw_tracking.assets.tallying import tally_key
from rdw_tracking.resources import TargetDatabase
from rdw_tracking_tests.conftest import materialization_metadata

DOTTED = demo.DemoNames(schema="x.y", weeks="z", executions="e", collections="c")
PLAIN = demo.DemoNames(schema="x", weeks="y.z", executions="e", collections="c")


def target(url: str, names: demo.DemoNames) -> TargetDatabase:
    return TargetDatabase(
        url=url,
        schema_name=names.schema,
        weeks_table=names.weeks,
        executions_table=names.executions,
        collections_table=names.collections,
    )


def key(db: TargetDatabase) -> str:
    with db.connect() as conn, conn.cursor() as cur:
        return tally_key(db, cur)


def test_dots_in_schema_or_table_make_distinct_keys(empty_database_url, run_job, sql_exec):
    """Both tables on one database, each with a created_at index and a count budget (so
    validation keeps a tally and may read it): each run counts its own table from
    scratch, none takes the other's tally."""
    for names in (DOTTED, PLAIN):
        demo.build(empty_database_url, demo.DemoShape(rows=104 if names is DOTTED else 208), names)
        weeks = sql.Identifier(names.schema, names.weeks)
        sql_exec(sql.SQL("CREATE INDEX ON {} (created_at)").format(weeks))
    dotted, plain = target(empty_database_url, DOTTED), target(empty_database_url, PLAIN)
    assert key(dotted) != key(plain)
    with dg.instance_for_test() as instance:
        for db, rows in ((dotted, 104), (plain, 208)):
            result = run_job(
                "post_collection_validation",
                # The stored tally is read only when a run may take figures from it.
                {"ops": {"execution_id_population": {"config": {"count_budget_hours": 24}}}},
                instance=instance,
                resources={"target_db": db},
            )
            assert result.success
            meta = materialization_metadata(result, "execution_id_population")
            assert meta["total_rows"] == rows
            assert meta["full_count"] and meta["count_reason"] == "no earlier tally"


def test_hostaddr_is_part_of_the_key(database_url):
    params = conninfo_to_dict(database_url)
    one = make_conninfo("", **{**params, "hostaddr": "127.0.0.1", "host": "db.example"})
    two = make_conninfo("", **{**params, "hostaddr": "127.0.0.2", "host": "db.example"})
    with TargetDatabase(url=database_url).connect() as conn, conn.cursor() as cur:
        assert tally_key(TargetDatabase(url=one), cur) != tally_key(TargetDatabase(url=two), cur)
