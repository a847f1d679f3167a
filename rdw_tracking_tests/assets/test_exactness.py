"""Every figure a validation publishes is the table's, run after run in one Dagster
instance, however the table changed between and during runs; and each premise the
counters rest on is checked at run time, with a case where it fails.

Each case here once made the tally publish a wrong figure as current: a HOT update the
counters did not see, an update committed during a run, an execution's update taken for
its insert. The figures are compared with independent SQL after each run.
"""

import datetime as dt
import os

import dagster as dg
import psycopg
import pytest

from rdw_tracking import premises
from rdw_tracking.assets import verdict
from rdw_tracking.layout import table_layout
from rdw_tracking_tests.assets import test_validation_scale as scale
from rdw_tracking_tests.standby import caught_up

ASSET = "execution_id_population"
BUDGET = {"count_budget_hours": 24}
CREATED_AT_ONLY = "CREATE INDEX plain_created_at ON report_data_weeks (created_at)"
PROJECT_CREATED_AT = (
    "CREATE INDEX idx_report_data_weeks_created_at ON report_data_weeks (created_at, execution_id)"
)
TRUTH = """
SELECT count(*), count(w.execution_id),
       count(*) FILTER (WHERE w.execution_id IS NOT NULL AND e.id IS NULL),
       count(*) FILTER (WHERE w.created_at >= CURRENT_DATE - 7),
       count(w.execution_id) FILTER (WHERE w.created_at >= CURRENT_DATE - 7)
FROM report_data_weeks w LEFT JOIN workflow_executions e ON e.id = w.execution_id
"""
TRUTH_DAYS = """
SELECT DATE(created_at), count(*), count(execution_id) FROM report_data_weeks
WHERE created_at >= CURRENT_DATE - 7 GROUP BY 1
"""


def validate(run_job, instance, **config):
    """(metadata, check results) of a successful post_collection_validation."""
    _, meta, checks = scale.validate(run_job, instance, **config)
    return meta, checks


def assert_exact(sql_exec, meta, checks) -> None:
    """Every published figure equals the table's."""
    total, stamped, orphans, recent, recent_stamped = sql_exec(TRUTH)[0]
    assert (meta["total_rows"], meta["with_execution_id"]) == (total, stamped)
    assert meta["without_execution_id"] == total - stamped
    assert (meta["recent_total_rows"], meta["recent_with_execution_id"]) == (recent, recent_stamped)
    orphan = checks["execution_ids_exist"]
    assert orphan.metadata["orphan_count"].value == orphans
    assert orphan.passed == (orphans == 0)
    daily = {
        row["creation_date"]: (row["total_records"], row["with_execution_id"])
        for row in (r.data for r in meta["daily"].records)
        if row["total_records"]
    }
    assert daily == {d.isoformat(): (n, s) for d, n, s in sql_exec(TRUTH_DAYS)}


def fill_pages_half(sql_exec) -> None:
    """Leave room on every page, so an update that no index forbids is HOT."""
    sql_exec("ALTER TABLE report_data_weeks SET (fillfactor = 50)")
    sql_exec("VACUUM FULL report_data_weeks")


def hot_updates(sql_exec) -> int:
    sql_exec("SELECT pg_stat_force_next_flush()")
    return sql_exec(
        "SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'report_data_weeks'"
    )[0][0]


def test_hot_update_of_old_rows_is_counted(database_url, run_job, sql_exec):
    """Old rows given unknown ids by HOT updates (only a plain created_at index, none on
    execution_id): the next run counts them and execution_ids_exist fails."""
    fill_pages_half(sql_exec)
    sql_exec(CREATED_AT_ONLY)
    with dg.instance_for_test() as instance:
        meta, checks = validate(run_job, instance)
        assert_exact(sql_exec, meta, checks)
        before = hot_updates(sql_exec)
        sql_exec(
            "UPDATE report_data_weeks SET execution_id = gen_random_uuid() "
            "WHERE execution_id IS NULL AND created_at < CURRENT_DATE - 30 "
            "AND id IN (SELECT id FROM report_data_weeks WHERE execution_id IS NULL "
            "AND created_at < CURRENT_DATE - 30 LIMIT 171)"
        )
        assert hot_updates(sql_exec) > before  # the counters' blind spot, really met
        meta, checks = validate(run_job, instance)
        assert_exact(sql_exec, meta, checks)
        assert checks["execution_ids_exist"].metadata["orphan_count"].value >= 171
        assert not checks["execution_ids_exist"].passed
        # Under a budget the HOT premise fails, by name, and every day is counted.
        meta, checks = validate(run_job, instance, **BUDGET)
        assert meta["full_count"]
        assert "no non-summarizing index covers execution_id" in meta["count_reason"]
        assert_exact(sql_exec, meta, checks)


