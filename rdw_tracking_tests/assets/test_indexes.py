"""The two partial indexes, built online: idempotent, self-healing, never blocking writers."""

import re
import threading
import time

import dagster as dg
import psycopg
import pytest

from rdw_tracking.assets.indexes import IndexConfig
from rdw_tracking.indexes.existing import ExistingIndex, matches
from rdw_tracking.indexes.online import build_index
from rdw_tracking.indexes.specs import (
    COLLECTION_EXECUTION_INDEX,
    COMPLETED_AT_INDEX,
    EXECUTION_ID_INDEX,
    contract_indexes,
)
from rdw_tracking.indexes.watch import Progress, backoff_delays, progress_line
from rdw_tracking.jobs import DB_WRITES_TAG
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.writes import exclusive_write
from rdw_tracking_tests.conftest import (
    check_results,
    materialization_metadata,
    step_failure_messages,
)

JOB = "create_execution_id_indexes"
BOTH = [EXECUTION_ID_INDEX, COLLECTION_EXECUTION_INDEX]


def job_config(lock_timeout_ms: int | None = None, **index_config) -> dict:
    config: dict = {"ops": {"execution_id_indexes": {"config": index_config}}}
    if lock_timeout_ms is not None:
        config["resources"] = {"target_db": {"config": {"lock_timeout_ms": lock_timeout_ms}}}
    return config


def indexes(sql_exec, like: str = "idx_%") -> dict[str, tuple]:
    """{name: (valid, unique, definition, oid)} of the matching indexes of the database."""
    rows = sql_exec(
        "SELECT i.relname, x.indisvalid, x.indisunique, pg_get_indexdef(i.oid), i.oid "
        "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
        "JOIN pg_namespace n ON n.oid = i.relnamespace "
        "WHERE n.nspname = 'public' AND i.relname LIKE %s",
        [like],
    )
    return {name: rest for name, *rest in rows}


def log_lines(instance: dg.DagsterInstance, result) -> list[str]:
    return [e.user_message for e in instance.all_logs(result.run_id) if not e.is_dagster_event]


class Lines:
    """A logger for `build_index` called directly: keeps what it is told."""

    def __init__(self):
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)

    warning = info


# -- pure functions --------------------------------------------------------------------


def test_progress_line_shows_percentages():
    line = progress_line(
        EXECUTION_ID_INDEX,
        Progress("building index: scanning table", 250, 1000, 0, 0, 0, 0),
        12.34,
    )
    assert line == (
        f"{EXECUTION_ID_INDEX}: building index: scanning table after 12.3 s — "
        "blocks 250 of 1,000 (25.0%)"
    )
    waiting = Progress("waiting for writers before validation", 0, 0, 90, 90, 1, 4)
    assert progress_line("x", waiting, 1) == (
        "x: waiting for writers before validation after 1.0 s — "
        "waited for 1 of 4 transactions (25.0%)"
    )


def test_backoff_doubles_up_to_a_cap():
    assert backoff_delays(4, 1.5) == [1.5, 3.0, 6.0, 12.0]
    assert backoff_delays(3, 50, cap_s=60) == [50, 60, 60]
    assert backoff_delays(0, 1) == []


def test_definition_comparison():
    spec = contract_indexes(TargetDatabase(url="postgresql://x@h/d"))[EXECUTION_ID_INDEX]

    def index(**changes) -> ExistingIndex:
        fields = dict(
            name="other",
            table="report_data_weeks",
            definition="",
            valid=True,
            ready=True,
            unique=False,
            method="btree",
            columns=("execution_id",),
            include_columns=0,
            predicate="(execution_id IS NOT NULL)",
            bytes=0,
        )
        return ExistingIndex(**{**fields, **changes})

    assert matches(spec, index())
    assert matches(spec, index(predicate='("execution_id" is not null)'))
    assert not matches(spec, index(predicate=None))
    assert not matches(spec, index(unique=True))
    assert not matches(spec, index(columns=("execution_id DESC",)))
    assert not matches(spec, index(columns=("collection_id", "execution_id")))
    assert not matches(spec, index(method="hash"))
    assert not matches(spec, index(include_columns=1))


