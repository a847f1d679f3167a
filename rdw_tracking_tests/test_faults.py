"""Fault injection on a real PostgreSQL: restarts, timeouts, cancelled builds, held locks.

Each fault is made deterministic rather than timed: the pipeline's query is first made to
wait on a lock held by the test, the fault strikes while it waits (seen in pg_locks /
pg_stat_activity by application_name), and only then is the lock let go.

"Restart" means a real `pg_ctl stop -m fast` and start of the embedded server. When the
suite runs against an external server (RDW_TEST_DATABASE_URL), that server is never
restarted: every backend of the test's own database is terminated with
`pg_terminate_backend` instead, which is what a restart looks like from a client.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from rdw_tracking.assets import READ_RETRY
from rdw_tracking.resources import APPLICATION_NAME
from rdw_tracking.walkthrough import evaluate
from rdw_tracking_tests.conftest import (
    TEST_ENV,
    check_results,
    create_database,
    drop_database,
    materialization_metadata,
    step_failure_messages,
)

EXTERNAL = bool(os.environ.get(TEST_ENV))
ROW_CHECKSUM = (
    "SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t.id)) FROM public.report_data_weeks t"
)
# A query of the pipeline waiting for a lock on report_data_weeks.
WAITING = """
SELECT a.pid, a.query FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE NOT l.granted AND a.datname = current_database() AND a.application_name = %s
  AND l.locktype = 'relation' AND l.relation = 'public.report_data_weeks'::regclass
"""


def events_of(result, event_type: str) -> list:
    return [e for e in result.all_events if e.event_type_value == event_type]


def failure_text(result) -> str:
    """Every step failure's message and cause, as one string."""
    parts = []
    for event in events_of(result, "STEP_FAILURE"):
        error = event.event_specific_data.error
        while error is not None:
            parts.append(error.message)
            error = error.cause
    return "\n".join(parts)


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def quietly(sql_exec, statement, params=None, url=None):
    """`sql_exec`, but None while the server is down (it is, mid-restart)."""
    try:
        return sql_exec(statement, params, url=url)
    except psycopg.OperationalError:
        return None


def restart(admin_url: str, database_url: str, mode: str = "fast") -> None:
    """The server restarts under the test's database (see the module docstring).

    `mode` "immediate" is a crash: the server stops without flushing anything and recovers
    from its WAL on the way up, so commits not yet synced to disk are gone.
    """
    if EXTERNAL:
        database = conninfo_to_dict(database_url)["dbname"]
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [database],
            )
        return
    from rdw_tracking import embedded

    assert embedded.stop(mode)
    assert embedded.start()


class HeldLock:
    """Another session holding a lock on report_data_weeks until `release()`."""

    def __init__(self, url: str, mode: str = "ACCESS EXCLUSIVE", application: str = "blocker"):
        self.conn = psycopg.connect(url, application_name=application)
        self.conn.execute(f"LOCK TABLE public.report_data_weeks IN {mode} MODE")
        self.pid = self.conn.info.backend_pid

    def release(self) -> None:
        try:
            self.conn.rollback()
            self.conn.close()
        except psycopg.Error:  # killed by the restart: the lock went with it
            pass


# -- 1. the database restarts mid-run: read-only steps retry --------------------------------

READ_ONLY_JOBS = ["verify_execution_tracking", "post_collection_validation"]


@pytest.mark.parametrize("job", READ_ONLY_JOBS)
def test_every_read_only_step_retries_transient_errors(job):
    """Every asset and check these jobs run, check_specs included, carries READ_RETRY."""
    from rdw_tracking.definitions import defs

    job_def = defs.resolve_job_def(job)
    steps = {node.name: node.retry_policy or node.definition.retry_policy for node in job_def.nodes}
    assert steps
    assert {name: policy for name, policy in steps.items() if policy != READ_RETRY} == {}
    assert READ_RETRY.backoff == dg.Backoff.EXPONENTIAL and READ_RETRY.delay


@pytest.mark.parametrize("job", READ_ONLY_JOBS)
def test_restart_mid_run_is_retried_and_the_run_succeeds(
    job, admin_url, database_url, sql_exec, run_job
):
    """The run's query waits on a lock; the server restarts under it; the step retries.

    On the embedded server a real stop and start. On an external server
    (RDW_TEST_DATABASE_URL) the server is never restarted: every backend of the test's
    database is terminated with pg_terminate_backend instead.
    """
    blocker = HeldLock(database_url)
    struck: list = []

    def fault():
        try:
            waiting = wait_for(
                lambda: quietly(sql_exec, WAITING, [APPLICATION_NAME]), "a step to wait"
            )
            struck.extend(waiting)
            restart(admin_url, database_url)
        finally:
            blocker.release()

    thread = threading.Thread(target=fault)
    thread.start()
    started = time.monotonic()
    result = run_job(job)
    thread.join()
    assert struck, "the fault never struck"
    assert result.success, failure_text(result)
    retried = events_of(result, "STEP_UP_FOR_RETRY")
    causes = [e.event_specific_data.error.cause.message for e in retried]
    assert all("connection" in cause for cause in causes), causes  # lost, or refused meanwhile
    assert retried and events_of(result, "STEP_RESTARTED")
    assert time.monotonic() - started < 30
    population = materialization_metadata(result, "execution_id_population")
    assert population["total_rows"] == sql_exec("SELECT count(*) FROM report_data_weeks")[0][0]
    assert "execution_ids_exist" in check_results(result)