def test_update_committed_during_a_validation_is_counted(
    database_url, run_job, sql_exec, monkeypatch
):
    """An UPDATE of old rows that commits (and reaches the counters) while a validation
    runs: that run does not see it, the next one counts it, by default and under a
    budget."""
    sql_exec(PROJECT_CREATED_AT)
    real_judge = verdict.judge

    def judge_while_rows_change(cur, db, ids):
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute(
                "UPDATE report_data_weeks SET execution_id = NULL "
                "WHERE created_at < CURRENT_DATE - 20 AND execution_id IS NOT NULL"
            )
            other.execute("SELECT pg_stat_force_next_flush()")
        return real_judge(cur, db, ids)

    for config in ({}, BUDGET):
        with dg.instance_for_test() as instance:
            sql_exec(
                "UPDATE report_data_weeks SET execution_id = id WHERE created_at < CURRENT_DATE - 20"
            )
            validate(run_job, instance, **config)
            with monkeypatch.context() as patch:
                patch.setattr(verdict, "judge", judge_while_rows_change)
                validate(run_job, instance, **config)
            meta, checks = validate(run_job, instance, **config)
            assert_exact(sql_exec, meta, checks)


def test_an_updated_execution_is_not_taken_for_a_new_one(database_url, run_job, sql_exec):
    """An orphan's execution arrives late while another execution is only updated: the
    late one's rows stop being orphans at once."""
    sql_exec(PROJECT_CREATED_AT)
    orphan = sql_exec(
        "SELECT w.execution_id FROM report_data_weeks w WHERE w.execution_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id) "
        "LIMIT 1"
    )[0][0]
    existing = sql_exec("SELECT id FROM workflow_executions ORDER BY created_at LIMIT 1")[0][0]
    for config in ({}, BUDGET):
        with dg.instance_for_test() as instance:
            sql_exec("DELETE FROM workflow_executions WHERE id = %s", [orphan])
            validate(run_job, instance, **config)
            sql_exec(
                "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date, "
                "status, execution_id) SELECT collection_id, week_start_date, week_end_date, "
                "'completed', %s FROM report_data_weeks LIMIT 3",
                [existing],
            )
            sql_exec(
                "UPDATE workflow_executions SET status = 'completed' WHERE id = %s", [existing]
            )
            sql_exec(
                "INSERT INTO workflow_executions (id, status, created_at) "
                "VALUES (%s, 'completed', now() - interval '40 days')",
                [orphan],
            )
            meta, checks = validate(run_job, instance, **config)
            assert_exact(sql_exec, meta, checks)


def test_a_session_that_does_not_count_its_writes(database_url, run_job, sql_exec):
    """A session with track_counts off updates old rows: the counters never move, the
    figures follow all the same; a role configured so is named under a budget."""
    sql_exec(PROJECT_CREATED_AT)
    with dg.instance_for_test() as instance:
        validate(run_job, instance)
        with psycopg.connect(database_url, autocommit=True) as quiet:
            quiet.execute("SET track_counts = off")
            quiet.execute(
                "UPDATE report_data_weeks SET execution_id = gen_random_uuid() "
                "WHERE created_at < CURRENT_DATE - 30 AND execution_id IS NULL"
            )
        meta, checks = validate(run_job, instance)
        assert_exact(sql_exec, meta, checks)
    database = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    writer = f"rdw_quiet_writer_{os.getpid()}"
    sql_exec(f'DROP ROLE IF EXISTS "{writer}"')
    sql_exec(f'CREATE ROLE "{writer}"')
    sql_exec(f'ALTER ROLE "{writer}" IN DATABASE "{database}" SET track_counts = off')
    try:
        with dg.instance_for_test() as instance:
            validate(run_job, instance, **BUDGET)
            meta, checks = validate(run_job, instance, **BUDGET)
            assert meta["full_count"]
            assert f"track_counts is turned off for {writer} in {database}" in meta["count_reason"]
            assert_exact(sql_exec, meta, checks)
    finally:
        sql_exec(f'DROP ROLE "{writer}"')


