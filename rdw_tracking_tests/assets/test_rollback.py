"""Rollback cleanup and restore on a real PostgreSQL: nothing lost, nothing extra touched."""

import datetime as dt
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psycopg
import pytest

from rdw_tracking.assets.rollback import RollbackConfig, parse_cutoff
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.rollback import ROLLBACK_APPLICATION_NAME
from rdw_tracking.rollback.walk import BlockWalk
from rdw_tracking_tests.conftest import (
    create_database,
    drop_database,
    launch_refusal,
    materialization_metadata,
    step_failure_messages,
)

TODAY = dt.datetime.now(dt.timezone.utc).date()
BACKUP = "public.execution_id_rollback_backup"
# The whole row: a checksum of the table as a user sees it.
TABLE_CHECKSUM = (
    "SELECT md5(string_agg(t::text, ',' ORDER BY t.id)) FROM public.report_data_weeks t"
)


def days_ago(days: int) -> str:
    return (TODAY - dt.timedelta(days=days)).isoformat()


def rollback_config(**config) -> dict:
    return {"ops": {"execution_id_rollback": {"config": config}}}


def restore_config(**config) -> dict:
    return {"ops": {"execution_id_restore": {"config": config}}}


def checksum(sql_exec, url: str | None = None) -> str:
    return sql_exec(TABLE_CHECKSUM, url=url)[0][0]


def backup_exists(sql_exec, url: str | None = None) -> bool:
    return sql_exec("SELECT to_regclass(%s) IS NOT NULL", [BACKUP], url=url)[0][0]


def predicted_ids(sql_exec, cutoff: str, bound: str) -> set:
    """The spec's own predicate, written independently of the asset."""
    rows = sql_exec(
        "SELECT id FROM report_data_weeks WHERE execution_id IS NOT NULL "
        "AND created_at >= %s::date AND created_at < %s::timestamptz",
        [cutoff, bound],
    )
    return {r[0] for r in rows}


def add_recent_rows(sql_exec, rows: int) -> None:
    """`rows` more tracked rows from the last two weeks, densely at the end of the heap."""
    sql_exec(
        """
        INSERT INTO report_data_weeks (id, collection_id, week_start_date, week_end_date,
            status, execution_id, data, created_at, updated_at)
        SELECT md5('rdw-extra:' || g)::uuid,
               (SELECT id FROM report_data_collections ORDER BY id LIMIT 1),
               current_date - 7, current_date - 1, 'completed',
               md5('rdw-exec:' || g %% 40)::uuid, jsonb_build_object('extra', g),
               now() - make_interval(secs => g * 50), now() - make_interval(secs => g * 50)
        FROM generate_series(1, %s) AS g
        """,
        [rows],
    )
    sql_exec("VACUUM ANALYZE report_data_weeks")


@contextmanager
def last_matched_row_locked(url: str, cutoff: str, sql_exec) -> Iterator[None]:
    """Once the walk has begun, another session takes the row lock of the matched row the
    walk reaches last: the run stalls there, retrying under lock_timeout, and the block
    strikes while it waits. (Taken before the run, the lock's transaction would be one the
    run waits out before it starts.) Without it a fault aimed at "mid-run" raced the run,
    and lost once batches got fast."""
    deadline = time.monotonic() + 30
    while not backup_exists(sql_exec) or not sql_exec(f"SELECT 1 FROM {BACKUP} LIMIT 1"):  # noqa: S608
        assert time.monotonic() < deadline, "the walk never began"
        time.sleep(0.002)
    conn = psycopg.connect(url)
    try:
        conn.execute(
            "SELECT 1 FROM report_data_weeks WHERE execution_id IS NOT NULL "
            "AND created_at >= %s::date ORDER BY ctid DESC LIMIT 1 FOR UPDATE",
            [cutoff],
        )
        while not rollback_waits_on_a_lock(sql_exec):
            assert time.monotonic() < deadline, "the walk never reached the locked row"
            time.sleep(0.005)
        yield
    finally:
        with suppress(psycopg.Error):
            conn.close()


