"""The rollback and the restore as a production team runs them: row-level security, rows
a partition manager moves, update triggers, clock skew (issue 25)."""

import logging
import os

import dagster as dg
import psycopg
import pytest

from rdw_tracking.assets.restore import RestoreConfig
from rdw_tracking.assets.restore import restore as run_restore
from rdw_tracking.assets.rollback import RollbackConfig, rollback
from rdw_tracking.demo_layouts import relayout
from rdw_tracking.layout import table_layout
from rdw_tracking.resources import TargetDatabase
from rdw_tracking_tests.assets.test_rollback import add_recent_rows, days_ago
from rdw_tracking_tests.conftest import database_checksums

LOG = logging.getLogger("rdw_tracking_tests.real_world")
CUTOFF = days_ago(40)
MATCHED_IDS = (
    "SELECT id FROM report_data_weeks WHERE execution_id IS NOT NULL "
    "AND created_at >= %s::date AND created_at < %s"
)
ROWS = "SELECT tableoid::regclass::text, id, execution_id, updated_at FROM report_data_weeks"
# What a role needs for both jobs on every layout, backup tables created by itself.
WRITER_GRANTS = (
    "GRANT USAGE, CREATE ON SCHEMA public TO {role}",
    "GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}",
)
# A quarter of the rows (ids starting 0-3) hidden from every command.
HIDING = "CREATE POLICY hide_some ON {table} USING (id::text >= '4')"
POLICIES = {
    "hiding": HIDING,
    # every row visible, none updatable: no UPDATE policy means no row may be updated
    "select_only": "CREATE POLICY read_all ON {table} FOR SELECT USING (true)",
    # every row visible and updatable, but no row may be written with a NULL execution_id
    "with_check": (
        "CREATE POLICY keep_ids ON {table} USING (true) WITH CHECK (execution_id IS NOT NULL)"
    ),
}
POLICY_NAMES = {"hiding": "hide_some", "select_only": "read_all", "with_check": "keep_ids"}


def leaf_name(url: str, layout: str) -> str:
    """The table that gets the policy: the table itself, or one of its physical tables
    holding matched rows (a partition or child)."""
    if layout == "ordinary":
        return "report_data_weeks"
    with psycopg.connect(url) as conn:
        found = table_layout(conn, "public", "report_data_weeks")
        counts = {
            leaf.name: conn.execute(
                f'SELECT count(*) FROM ONLY "{leaf.name}" WHERE execution_id IS NOT NULL '  # noqa: S608
                "AND created_at >= %s::date",
                [CUTOFF],
            ).fetchone()[0]
            for leaf in found.leaves
        }
    return max(counts, key=counts.get)


def with_policy(sql_exec, table: str, policy: str, force: bool = False) -> None:
    sql_exec(POLICIES[policy].format(table=f'"{table}"'))
    sql_exec(f'ALTER TABLE "{table}" ENABLE ROW LEVEL SECURITY')
    if force:
        sql_exec(f'ALTER TABLE "{table}" FORCE ROW LEVEL SECURITY')


def refusal_of(call) -> dg.Failure:
    with pytest.raises(dg.Failure) as failure:
        call()
    return failure.value


# (layout, where the policy sits, which policy); "owner" runs as the table's owner, under
# FORCE ROW LEVEL SECURITY.
RLS_CASES = [
    ("ordinary", "table", "hiding"),
    ("ordinary", "owner", "hiding"),
    ("range", "leaf", "hiding"),
    ("list", "table", "select_only"),
    ("hash", "leaf", "with_check"),
    ("inheritance", "leaf", "hiding"),
    ("ordinary", "table", "select_only"),
    ("ordinary", "table", "with_check"),
]