def test_the_budget_is_off_by_default_and_labels_what_it_reuses(database_url, run_job, sql_exec):
    """By default every day is counted each run; under a budget the older days say which
    count they come from, and the orphans are still counted over every row."""
    sql_exec(PROJECT_CREATED_AT)
    sql_exec(
        "CREATE INDEX idx_report_data_weeks_execution_id ON report_data_weeks (execution_id) "
        "WHERE execution_id IS NOT NULL"
    )
    with dg.instance_for_test() as instance:
        for _ in range(2):
            meta, checks = validate(run_job, instance)
            assert meta["full_count"] and "count_budget_hours is 0" in meta["count_reason"]
            sources = [r.data for r in meta["day_sources"].records]
            assert len(sources) == 1 and sources[0]["counted_at"].endswith("(this run)")
        meta, checks = validate(run_job, instance, **BUDGET)  # no counters kept yet
        assert meta["full_count"]
        meta, checks = validate(run_job, instance, **BUDGET)
        assert not meta["full_count"], meta["count_reason"]
        sources = [r.data for r in meta["day_sources"].records]
        assert len(sources) == 2 and sources[0]["counted_at"].endswith("(this run)")
        assert not sources[1]["counted_at"].endswith("(this run)")
        assert_exact(sql_exec, meta, checks)
        # An orphan on an old day, made where the counters cannot see it: still counted.
        with psycopg.connect(database_url, autocommit=True) as quiet:
            quiet.execute("SET track_counts = off")
            quiet.execute(
                "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date, "
                "status, execution_id, created_at) SELECT collection_id, week_start_date, "
                "week_end_date, 'completed', gen_random_uuid(), now() - interval '100 days' "
                "FROM report_data_weeks LIMIT 1"
            )
        meta, checks = validate(run_job, instance, **BUDGET)
        truth = sql_exec(TRUTH)[0]
        assert checks["execution_ids_exist"].metadata["orphan_count"].value == truth[2]
        assert not checks["execution_ids_exist"].passed


def test_brin_does_not_rule_out_hot_from_postgresql_16(database_url, sql_exec):
    """A BRIN index on execution_id stops HOT updates of it only before PostgreSQL 16."""
    sql_exec("CREATE INDEX brin_execution_id ON report_data_weeks USING brin (execution_id)")
    sql_exec(PROJECT_CREATED_AT.replace("(created_at, execution_id)", "(created_at)"))
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        layout = table_layout(cur, "public", "report_data_weeks")
        hints = premises.read_hints(cur, [m.oid for m in layout.leaves])
        if conn.info.server_version >= 160000:
            assert "covers execution_id" in hints.problem
        else:
            assert hints.problem is None
        sql_exec("CREATE INDEX btree_execution_id ON report_data_weeks (execution_id)")
        assert premises.read_hints(cur, [m.oid for m in layout.leaves]).problem is None


FK = (
    "ALTER TABLE report_data_weeks ADD CONSTRAINT fk_report_data_weeks_execution_id "
    "FOREIGN KEY (execution_id) REFERENCES workflow_executions (id)"
)
CLEAR_ORPHANS = """
UPDATE report_data_weeks w SET execution_id = NULL WHERE execution_id IS NOT NULL
AND NOT EXISTS (SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id)
"""


@pytest.mark.parametrize("layout", ["ordinary", "range", "inheritance"])
@pytest.mark.parametrize("indexed", [False, True], ids=["one-pass", "tally"])
def test_a_validated_foreign_key_proves_there_is_no_orphan(
    layout, layout_url, run_job, sql_exec, indexed
):
    """With a validated FK on every table holding rows, execution_ids_exist passes by
    PostgreSQL's proof and says so; with its triggers disabled, or a child it does not
    cover, the orphans are counted."""
    if indexed:
        sql_exec(PROJECT_CREATED_AT)
    sql_exec(CLEAR_ORPHANS)
    sql_exec(FK)  # on an inheritance parent it covers the parent's own rows only
    with dg.instance_for_test() as instance:
        meta, checks = validate(run_job, instance)
        orphans = checks["execution_ids_exist"]
        if layout == "inheritance":
            assert orphans.metadata["orphans_proven_by"].value.startswith("counted")
        else:
            assert "validated foreign key" in orphans.metadata["orphans_proven_by"].value
        assert orphans.passed
        assert_exact(sql_exec, meta, checks)
        # Triggers off (as a superuser may): an orphan gets in, the proof is gone.
        sql_exec("ALTER TABLE report_data_weeks DISABLE TRIGGER ALL")
        leaves = sql_exec(
            "SELECT inhrelid::regclass::text FROM pg_inherits "
            "WHERE inhparent = 'report_data_weeks'::regclass"
        )
        for (leaf,) in leaves:
            sql_exec(f"ALTER TABLE {leaf} DISABLE TRIGGER ALL")
        sql_exec(
            "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date, "
            "status, execution_id, created_at) SELECT collection_id, week_start_date, "
            "week_end_date, 'completed', gen_random_uuid(), created_at FROM report_data_weeks "
            "ORDER BY created_at LIMIT 1"
        )
        meta, checks = validate(run_job, instance)
        orphans = checks["execution_ids_exist"]
        assert orphans.metadata["orphans_proven_by"].value.startswith("counted")
        assert not orphans.passed
        assert_exact(sql_exec, meta, checks)