def rollback_waits_on_a_lock(sql_exec) -> bool:
    """Whether the rollback's batch connection is waiting for a lock."""
    return bool(
        sql_exec(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = %s AND wait_event_type = 'Lock'",
            [ROLLBACK_APPLICATION_NAME],
        )[0][0]
    )


# -- pure functions ---------------------------------------------------------------------


def test_parse_cutoff():
    assert parse_cutoff("2025-03-01", dt.date(2025, 3, 1)) == dt.date(2025, 3, 1)
    for bad in ["2025-13-01", "01/03/2025", "20250301", "yesterday", ""]:
        with pytest.raises(ValueError, match="not an ISO date"):
            parse_cutoff(bad, dt.date(2025, 3, 1))
    with pytest.raises(ValueError, match="in the future"):
        parse_cutoff("2025-03-02", dt.date(2025, 3, 1))


def walk_all(blocks, sizes, from_block=0):
    walk, ranges = BlockWalk(blocks, from_block), []
    while not walk.done:
        ranges.append(walk.next(sizes[min(len(ranges), len(sizes) - 1)]))
    return ranges


def test_block_walk_tiles_from_the_cursor():
    blocks = [(0, 60), (1, 60), (5, 60), (9, 10), (12, 100)]
    assert walk_all(blocks, [100]) == [(0, 1), (1, 5), (5, 12), (12, 13)]
    assert walk_all([], [100], 7) == []
    # A block fuller than a batch is a batch of its own, never split.
    assert walk_all([(3, 250), (4, 1)], [100], 3) == [(3, 4), (4, 5)]
    # Resuming: the walk starts at the saved block, whatever the plan held before it.
    assert walk_all(blocks, [100], 5) == [(5, 12), (12, 13)]


def test_block_walk_takes_each_batch_at_its_own_size():
    blocks = [(b, 10) for b in range(10)]
    # 20 rows, then 50, then 10 for the rest: still one tiling of blocks 0-9.
    assert walk_all(blocks, [20, 50, 10]) == [(0, 2), (2, 7), (7, 8), (8, 9), (9, 10)]


def test_config_bounds():
    with pytest.raises(ValueError, match="batch_size"):
        RollbackConfig(cutoff_date="2024-01-01", batch_size=0)
    assert RollbackConfig(cutoff_date=" 2024-01-01").cutoff == dt.date(2024, 1, 1)
    assert RollbackConfig(cutoff_date="2024-01-01").dry_run is True


# -- the rollback -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,expected",
    [
        ({"cutoff_date": "2025-13-01"}, "not an ISO date"),
        ({"cutoff_date": "last week"}, "not an ISO date"),
        ({"cutoff_date": (TODAY + dt.timedelta(days=1)).isoformat()}, "in the future"),
        ({"cutoff_date": days_ago(30), "batch_size": 0}, "batch_size must be between"),
        ({"cutoff_date": days_ago(30), "batch_size": 10**9}, "batch_size must be between"),
    ],
)
def test_bad_config_is_refused_before_touching_the_database(
    database_url, sql_exec, run_job, config, expected
):
    before = checksum(sql_exec)
    message = launch_refusal(
        run_job, "rollback_execution_id", rollback_config(dry_run=False, **config)
    )
    assert expected in message and "ops.execution_id_rollback.config" in message
    assert checksum(sql_exec) == before
    assert not backup_exists(sql_exec)


def test_dry_run_changes_nothing(database_url, sql_exec, run_job):
    before = checksum(sql_exec)
    result = run_job("rollback_execution_id", rollback_config(cutoff_date=days_ago(30)))
    assert result.success
    meta = materialization_metadata(result, "execution_id_rollback")
    assert meta["dry_run"] is True
    assert meta["cleared_rows"] == 0 and meta["rollback_id"] is None
    expected = predicted_ids(sql_exec, days_ago(30), meta["upper_bound"])
    assert meta["matched_rows"] == len(expected) > 0
    assert sum(r.data["matched_rows"] for r in meta["daily"].records) == len(expected)
    assert meta["estimated_seconds"] >= 0
    assert checksum(sql_exec) == before
    assert not backup_exists(sql_exec)