# -- 2. statement_timeout: a clear failure, never retried ---------------------------------


def test_statement_timeout_names_the_asset_and_the_setting(database_url, run_job):
    """statement_timeout below lock_timeout: the waiting query is cancelled by the former."""
    blocker = HeldLock(database_url)
    try:
        started = time.monotonic()
        result = run_job(
            "post_collection_validation",
            {"resources": {"target_db": {"config": {"statement_timeout_ms": 300}}}},
        )
        elapsed = time.monotonic() - started
    finally:
        blocker.release()
    assert not result.success
    (message,) = step_failure_messages(result)
    assert "StatementTimeout: execution_id_population: a query on" in message
    assert "cancelled by statement_timeout after 300 ms" in message
    assert "raise target_db.statement_timeout_ms" in message
    assert "resources.target_db.config.statement_timeout_ms" in message
    assert not events_of(result, "STEP_UP_FOR_RETRY")  # it would only time out again
    assert elapsed < 15


# -- 3. an index build cancelled mid-way; a rollback interrupted mid-way -------------------

INDEX_JOB = "create_execution_id_indexes"
# DDL of the pipeline that is waiting (for a lock, or for older transactions to end).
WAITING_DDL = """
SELECT pid, left(query, 40) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = %s AND wait_event_type = 'Lock'
  AND (query LIKE 'CREATE INDEX CONCURRENTLY%%' OR query LIKE 'DROP INDEX CONCURRENTLY%%')
"""


class Writer:
    """A collection run mid-transaction: one row inserted, then busy (not idle) until stopped."""

    def __init__(self, url: str):
        self.conn = psycopg.connect(url, application_name="collector")
        self.conn.execute(
            "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date) "
            "SELECT collection_id, week_start_date, week_end_date FROM report_data_weeks LIMIT 1"
        )
        self.thread = threading.Thread(target=self._work)
        self.thread.start()

    def _work(self) -> None:
        try:
            self.conn.execute("SELECT pg_sleep(120)")
        except psycopg.errors.QueryCanceled:
            pass
        self.conn.rollback()  # the insert is gone: the table is as it was
        self.conn.close()

    def stop(self) -> None:
        self.conn.cancel_safe()
        self.thread.join()


def valid_indexes(sql_exec) -> dict[str, bool]:
    return dict(
        sql_exec(
            "SELECT i.relname, x.indisvalid FROM pg_index x "
            "JOIN pg_class i ON i.oid = x.indexrelid "
            "WHERE x.indrelid = 'public.report_data_weeks'::regclass AND i.relname LIKE 'idx_%%'"
        )
    )


def test_cancelled_index_build_is_repaired_by_the_next_run(database_url, sql_exec, run_job):
    """A DBA cancels the build (and, while at it, the clean-up of what it left): the run
    fails saying so, an INVALID index stays, and the next run drops and rebuilds it."""
    before = sql_exec(ROW_CHECKSUM)
    writer = Writer(database_url)  # the build waits for it: a window to cancel in
    cancelled: list[str] = []
    done = threading.Event()

    def dba():
        while not done.is_set():
            for pid, query in quietly(sql_exec, WAITING_DDL, [APPLICATION_NAME]) or []:
                sql_exec("SELECT pg_cancel_backend(%s)", [pid])
                cancelled.append(query)
            time.sleep(0.02)

    thread = threading.Thread(target=dba)
    thread.start()
    config = {"resources": {"target_db": {"config": {"lock_timeout_ms": 20_000}}}}
    try:
        first = run_job(INDEX_JOB, config)
    finally:
        done.set()
        thread.join()
        writer.stop()
    assert any(q.startswith("CREATE INDEX CONCURRENTLY") for q in cancelled), cancelled
    assert not first.success
    (message,) = step_failure_messages(first)
    index = "public.idx_report_data_weeks_execution_id"
    assert f"building index {index} on public.report_data_weeks was cancelled by another" in (
        message
    )
    assert f"It left an INVALID {index}" in message and "next run drops and rebuilds it" in message
    assert valid_indexes(sql_exec) == {"idx_report_data_weeks_execution_id": False}

    second = run_job(INDEX_JOB)
    assert second.success, failure_text(second)
    meta = materialization_metadata(second, "execution_id_indexes")
    assert (meta["created"], meta["rebuilt"]) == (1, 1)
    assert valid_indexes(sql_exec) == {
        "idx_report_data_weeks_execution_id": True,
        "idx_report_data_weeks_collection_execution": True,
    }
    assert check_results(second)["execution_id_indexes_valid"].passed
    assert sql_exec(ROW_CHECKSUM) == before  # nothing lost, nothing added