def test_config_rejects_unknown_index():
    with pytest.raises(Exception, match="unknown index idx_nope; choose from"):
        IndexConfig(indexes=["idx_nope"])
    assert IndexConfig(indexes=[EXECUTION_ID_INDEX] * 2).indexes == [EXECUTION_ID_INDEX]


# -- the job on a real database --------------------------------------------------------


def test_creates_both_then_rerun_is_a_no_op(db, run_job, sql_exec):
    from rdw_tracking.definitions import defs

    assert defs.resolve_job_def(JOB).tags[DB_WRITES_TAG] == "true"
    result = run_job(JOB)
    assert result.success, step_failure_messages(result)
    meta = materialization_metadata(result, "execution_id_indexes")
    assert (meta["created"], meta["rebuilt"], meta["unchanged"]) == (2, 0, 0)
    assert meta["index_bytes"] > 0 and meta["wal_bytes"] > 0
    assert all(meta[f"build_seconds/{name}"] > 0 for name in BOTH)
    rows = {r.data["index_name"]: r.data for r in meta["indexes"].records}
    assert set(rows) == {*BOTH, "report_data_weeks_pkey"}
    assert all(rows[name]["valid"] and rows[name]["action"] == "created" for name in BOTH)
    assert "WHERE (execution_id IS NOT NULL)" in rows[COLLECTION_EXECUTION_INDEX]["definition"]
    found = indexes(sql_exec)
    assert set(found) == set(BOTH) and all(valid for valid, *_ in found.values())
    assert check_results(result)["execution_id_indexes_valid"].passed

    again = run_job(JOB)
    assert again.success
    meta = materialization_metadata(again, "execution_id_indexes")
    assert (meta["created"], meta["rebuilt"], meta["unchanged"]) == (0, 0, 2)
    assert indexes(sql_exec) == found  # same oids: nothing rebuilt


def test_config_chooses_which(db, run_job, sql_exec):
    result = run_job(JOB, job_config(indexes=[COLLECTION_EXECUTION_INDEX]))
    assert result.success
    assert materialization_metadata(result, "execution_id_indexes")["created"] == 1
    assert set(indexes(sql_exec)) == {COLLECTION_EXECUTION_INDEX}
    check = check_results(result)["execution_id_indexes_valid"]
    assert not check.passed and f"public.{EXECUTION_ID_INDEX} is missing" in check.description


def test_completed_at_index_is_opt_in(db, run_job, sql_exec):
    result = run_job(JOB, job_config(workflow_executions_completed_at=True))
    assert result.success
    meta = materialization_metadata(result, "execution_id_indexes")
    assert meta["created"] == 3
    valid, unique, definition, _ = indexes(sql_exec)[COMPLETED_AT_INDEX]
    assert valid and not unique
    assert definition.endswith("ON public.workflow_executions USING btree (completed_at)")
    assert check_results(result)["execution_id_indexes_valid"].passed