def test_days_counted_are_those_of_the_snapshot(database_url, run_job, sql_exec):
    """Rows of a closed day deleted between runs: the day's figure drops at once."""
    sql_exec(PROJECT_CREATED_AT)
    day = sql_exec("SELECT CURRENT_DATE - 15")[0][0]
    with dg.instance_for_test() as instance:
        validate(run_job, instance)
        sql_exec("DELETE FROM report_data_weeks WHERE created_at::date = %s", [day])
        meta, checks = validate(run_job, instance)
        assert_exact(sql_exec, meta, checks)
        assert isinstance(day, dt.date)


def test_a_standby_is_validated_exactly(primary_and_standby, run_job, monkeypatch):
    """Validation against a streaming standby, whose counters see none of the writes it
    replays: the figures follow the primary's updates, and a budget says why it cannot
    use the counters there."""
    primary, standby = primary_and_standby
    with psycopg.connect(primary.url("rdw_replica"), autocommit=True) as conn:
        conn.execute(PROJECT_CREATED_AT.replace("INDEX", "INDEX IF NOT EXISTS", 1))
    caught_up(primary)
    monkeypatch.setenv("RDW_DATABASE_URL", standby.url("rdw_replica"))

    def on_standby(statement, params=None):
        with psycopg.connect(standby.url("rdw_replica"), autocommit=True) as conn:
            conn.execute("SET TimeZone = 'UTC'")
            return conn.execute(statement, params).fetchall()

    with dg.instance_for_test() as instance:
        for config in ({}, BUDGET, BUDGET):
            meta, checks = validate(run_job, instance, **config)
            assert_exact(on_standby, meta, checks)
        assert "standby" in meta["count_reason"]
        with psycopg.connect(primary.url("rdw_replica"), autocommit=True) as conn:
            conn.execute(
                "UPDATE report_data_weeks SET execution_id = gen_random_uuid() "
                "WHERE created_at < CURRENT_DATE - 30 AND execution_id IS NULL"
            )
        caught_up(primary)
        for config in ({}, BUDGET):
            meta, checks = validate(run_job, instance, **config)
            assert_exact(on_standby, meta, checks)
            assert not checks["execution_ids_exist"].passed


@pytest.mark.parametrize("layout", ["range", "inheritance"])
def test_a_member_detached_during_a_run(layout, layout_url, run_job, sql_exec, monkeypatch):
    """A partition detached (or a child disinherited) while a run holds its snapshot:
    the run counts the rows its snapshot holds (the DDL waits for it), the next run
    counts the table without them."""
    import threading

    sql_exec(PROJECT_CREATED_AT)
    (member,) = sql_exec(
        "SELECT inhrelid::regclass::text FROM pg_inherits "
        "WHERE inhparent = 'report_data_weeks'::regclass ORDER BY 1 LIMIT 1"
    )[0]
    ddl = (
        f"ALTER TABLE report_data_weeks DETACH PARTITION {member}"
        if layout == "range"
        else f"ALTER TABLE {member} NO INHERIT report_data_weeks"
    )
    real_judge = verdict.judge
    worker = threading.Thread(target=sql_exec, args=(ddl,))

    def judge_while_detaching(cur, db, ids):
        worker.start()
        worker.join(timeout=1)  # it waits for this run's lock
        return real_judge(cur, db, ids)

    with dg.instance_for_test() as instance:
        validate(run_job, instance)
        before = sql_exec(TRUTH)[0]
        with monkeypatch.context() as patch:
            patch.setattr(verdict, "judge", judge_while_detaching)
            meta, checks = validate(run_job, instance)
        assert (meta["total_rows"], meta["with_execution_id"]) == before[:2]
        worker.join(timeout=30)
        assert not worker.is_alive()
        assert sql_exec(TRUTH)[0][0] < before[0]  # the member's rows left the table
        meta, checks = validate(run_job, instance)
        assert_exact(sql_exec, meta, checks)