# A rollback whose batch connection is terminated mid-way, then rerun, ends identical to an
# uninterrupted twin: test_killed_connection_then_rerun_ends_as_an_uninterrupted_run in
# assets/test_rollback.py. Here the whole server restarts under it instead.


@pytest.mark.skipif(EXTERNAL, reason="never restarts an external server")
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_mid_rollback_then_rerun_ends_as_an_uninterrupted_run(
    admin_url, database_url, sql_exec, run_job, mode
):
    """Batches commit without waiting for their WAL to reach disk, so a crash ("immediate")
    can take back the last ones: the rerun must do them again and still end exact."""
    from rdw_tracking.resources import TargetDatabase
    from rdw_tracking_tests.assets.test_rollback import (
        BACKUP,
        add_recent_rows,
        assert_rerun_ends_like_twin,
        days_ago,
        last_matched_row_locked,
        rollback_config,
    )

    add_recent_rows(sql_exec, 6_000)
    twin_name = f"rdw_test_{os.getpid()}_restart_twin"
    twin_url = create_database(
        admin_url, twin_name, template=conninfo_to_dict(database_url)["dbname"]
    )
    try:
        config = rollback_config(cutoff_date=days_ago(20), dry_run=False, batch_size=100)
        twin = run_job(
            "rollback_execution_id", config, resources={"target_db": TargetDatabase(url=twin_url)}
        )
        assert twin.success, failure_text(twin)
        matched = materialization_metadata(twin, "execution_id_rollback")["matched_rows"]

        def backed_up() -> int:
            rows = quietly(
                sql_exec, "SELECT count(*) FROM pg_class WHERE relname = %s", [BACKUP.split(".")[1]]
            )
            if not rows or not rows[0][0]:
                return 0
            rows = quietly(sql_exec, f"SELECT count(*) FROM {BACKUP}")  # noqa: S608
            return rows[0][0] if rows else 0

        def fault():
            with last_matched_row_locked(database_url, days_ago(20), sql_exec):
                restart(admin_url, database_url, mode)

        thread = threading.Thread(target=fault)
        thread.start()
        first = run_job("rollback_execution_id", config)
        thread.join()
        assert not first.success
        (message,) = step_failure_messages(first)
        assert "was lost during rollback" in message
        assert "every finished batch is committed with its backup" in message
        assert "run rollback_execution_id again with cutoff_date" in message
        done = backed_up()
        # A crash can take back every batch not yet synced (all of them, if it comes
        # within the WAL writer's first flush): the rerun must then redo them all.
        assert (0 if mode == "immediate" else 1) <= done < matched

        assert_rerun_ends_like_twin(run_job, config, matched, done, sql_exec, twin_url)
    finally:
        drop_database(admin_url, twin_name)


# -- 4. a lock held by another session: bounded waiting, then a failure naming it ----------

# Index creation: test_held_lock_gives_up_cleanly_naming_the_holder in
# assets/test_indexes.py covers a writer idle in its transaction (refused before the build
# starts); here the holder holds the table itself and is busy in a long statement.


def test_index_build_behind_a_busy_lock_holder_names_it(database_url, sql_exec, run_job):
    holder = psycopg.connect(database_url, application_name="nightly_vacuum")
    holder.execute("LOCK TABLE public.report_data_weeks IN SHARE ROW EXCLUSIVE MODE")
    pid = holder.info.backend_pid

    def sleep():
        with pytest.raises(psycopg.errors.QueryCanceled):
            holder.execute("SELECT pg_sleep(60)")  # busy, not idle: not refused up front

    busy = threading.Thread(target=sleep)
    busy.start()
    try:
        started = time.monotonic()
        result = run_job(
            INDEX_JOB,
            {
                "ops": {
                    "execution_id_indexes": {"config": {"lock_retries": 1, "retry_backoff_s": 0.1}}
                },
                "resources": {"target_db": {"config": {"lock_timeout_ms": 300}}},
            },
        )
        elapsed = time.monotonic() - started
    finally:
        holder.cancel_safe()
        busy.join()
        holder.close()
    assert not result.success
    (message,) = step_failure_messages(result)
    assert "gave up building index public.idx_report_data_weeks_execution_id" in message
    assert f"pid {pid} (application 'nightly_vacuum'" in message
    assert "no INVALID index was left behind" in message
    assert elapsed < 15  # two waits of 300 ms and 0.1 s of back-off, plus Dagster's own time
    assert valid_indexes(sql_exec) == {}