def test_real_run_clears_exactly_the_predicted_rows_and_backs_each_up(
    database_url, sql_exec, run_job
):
    cutoff = days_ago(30)
    original = {
        r[0]: r[1:] for r in sql_exec("SELECT id, execution_id, updated_at FROM report_data_weeks")
    }
    # Every row there is was created before the run starts.
    expected = predicted_ids(sql_exec, cutoff, "infinity")
    result = run_job(
        "rollback_execution_id", rollback_config(cutoff_date=cutoff, dry_run=False, batch_size=100)
    )
    assert result.success, step_failure_messages(result)
    meta = materialization_metadata(result, "execution_id_rollback")
    assert not predicted_ids(sql_exec, cutoff, meta["upper_bound"])  # none left
    cleared = {
        r[0]
        for r in sql_exec(
            "SELECT id FROM report_data_weeks WHERE execution_id IS NULL AND updated_at >= %s",
            [meta["upper_bound"]],
        )
    }
    assert cleared == expected
    assert meta["matched_rows"] == meta["cleared_rows"] == len(expected)
    assert meta["batches"] >= len(expected) // 100
    assert meta["wal_bytes"] > 0 and meta["longest_batch_ms"] > 0
    backup = sql_exec(
        f"SELECT id, execution_id, updated_at, rollback_id::text FROM {BACKUP}"  # noqa: S608
    )
    assert {r[0]: (r[1], r[2]) for r in backup} == {i: original[i] for i in expected}
    assert {r[3] for r in backup} == {meta["rollback_id"]}
    # Nothing else changed: every other row is as it was.
    after = {
        r[0]: r[1:] for r in sql_exec("SELECT id, execution_id, updated_at FROM report_data_weeks")
    }
    assert {i: v for i, v in after.items() if i not in expected} == {
        i: v for i, v in original.items() if i not in expected
    }
    # A second run finds nothing left and changes nothing.
    again = run_job("rollback_execution_id", rollback_config(cutoff_date=cutoff, dry_run=False))
    meta2 = materialization_metadata(again, "execution_id_rollback")
    assert meta2["matched_rows"] == 0 and meta2["rollback_id"] is None


def test_expected_rows_mismatch_aborts_with_nothing_changed(database_url, sql_exec, run_job):
    before = checksum(sql_exec)
    dry = run_job("rollback_execution_id", rollback_config(cutoff_date=days_ago(30)))
    matched = materialization_metadata(dry, "execution_id_rollback")["matched_rows"]
    result = run_job(
        "rollback_execution_id",
        rollback_config(cutoff_date=days_ago(30), dry_run=False, expected_rows=matched + 1),
    )
    assert not result.success
    assert any("expected_rows" in m and "nothing was changed" in m for m in _failures(result))
    assert checksum(sql_exec) == before
    assert not backup_exists(sql_exec)


def test_real_run_that_matches_nothing_leaves_nothing(database_url, sql_exec, run_job):
    sql_exec(
        "UPDATE report_data_weeks SET execution_id = NULL WHERE created_at >= %s", [days_ago(3)]
    )
    before = checksum(sql_exec)
    result = run_job(
        "rollback_execution_id", rollback_config(cutoff_date=days_ago(3), dry_run=False)
    )
    assert result.success
    meta = materialization_metadata(result, "execution_id_rollback")
    assert meta["matched_rows"] == meta["cleared_rows"] == 0 and meta["rollback_id"] is None
    assert checksum(sql_exec) == before
    assert not backup_exists(sql_exec)