def test_verify_job_checks_without_building(db, run_job, sql_exec):
    result = run_job("verify_execution_tracking")
    materialized = {
        e.event_specific_data.materialization.asset_key.to_user_string()
        for e in result.get_asset_materialization_events()
    }
    assert "execution_id_indexes" not in materialized
    check = check_results(result)["execution_id_indexes_valid"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert check.metadata["problem_count"].value == 2
    assert indexes(sql_exec) == {}
    run_job(JOB)
    assert check_results(run_job("verify_execution_tracking"))["execution_id_indexes_valid"].passed


def failed_build(url: str, statement: str, table: str = "report_data_weeks") -> None:
    """A real failed CREATE INDEX CONCURRENTLY: a writer holds `table` open, so the build's
    lock_timeout fires while it waits for it, leaving its INVALID index behind."""
    with psycopg.connect(url) as writer:
        writer.execute(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '200ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                conn.execute(statement)
        writer.rollback()


def test_invalid_leftover_is_dropped_and_rebuilt(database_url, run_job, sql_exec):
    # A real failed build of the very index: its lock wait timed out.
    failed_build(
        database_url,
        f"CREATE INDEX CONCURRENTLY {EXECUTION_ID_INDEX} ON report_data_weeks (execution_id) "
        "WHERE execution_id IS NOT NULL",
    )
    valid, unique, *_ = indexes(sql_exec)[EXECUTION_ID_INDEX]
    assert not valid and not unique
    check = check_results(run_job("verify_execution_tracking"))["execution_id_indexes_valid"]
    assert not check.passed and "is INVALID" in check.description

    instance = dg.DagsterInstance.ephemeral()
    result = run_job(JOB, instance=instance)
    assert result.success, step_failure_messages(result)
    meta = materialization_metadata(result, "execution_id_indexes")
    assert (meta["created"], meta["rebuilt"], meta["unchanged"]) == (1, 1, 0)
    valid, unique, definition, _ = indexes(sql_exec)[EXECUTION_ID_INDEX]
    assert valid and not unique and "(execution_id) WHERE (execution_id IS NOT NULL)" in definition
    assert any("is INVALID" in line for line in log_lines(instance, result))
    assert check_results(result)["execution_id_indexes_valid"].passed


def test_invalid_index_of_another_definition_is_left_alone(db, run_job, sql_exec):
    # Someone's failed build under the contract's name, but not the contract's index:
    # not the job's to drop (issue 18.7).
    with pytest.raises(psycopg.errors.UniqueViolation):
        sql_exec(
            f"CREATE UNIQUE INDEX CONCURRENTLY {EXECUTION_ID_INDEX} "
            "ON report_data_weeks (collection_id)"
        )
    before = indexes(sql_exec)
    result = run_job(JOB)
    assert not result.success
    (message,) = step_failure_messages(result)
    assert (
        f"index public.{EXECUTION_ID_INDEX} exists with another definition and is INVALID"
        in message
    )
    assert "USING btree (collection_id)`" in message and "nothing was changed" in message
    assert indexes(sql_exec) == before  # same oid, still INVALID; nothing else built


def test_invalid_index_on_another_table_is_left_alone(db, run_job, sql_exec):
    with pytest.raises(psycopg.errors.UniqueViolation):
        sql_exec(
            f"CREATE UNIQUE INDEX CONCURRENTLY {EXECUTION_ID_INDEX} ON workflow_executions (status)"
        )
    before = indexes(sql_exec)
    result = run_job(JOB)
    assert not result.success
    (message,) = step_failure_messages(result)
    assert f"index public.{EXECUTION_ID_INDEX} exists with another definition" in message
    assert "ON public.workflow_executions" in message
    assert indexes(sql_exec) == before


def test_index_another_session_is_building_is_not_dropped(database_url, run_job, sql_exec):
    """Another session's CREATE INDEX CONCURRENTLY of the very index, waiting for a writer:
    its index is INVALID until it finishes, and the job must not drop it from under it."""
    create = (
        f"CREATE INDEX CONCURRENTLY {EXECUTION_ID_INDEX} ON report_data_weeks (execution_id) "
        "WHERE execution_id IS NOT NULL"
    )
    outcome: list[BaseException | None] = []

    def other_build():
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(create)
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    with psycopg.connect(database_url, application_name="slow_writer") as writer:
        writer.execute("LOCK TABLE report_data_weeks IN ROW EXCLUSIVE MODE")
        builder = threading.Thread(target=other_build)
        builder.start()
        deadline = time.monotonic() + 10
        while EXECUTION_ID_INDEX not in indexes(sql_exec) and time.monotonic() < deadline:
            time.sleep(0.05)
        (building_pid,) = sql_exec(
            "SELECT pid FROM pg_stat_progress_create_index WHERE index_relid = %s::regclass",
            [f"public.{EXECUTION_ID_INDEX}"],
        )[0]
        oid = indexes(sql_exec)[EXECUTION_ID_INDEX][3]
        result = run_job(JOB, job_config(lock_timeout_ms=300, lock_retries=0))
        assert not result.success
        (message,) = step_failure_messages(result)
        assert f"index public.{EXECUTION_ID_INDEX} is INVALID because another session" in message
        assert f"pid {building_pid} " in message and "nothing was changed" in message
        writer.rollback()
    builder.join(30)
    assert outcome == [None]  # the other session's build finished undisturbed
    valid, _, _, after = indexes(sql_exec)[EXECUTION_ID_INDEX]
    assert valid and after == oid
    assert COLLECTION_EXECUTION_INDEX not in indexes(sql_exec)  # refused before any change


def test_conflicting_definition_fails_and_touches_nothing(db, run_job, sql_exec):
    sql_exec(f"CREATE INDEX {COLLECTION_EXECUTION_INDEX} ON report_data_weeks (collection_id)")
    before = indexes(sql_exec)
    result = run_job(JOB)
    assert not result.success
    (message,) = step_failure_messages(result)
    assert f"index public.{COLLECTION_EXECUTION_INDEX} exists with another definition" in message
    assert "USING btree (collection_id)`" in message  # what is there
    assert "USING btree (collection_id, execution_id) WHERE (execution_id IS NOT NULL)" in message
    assert "nothing was changed" in message
    assert indexes(sql_exec) == before  # same oid, and the other index not built either


def test_equivalent_index_under_another_name_is_not_duplicated(db, run_job, sql_exec):
    sql_exec(
        "CREATE INDEX weeks_exec_partial ON report_data_weeks (execution_id) "
        "WHERE execution_id IS NOT NULL"
    )
    result = run_job(JOB)
    assert result.success
    meta = materialization_metadata(result, "execution_id_indexes")
    assert (meta["created"], meta["unchanged"]) == (1, 1)
    assert meta["equivalent"] == {EXECUTION_ID_INDEX: "weeks_exec_partial"}
    assert EXECUTION_ID_INDEX not in indexes(sql_exec)
    check = check_results(result)["execution_id_indexes_valid"]
    assert check.passed and "weeks_exec_partial" in check.description


def test_held_lock_gives_up_cleanly_naming_the_holder(database_url, run_job, sql_exec):
    # A writer that stopped mid-transaction: the build would wait for it forever.
    with psycopg.connect(database_url, application_name="stuck_loader") as blocker:
        blocker.execute(
            "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date) "
            "SELECT collection_id, week_start_date, week_end_date FROM report_data_weeks LIMIT 1"
        )
        started = time.monotonic()
        result = run_job(JOB, job_config(lock_timeout_ms=300, lock_retries=2, retry_backoff_s=0.2))
        elapsed = time.monotonic() - started
        assert not result.success
        (message,) = step_failure_messages(result)
        assert f"gave up building index public.{EXECUTION_ID_INDEX}" in message
        assert f"pid {blocker.info.backend_pid} (application 'stuck_loader', query started" in (
            message
        )
        assert "no INVALID index was left behind" in message
        assert elapsed < 10  # 3 attempts, 0.6 s of back-off, Dagster's own second
        assert indexes(sql_exec) == {}
        blocker.rollback()


def test_lock_timeout_mid_build_is_retried_without_leaving_invalid(database_url):
    """The blocker arrives just before the build: the build times out in its wait for
    writers (leaving an INVALID index), backs off, drops it and builds again."""
    db = TargetDatabase(url=database_url, lock_timeout_ms=300)
    writing = threading.Event()

    def slow_writer():
        with psycopg.connect(database_url, application_name="slow_writer") as conn:
            conn.execute(
                "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date) "
                "SELECT collection_id, week_start_date, week_end_date FROM report_data_weeks LIMIT 1"
            )
            writing.set()
            conn.execute("SELECT pg_sleep(1.5)")

    thread = threading.Thread(target=slow_writer)
    thread.start()
    writing.wait()
    log = Lines()
    spec = contract_indexes(db)[EXECUTION_ID_INDEX]
    build = build_index(db, spec, log, retries=6, backoff_s=0.1, progress_every_s=0.2)
    thread.join()
    assert build.action == "created" and build.attempts > 1
    assert any("slow_writer" in line and "retry 1 of 6" in line for line in log.lines)
    assert any("is INVALID (a failed or cancelled build): dropping it" in m for m in log.lines)
    with db.cursor() as cur:
        cur.execute(
            "SELECT bool_and(indisvalid), count(*) FROM pg_index WHERE indrelid = "
            "'public.report_data_weeks'::regclass"
        )
        assert cur.fetchone() == (True, 2)  # the primary key and the new index


def test_writers_keep_going_through_the_build(database_url, run_job):
    stop = threading.Event()
    latencies: list[float] = []
    slow_commits: list[int] = []
    insert = (
        "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date, "
        "execution_id) SELECT id, current_date, current_date, gen_random_uuid() "
        "FROM report_data_collections LIMIT 1"
    )

    def fast_writer():
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not stop.is_set():
                started = time.monotonic()
                conn.execute(insert)
                latencies.append(time.monotonic() - started)

    def slow_writer():  # transactions that stay open a while: the build must wait them out
        with psycopg.connect(database_url) as conn:
            while not stop.is_set():
                conn.execute(insert)
                conn.execute("SELECT pg_sleep(0.3)")
                conn.commit()
                slow_commits.append(1)

    writers = [threading.Thread(target=fast_writer), threading.Thread(target=slow_writer)]
    for writer in writers:
        writer.start()
    time.sleep(0.3)
    instance = dg.DagsterInstance.ephemeral()
    try:
        result = run_job(JOB, job_config(progress_every_s=0.2), instance=instance)
        time.sleep(0.3)
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    assert result.success, step_failure_messages(result)
    assert materialization_metadata(result, "execution_id_indexes")["created"] == 2
    lock_timeout_s = TargetDatabase().lock_timeout_ms / 1000
    assert latencies and max(latencies) < lock_timeout_s

    written = len(latencies) + len(slow_commits)
    with psycopg.connect(database_url) as conn:
        seq = conn.execute("SELECT count(*) FROM report_data_weeks").fetchone()[0]
        assert seq == 2_600 + written  # not one row lost
        tracked = conn.execute(
            "SELECT count(*) FROM report_data_weeks WHERE execution_id IS NOT NULL"
        ).fetchone()[0]
        conn.execute("SET enable_seqscan = off")
        plan = conn.execute(
            "EXPLAIN SELECT count(*) FROM report_data_weeks WHERE execution_id IS NOT NULL"
        ).fetchall()
        assert "idx_report_data_weeks" in " ".join(row[0] for row in plan)
        via_index = conn.execute(
            "SELECT count(*) FROM report_data_weeks WHERE execution_id IS NOT NULL"
        ).fetchone()[0]
        assert via_index == tracked  # rows written during the build are in the index
    lines = log_lines(instance, result)
    progress = [line for line in lines if re.match(r"idx_report_data_weeks_\w+: .+ after ", line)]
    assert progress, lines


def test_second_write_job_is_refused(db, run_job, sql_exec):
    with exclusive_write(db, "rollback_execution_id"):
        result = run_job(JOB)
    assert not result.success
    (message,) = step_failure_messages(result)
    assert f"{JOB} refused: another rdw_tracking write job" in message
    assert "rdw_tracking:rollback_execution_id" in message
    assert indexes(sql_exec) == {}


def test_missing_column_is_refused_plainly(db, run_job, sql_exec):
    sql_exec("ALTER TABLE report_data_weeks DROP COLUMN execution_id")
    result = run_job(JOB)
    assert not result.success
    (message,) = step_failure_messages(result)
    assert "public.report_data_weeks.execution_id does not exist" in message