@pytest.mark.parametrize(
    "lock",
    [
        "SELECT 1 FROM public.report_data_weeks WHERE execution_id IS NOT NULL "
        "ORDER BY ctid LIMIT 20 FOR UPDATE",
        "LOCK TABLE public.report_data_weeks IN ACCESS EXCLUSIVE MODE",
    ],
    ids=["row-locks", "table-lock"],
)
def test_rollback_behind_a_lock_holder_names_it_then_continues(
    lock, database_url, sql_exec, run_job, monkeypatch
):
    from rdw_tracking.rollback import matched as rollback
    from rdw_tracking_tests.assets.test_rollback import days_ago, rollback_config

    # The holder's transaction began before the run: don't wait the default 30 s for it.
    monkeypatch.setattr(rollback, "IN_FLIGHT_WAIT_S", 0.2)
    cutoff = days_ago(40)
    config = rollback_config(cutoff_date=cutoff, dry_run=False, batch_size=100, lock_timeout_ms=100)
    holder = psycopg.connect(database_url, application_name="stuck_report")
    holder.execute(lock)
    pid = holder.info.backend_pid
    try:
        started = time.monotonic()
        first = run_job("rollback_execution_id", config)
        elapsed = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()
    assert not first.success
    (message,) = step_failure_messages(first)
    assert f"pid {pid} (application 'stuck_report'" in message
    assert "run the job again to continue" in message or "run rollback_execution_id again" in (
        message
    )
    assert elapsed < 15

    second = run_job("rollback_execution_id", config)
    assert second.success, failure_text(second)
    meta = materialization_metadata(second, "execution_id_rollback")
    assert meta["cleared_rows"] == meta["matched_rows"] > 0
    assert sql_exec(
        "SELECT count(*) FROM report_data_weeks WHERE execution_id IS NOT NULL "
        "AND created_at >= %s AND created_at < %s",
        [cutoff, meta["upper_bound"]],
    ) == [(0,)]


# -- 5. the polling sensor with the database down ------------------------------------------

# An unreachable URL: test_database_outage_fails_the_tick_and_keeps_the_cursor in
# test_sensors.py. Here the server the cursor was read from really goes away.


@contextmanager
def database_down(admin_url: str, database_url: str) -> Iterator[None]:
    """The embedded server stopped; on an external server (never stopped), the test's
    database refusing connections (ALLOW_CONNECTIONS false, its backends terminated)."""
    if not EXTERNAL:
        from rdw_tracking import embedded

        assert embedded.stop()
        try:
            yield
        finally:
            embedded.start()
        return
    database = conninfo_to_dict(database_url)["dbname"]
    name = sql.Identifier(database)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(name))
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            [database],
        )
        try:
            yield
        finally:
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(name))


def test_polling_sensor_rides_out_a_database_outage(admin_url, database_url, sql_exec):
    from rdw_tracking.resources import TargetDatabase, TargetDatabaseError
    from rdw_tracking.sensors import ExecutionsCursor, ExecutionsPolling, workflow_executions_sensor

    def context(cursor):
        return dg.build_sensor_context(
            cursor=cursor,
            resources={
                "target_db": TargetDatabase(url=database_url),
                "executions_polling": ExecutionsPolling(),
            },
        )

    def tick(cursor):
        with context(cursor) as ctx:
            return evaluate(workflow_executions_sensor, ctx)

    first = tick(None)
    cursor = first.cursor
    assert cursor and not first.run_requests
    completed = sql_exec(
        "INSERT INTO workflow_executions (status, completed_at) "
        "SELECT 'completed', now() FROM generate_series(1, 3) RETURNING id::text"
    )
    with database_down(admin_url, database_url):
        for _ in range(3):  # each tick of the outage fails alone, quickly; none moves the cursor
            with context(cursor) as during:
                started = time.monotonic()
                with pytest.raises(TargetDatabaseError) as err:
                    evaluate(workflow_executions_sensor, during)
                assert time.monotonic() - started < 5
                assert "cannot connect to PostgreSQL at" in str(err.value)
                assert during.cursor == cursor
    healthy = tick(cursor)
    (request,) = healthy.run_requests
    assert request.tags["rdw/new_executions"] == "3"
    assert {r[0] for r in completed} <= set(ExecutionsCursor.from_json(healthy.cursor).seen)
    assert not tick(healthy.cursor).run_requests  # caught up once, not twice