def test_concurrent_writer_loses_nothing(database_url, sql_exec, run_job):
    add_recent_rows(sql_exec, 8_000)
    cutoff = days_ago(20)
    targets = [
        r[0]
        for r in sql_exec(
            "SELECT id FROM report_data_weeks WHERE execution_id IS NOT NULL AND created_at >= %s "
            "ORDER BY md5(id::text) LIMIT 600",
            [cutoff],
        )
    ]
    inserted: dict = {}
    touched: list = []
    reprocessed: list = []
    stop = threading.Event()

    def writer():
        collection = sql_exec("SELECT id FROM report_data_collections LIMIT 1")[0][0]
        with psycopg.connect(database_url, autocommit=True) as conn:
            for i, target in enumerate(targets):
                if stop.is_set():
                    break
                new_id, execution_id = uuid.uuid4(), uuid.uuid4()
                conn.execute(
                    "INSERT INTO report_data_weeks (id, collection_id, week_start_date, "
                    "week_end_date, status, execution_id) "
                    "VALUES (%s, %s, current_date, current_date + 6, 'completed', %s)",
                    [new_id, collection, execution_id],
                )
                inserted[new_id] = execution_id
                if i % 2:  # the application's own update: new data, updated_at bumped
                    conn.execute(
                        "UPDATE report_data_weeks SET data = '{\"rewritten\": true}', "
                        "updated_at = now() WHERE id = %s",
                        [target],
                    )
                    touched.append(target)
                else:  # a maintenance update that leaves updated_at alone
                    conn.execute(
                        "UPDATE report_data_weeks SET status = 'reprocessed' WHERE id = %s",
                        [target],
                    )
                    reprocessed.append(target)
                time.sleep(0.002)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.1)
    result = run_job(
        "rollback_execution_id", rollback_config(cutoff_date=cutoff, dry_run=False, batch_size=100)
    )
    stop.set()
    thread.join()
    assert result.success, step_failure_messages(result)
    meta = materialization_metadata(result, "execution_id_rollback")
    bound = meta["upper_bound"]
    assert len(inserted) > 20 and touched and reprocessed

    # Its new rows keep their ids: those created during the run untouched, those created
    # before it started cleared like any other and backed up with their id.
    rows = sql_exec(
        "SELECT w.id, w.created_at >= %s, coalesce(w.execution_id, b.execution_id), "
        f"b.id IS NOT NULL FROM report_data_weeks w LEFT JOIN {BACKUP} b USING (id) "  # noqa: S608
        "WHERE w.id = ANY(%s)",
        [bound, list(inserted)],
    )
    assert {r[0]: r[2] for r in rows} == inserted
    during = [r for r in rows if r[1]]
    assert len(during) > 20 and not any(r[3] for r in during)
    # Its updates stand; a row it rewrote was either cleared (and backed up) before that,
    # or left alone by the run.
    for target, execution_id, data, backed_up in sql_exec(
        f"SELECT w.id, w.execution_id, w.data, b.id IS NOT NULL "  # noqa: S608
        f"FROM report_data_weeks w LEFT JOIN {BACKUP} b USING (id) WHERE w.id = ANY(%s)",
        [touched],
    ):
        assert data == {"rewritten": True}
        assert execution_id is not None or backed_up, target
    statuses = sql_exec(
        "SELECT DISTINCT status FROM report_data_weeks WHERE id = ANY(%s)", [reprocessed]
    )
    assert statuses == [("reprocessed",)]
    # Every cleared row is backed up, no row created during the run was touched, and
    # nothing the run should have cleared is left.
    assert sql_exec(
        f"SELECT count(*), count(*) FILTER (WHERE w.execution_id IS NULL), "  # noqa: S608
        f"count(*) FILTER (WHERE w.created_at >= %s) "
        f"FROM {BACKUP} b JOIN report_data_weeks w USING (id)",
        [bound],
    )[0] == (meta["cleared_rows"], meta["cleared_rows"], 0)
    assert sql_exec(
        "SELECT count(*) FROM report_data_weeks WHERE execution_id IS NOT NULL "
        "AND created_at >= %s AND created_at < %s AND updated_at < %s",
        [cutoff, bound, bound],
    ) == [(0,)]


def _failures(result) -> list[str]:
    return [
        str(e.event_specific_data.error.message)
        + str(e.event_specific_data.error.cause and e.event_specific_data.error.cause.message)
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE"
    ]


def assert_rerun_ends_like_twin(run_job, config, matched, done, sql_exec, twin_url) -> None:
    """The rerun after an interrupted rollback continues it and ends as the uninterrupted
    twin did: same table, same backup."""
    second = run_job("rollback_execution_id", config)
    assert second.success, step_failure_messages(second)
    meta = materialization_metadata(second, "execution_id_rollback")
    assert meta["resumed"] is True
    assert meta["matched_rows"] == meta["cleared_rows"] == matched
    assert meta["cleared_this_run"] == matched - done
    assert _comparable(sql_exec, os.environ["RDW_DATABASE_URL"]) == _comparable(sql_exec, twin_url)