@pytest.mark.parametrize(("layout", "where", "policy"), RLS_CASES)
def test_row_security_refuses_before_any_change(
    database_url, role_url, sql_exec, layout, where, policy
):
    # database_url is already in `layout` (conftest copies its template)
    # A finished rollback to restore, made before the policy (as the superuser).
    admin = TargetDatabase(url=database_url)
    done = rollback(admin, RollbackConfig(cutoff_date=days_ago(10), dry_run=False), LOG)
    assert done.cleared_rows > 0
    role = role_url(*WRITER_GRANTS)
    user = psycopg.conninfo.conninfo_to_dict(role)["user"]
    table = leaf_name(database_url, layout) if where == "leaf" else "report_data_weeks"
    if where == "owner":
        sql_exec(f'ALTER TABLE report_data_weeks OWNER TO "{user}"')
    with_policy(sql_exec, table, policy, force=where == "owner")
    before = database_checksums(database_url)
    db = TargetDatabase(url=role)
    for dry_run in (True, False):
        config = RollbackConfig(cutoff_date=CUTOFF, dry_run=dry_run)
        failure = refusal_of(lambda config=config: rollback(db, config, LOG))
        text = failure.description
        assert f"policy {POLICY_NAMES[policy]} FOR" in text, text
        assert f"public.{table}" in text and f"role {user}" in text, text
        assert "visible_rows_only" in text
        restore = RestoreConfig(dry_run=dry_run)
        failure = refusal_of(lambda restore=restore: run_restore(db, restore, LOG))
        assert f"policy {POLICY_NAMES[policy]} FOR" in failure.description
        assert f"public.{table}" in failure.description
    assert database_checksums(database_url) == before


@pytest.mark.parametrize("layout", ["ordinary", "range", "inheritance"])
def test_visible_rows_only_clears_the_visible_rows_and_no_other(
    database_url, role_url, sql_exec, layout
):
    # database_url is already in `layout` (conftest copies its template)
    role = role_url(*WRITER_GRANTS)
    table = leaf_name(database_url, layout)
    with_policy(sql_exec, table, "hiding")
    original = sorted(sql_exec(ROWS))
    db = TargetDatabase(url=role)
    config = RollbackConfig(cutoff_date=CUTOFF, dry_run=False, visible_rows_only=True)
    report = rollback(db, config, LOG)
    # through the parent, a partition's policy does not apply: the scan counts its hidden
    # rows, which the batches (on the partition itself) cannot touch
    assert report.cleared_rows > 0
    assert report.cleared_rows + report.rows_left == report.matched_rows
    now = {r[1]: r for r in sql_exec(ROWS)}
    changed = {r[1] for r in original if now[r[1]] != r}
    hidden = {r[1] for r in original if r[0] in (table, f"public.{table}") and str(r[1]) < "4"}
    assert hidden and not changed & hidden
    assert len(changed) == report.cleared_rows
    if layout != "ordinary":
        assert report.rows_left == len(
            {r[1] for r in original if r[1] in hidden and r[2] is not None}
            & {r[0] for r in sql_exec(MATCHED_IDS, [CUTOFF, report.upper_bound])}
        )
    back = run_restore(db, RestoreConfig(dry_run=False, visible_rows_only=True), LOG)
    assert back.restored_rows == report.cleared_rows
    assert sorted(sql_exec(ROWS)) == original


def test_a_role_that_bypasses_row_security_is_not_refused(database_url, role_url, sql_exec):
    role = role_url(*WRITER_GRANTS)
    user = psycopg.conninfo.conninfo_to_dict(role)["user"]
    sql_exec(f'ALTER ROLE "{user}" BYPASSRLS')
    with_policy(sql_exec, "report_data_weeks", "hiding")
    expected = sql_exec(
        "SELECT count(*) FROM report_data_weeks WHERE execution_id IS NOT NULL "
        "AND created_at >= %s::date",
        [CUTOFF],
    )[0][0]
    report = rollback(TargetDatabase(url=role), RollbackConfig(cutoff_date=CUTOFF), LOG)
    assert report.matched_rows == expected


# -- rows a partition manager moves (delete + insert, same id) -----------------------------

# What partition_data_proc-style maintenance does: the DEFAULT partition's rows of the
# current month go into a partition of their own, created for them.
MOVE_OUT_OF_DEFAULT = """
BEGIN;
CREATE TABLE report_data_weeks_pnow (LIKE report_data_weeks INCLUDING DEFAULTS);
WITH moved AS (
    DELETE FROM report_data_weeks_default
    WHERE created_at >= date_trunc('month', now()) RETURNING *)
INSERT INTO report_data_weeks_pnow SELECT * FROM moved;
ALTER TABLE report_data_weeks ATTACH PARTITION report_data_weeks_pnow
    FOR VALUES FROM (date_trunc('month', now())) TO (date_trunc('month', now()) + interval '1 month');
COMMIT;
"""
KEYED = "SELECT id, execution_id, updated_at FROM report_data_weeks"


def default_partition(sql_exec) -> str:
    (name,) = sql_exec(
        "SELECT c.relname FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partdefid "
        "WHERE p.partrelid = 'report_data_weeks'::regclass"
    )[0]
    return name