def _comparable(sql_exec, url: str) -> tuple:
    """Checksums of the table and the backup that don't depend on when the run ran:
    a cleared row's updated_at is the run's own clock, checked against its backup."""
    table = sql_exec(
        f"""
        SELECT md5(string_agg((to_jsonb(t) - 'updated_at')::text
                   || CASE WHEN b.id IS NULL THEN t.updated_at::text
                           WHEN t.updated_at = b.cleared_at THEN 'cleared' ELSE 'wrong' END,
                   ',' ORDER BY t.id))
        FROM report_data_weeks t LEFT JOIN {BACKUP} b USING (id)
        """,  # noqa: S608
        url=url,
    )[0][0]
    backup = sql_exec(
        f"SELECT md5(string_agg(id || '|' || execution_id || '|' || updated_at, ',' "  # noqa: S608
        f"ORDER BY id)), count(*), count(DISTINCT rollback_id) FROM {BACKUP}",
        url=url,
    )[0]
    return table, backup


def test_killed_connection_then_rerun_ends_as_an_uninterrupted_run(
    admin_url, database_url, sql_exec, run_job
):
    add_recent_rows(sql_exec, 6_000)
    twin_name = f"rdw_test_{os.getpid()}_twin"
    twin_url = create_database(
        admin_url, twin_name, template=psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    )
    try:
        cutoff = days_ago(20)
        config = rollback_config(cutoff_date=cutoff, dry_run=False, batch_size=100)
        twin = run_job(
            "rollback_execution_id", config, resources={"target_db": TargetDatabase(url=twin_url)}
        )
        assert twin.success, step_failure_messages(twin)
        matched = materialization_metadata(twin, "execution_id_rollback")["matched_rows"]

        killed = threading.Event()

        def killer():
            with last_matched_row_locked(database_url, cutoff, sql_exec):
                sql_exec(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND datname = current_database()",
                    [ROLLBACK_APPLICATION_NAME],
                )
                killed.set()

        thread = threading.Thread(target=killer)
        thread.start()
        first = run_job("rollback_execution_id", config)
        thread.join()
        assert killed.is_set() and not first.success
        assert any("run rollback_execution_id again" in m for m in _failures(first))
        done = sql_exec(f"SELECT count(*) FROM {BACKUP}")[0][0]  # noqa: S608
        assert 0 < done < matched  # stopped mid-way, every finished batch backed up
        assert sql_exec(
            "SELECT count(*) FROM report_data_weeks WHERE execution_id IS NULL "
            f"AND id IN (SELECT id FROM {BACKUP})"  # noqa: S608
        ) == [(done,)]

        assert_rerun_ends_like_twin(run_job, config, matched, done, sql_exec, twin_url)
    finally:
        drop_database(admin_url, twin_name)


# -- the restore ------------------------------------------------------------------------


def test_restore_gives_back_the_original_table_and_skips_rows_written_since(
    database_url, sql_exec, run_job
):
    original = checksum(sql_exec)
    rolled = run_job(
        "rollback_execution_id", rollback_config(cutoff_date=days_ago(30), dry_run=False)
    )
    rollback_id = materialization_metadata(rolled, "execution_id_rollback")["rollback_id"]
    assert checksum(sql_exec) != original

    dry = run_job("restore_execution_id")
    meta = materialization_metadata(dry, "execution_id_restore")
    assert meta["dry_run"] is True and meta["rollback_id"] == rollback_id
    assert meta["restored_rows"] == meta["backed_up_rows"] > 0
    cleared = checksum(sql_exec)

    # Written since the rollback: a new execution_id on three cleared rows.
    written = [
        r[0]
        for r in sql_exec(
            "UPDATE report_data_weeks SET execution_id = gen_random_uuid(), updated_at = now() "
            "WHERE id IN (SELECT id FROM report_data_weeks WHERE execution_id IS NULL "
            f"AND id IN (SELECT id FROM {BACKUP}) ORDER BY id LIMIT 3) "  # noqa: S608
            "RETURNING id, execution_id",
        )
    ]
    assert cleared != checksum(sql_exec)
    since = dict(
        sql_exec("SELECT id, execution_id FROM report_data_weeks WHERE id = ANY(%s)", [written])
    )
    result = run_job(
        "restore_execution_id",
        restore_config(rollback_id=rollback_id, dry_run=False, batch_size=100),
    )
    assert result.success, step_failure_messages(result)
    meta = materialization_metadata(result, "execution_id_restore")
    assert meta["skipped_rows"] == 3
    assert meta["restored_rows"] == meta["backed_up_rows"] - 3
    assert (
        dict(
            sql_exec("SELECT id, execution_id FROM report_data_weeks WHERE id = ANY(%s)", [written])
        )
        == since
    )
    # Those three aside, the table is exactly the original.
    sql_exec(
        f"UPDATE report_data_weeks w SET execution_id = b.execution_id, updated_at = b.updated_at "  # noqa: S608
        f"FROM {BACKUP} b WHERE b.id = w.id AND w.id = ANY(%s)",
        [written],
    )
    assert checksum(sql_exec) == original


def test_restore_after_rollback_is_checksum_identical(database_url, sql_exec, run_job):
    original = checksum(sql_exec)
    run_job(
        "rollback_execution_id",
        rollback_config(cutoff_date=days_ago(40), dry_run=False, batch_size=100),
    )
    result = run_job("restore_execution_id", restore_config(dry_run=False))
    assert result.success, step_failure_messages(result)
    assert materialization_metadata(result, "execution_id_restore")["skipped_rows"] == 0
    assert checksum(sql_exec) == original


def test_batch_rows_follow_the_time_target():
    from rdw_tracking.rollback.pace import BATCH_TARGET_MS, MIN_BATCH_ROWS, LastBatch, batch_rows

    def took(ms: float) -> LastBatch:
        return LastBatch(5_000, ms, None)

    assert batch_rows(5_000, took(BATCH_TARGET_MS * 0.8), 5_000) == 5_000  # on target: keep
    assert batch_rows(5_000, took(BATCH_TARGET_MS * 2), 5_000) == 2_500  # too slow: shrink
    assert batch_rows(2_500, took(BATCH_TARGET_MS / 4), 5_000) == 5_000  # fast: grow, capped
    assert batch_rows(200, took(BATCH_TARGET_MS * 100), 5_000) == MIN_BATCH_ROWS


def test_batch_rows_stay_within_the_wal_budget():
    from rdw_tracking.rollback.pace import MIN_BATCH_ROWS, LastBatch, batch_rows

    mb = 2**20
    # 5,000 rows wrote 17 MB: with a 3 MB budget the next batches hold 882 rows, however fast.
    assert batch_rows(5_000, LastBatch(5_000, 90, 17 * mb), 5_000, 3 * mb) == 882
    assert batch_rows(882, LastBatch(882, 10, 3 * mb), 5_000, 3 * mb) == 882
    # Within the budget time rules, as it does without a WAL figure or budget.
    assert batch_rows(5_000, LastBatch(5_000, 90, 2 * mb), 5_000, 3 * mb) == 5_000
    assert batch_rows(5_000, LastBatch(5_000, 90, None), 5_000, 3 * mb) == 5_000
    assert batch_rows(5_000, LastBatch(5_000, 90, 10 * mb), 5_000, None) == 5_000
    assert batch_rows(5_000, LastBatch(5_000, 90, 10**12), 5_000, 3 * mb) == MIN_BATCH_ROWS


def test_wait_for_wal_room_is_bounded_and_outside_any_transaction(database_url, monkeypatch):
    from rdw_tracking.rollback import pace as rollback

    with psycopg.connect(database_url, autocommit=True) as conn:
        # Room for any batch: no wait.
        assert rollback.wait_for_wal_room(conn, 2**40) < 0.5
        # No room: the run flushes the WAL itself, at once, outside any transaction.
        conn.execute("CREATE TEMP TABLE filler AS SELECT generate_series(1, 10000) AS n")
        waited = rollback.wait_for_wal_room(conn, -1)
        assert waited < 1
        assert (
            conn.execute(
                "SELECT pg_current_wal_insert_lsn() - pg_current_wal_flush_lsn()"
            ).fetchone()[0]
            < 8192
        )
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