def move_out_of_default(sql_exec) -> int:
    """Move the DEFAULT partition's current-month rows into a new partition; how many."""
    moving = sql_exec(
        "SELECT count(*) FROM report_data_weeks_default "
        "WHERE created_at >= date_trunc('month', now())"
    )[0][0]
    with psycopg.connect(os.environ["RDW_DATABASE_URL"], autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute(MOVE_OUT_OF_DEFAULT)
    return moving


@pytest.fixture
def range_with_default(database_url, sql_exec) -> str:
    relayout(database_url, "range")
    assert default_partition(sql_exec) == "report_data_weeks_default"
    return database_url


def test_restore_finds_rows_moved_to_another_partition(range_with_default, sql_exec):
    db = TargetDatabase(url=range_with_default)
    original = sorted(sql_exec(KEYED))
    report = rollback(db, RollbackConfig(cutoff_date=CUTOFF, dry_run=False), LOG)
    assert report.cleared_rows == report.matched_rows > 0
    moved = move_out_of_default(sql_exec)
    assert moved > 0
    # and one row deleted for good: the only one the restore may call missing
    sql_exec(
        "DELETE FROM report_data_weeks WHERE id = "
        "(SELECT id FROM execution_id_rollback_backup ORDER BY seq LIMIT 1)"
    )
    dry = run_restore(db, RestoreConfig(), LOG)
    assert (dry.missing_rows, dry.moved_rows) == (1, moved)
    back = run_restore(db, RestoreConfig(dry_run=False, batch_size=100), LOG)
    assert (back.missing_rows, back.moved_rows, back.skipped_rows) == (1, moved, 0)
    assert back.restored_rows == report.cleared_rows - 1
    deleted = {r[0] for r in original} - {r[0] for r in sql_exec(KEYED)}
    assert len(deleted) == 1
    assert sorted(sql_exec(KEYED)) == [r for r in original if r[0] not in deleted]


def test_rows_moved_during_a_rollback_end_it_failed_and_the_rerun_finishes(
    range_with_default, sql_exec, monkeypatch
):
    from rdw_tracking.rollback import walk

    db = TargetDatabase(url=range_with_default)
    original = sorted(sql_exec(KEYED))
    real_wait = walk.wait_for_wal_room
    moved = {}

    def move_before_the_first_batch(conn, most):
        if not moved:
            moved["rows"] = move_out_of_default(sql_exec)
        return real_wait(conn, most)

    monkeypatch.setattr(walk, "wait_for_wal_room", move_before_the_first_batch)
    config = RollbackConfig(cutoff_date=CUTOFF, dry_run=False, batch_size=100)
    with pytest.raises(dg.Failure) as failure:
        rollback(db, config, LOG)
    matched_moved = sql_exec(
        "SELECT count(*) FROM report_data_weeks_pnow WHERE execution_id IS NOT NULL"
    )[0][0]
    assert moved["rows"] > 0 and matched_moved > 0
    assert f"public.report_data_weeks_pnow ({matched_moved:,})" in failure.value.description
    assert failure.value.metadata["rows_left"].value == matched_moved
    again = rollback(db, config, LOG)
    assert again.resumed and again.cleared_rows == again.matched_rows
    assert not sql_exec(
        "SELECT 1 FROM report_data_weeks WHERE execution_id IS NOT NULL "
        "AND created_at >= %s::date AND created_at < %s",
        [CUTOFF, again.upper_bound],
    )
    back = run_restore(db, RestoreConfig(dry_run=False), LOG)
    assert back.restored_rows == again.cleared_rows and back.missing_rows == 0
    assert sorted(sql_exec(KEYED)) == original


# -- update triggers, clock skew ------------------------------------------------------------

TOUCH = """
CREATE FUNCTION touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at = clock_timestamp(); RETURN NEW; END $$;
CREATE TRIGGER set_updated_at BEFORE UPDATE ON report_data_weeks
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
"""


@pytest.mark.parametrize("layout", ["ordinary", "range", "inheritance"])
def test_update_triggers_are_named_with_what_restore_cannot_give_back(
    database_url, sql_exec, layout, caplog
):
    # database_url is already in `layout` (conftest copies its template)
    sql_exec(TOUCH)
    if layout == "inheritance":  # child tables inherit no trigger: each gets its own
        for (child,) in sql_exec(
            "SELECT inhrelid::regclass::text FROM pg_inherits "
            "WHERE inhparent = 'report_data_weeks'::regclass"
        ):
            sql_exec(
                f"CREATE TRIGGER set_updated_at BEFORE UPDATE ON {child} "
                "FOR EACH ROW EXECUTE FUNCTION touch_updated_at()"
            )
    db = TargetDatabase(url=database_url)
    original = {r[0]: r for r in sql_exec(KEYED)}
    with caplog.at_level(logging.WARNING):
        dry = rollback(db, RollbackConfig(cutoff_date=CUTOFF), LOG)
    assert "set_updated_at" in dry.metadata()["update_triggers"]
    assert any("restore gives back execution_id exactly, but not" in m for m in caplog.messages)
    done = rollback(db, RollbackConfig(cutoff_date=CUTOFF, dry_run=False), LOG)
    preview = run_restore(db, RestoreConfig(), LOG)
    assert "set_updated_at" in preview.metadata()["update_triggers"]
    back = run_restore(db, RestoreConfig(dry_run=False), LOG)
    assert back.restored_rows == done.cleared_rows > 0
    now = {r[0]: r for r in sql_exec(KEYED)}
    # execution_id exactly back on every row; updated_at is the trigger's where it fired
    assert {k: r[1] for k, r in now.items()} == {k: r[1] for k, r in original.items()}
    differs = {k for k in now if now[k][2] != original[k][2]}
    backed_up = {r[0] for r in sql_exec("SELECT id FROM execution_id_rollback_backup")}
    assert differs <= backed_up and differs


def test_rows_updated_in_the_future_are_counted_in_the_dry_run(database_url, sql_exec, caplog):
    skewed = sql_exec(
        "UPDATE report_data_weeks SET updated_at = now() + interval '2 hours' WHERE id IN "
        "(SELECT id FROM report_data_weeks WHERE execution_id IS NOT NULL "
        " AND created_at >= %s::date ORDER BY id LIMIT 17) RETURNING id",
        [CUTOFF],
    )
    assert len(skewed) == 17
    db = TargetDatabase(url=database_url)
    matched = sql_exec(
        "SELECT count(*) FROM report_data_weeks WHERE execution_id IS NOT NULL "
        "AND created_at >= %s::date AND updated_at < now()",
        [CUTOFF],
    )[0][0]
    with caplog.at_level(logging.WARNING):
        dry = rollback(db, RollbackConfig(cutoff_date=CUTOFF), LOG)
    meta = dry.metadata()
    assert meta["matched_rows"] == matched
    assert meta["future_updated_at_rows"] == meta["updated_since_start_rows"] == 17
    said = [m for m in caplog.messages if "17 rows of public.report_data_weeks" in m]
    assert said and "updated_at in the future" in said[0] and "skipped" in said[0]
    # the real run leaves them alone, as the dry run said
    done = rollback(db, RollbackConfig(cutoff_date=CUTOFF, dry_run=False), LOG)
    assert done.cleared_rows == matched
    ids = [r[0] for r in skewed]
    assert sql_exec(
        "SELECT count(*) FROM report_data_weeks WHERE id = ANY(%s) AND execution_id IS NOT NULL",
        [ids],
    ) == [(17,)]


# -- the restore's batches: paced like the rollback's, planned for their own values ---------

SLOW_UPDATES = """
CREATE FUNCTION slow_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$;
CREATE TRIGGER slow_update BEFORE UPDATE ON report_data_weeks
    FOR EACH ROW EXECUTE FUNCTION slow_update();
"""


def test_restore_batches_follow_the_time_aim_and_the_backup_is_analyzed(database_url, sql_exec):
    add_recent_rows(sql_exec, 1_600)
    db = TargetDatabase(url=database_url)
    original = sorted(sql_exec(KEYED))
    done = rollback(db, RollbackConfig(cutoff_date=days_ago(300), dry_run=False), LOG)
    assert done.cleared_rows > 1_600
    # the backup has statistics before any restore plans a batch over it
    assert sql_exec(
        "SELECT reltuples FROM pg_class WHERE oid = 'execution_id_rollback_backup'::regclass"
    ) == [(float(done.cleared_rows),)]
    sql_exec(SLOW_UPDATES)  # each restored row now takes over 1 ms
    back = run_restore(db, RestoreConfig(dry_run=False, batch_size=5_000), LOG)
    assert back.restored_rows == done.cleared_rows
    # not one batch of batch_size rows: a probe, then batches cut to about 100 ms
    assert back.batches >= 3, back.metadata()
    sql_exec("DROP TRIGGER slow_update ON report_data_weeks")
    assert sorted(sql_exec(KEYED)) == original
