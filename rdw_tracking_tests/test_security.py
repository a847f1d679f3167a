"""Issue 18: what an operator's mistake or a hostile launch cannot make the project do.

Each test ran against the code before its fix and failed there: the demo dropping an
exported database's tables, a password leaking through a malformed URL, run config
sending the worker's password to another server, a write from the asset graph skipping
the write slot, a session idle in its transaction for ever, one future `completed_at`
silencing the polling sensor, and a write job carrying on after losing its lock.
"""

import datetime as dt
import os
import socket
import struct
import threading
import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from rdw_tracking import cli, demo, embedded, walkthrough
from rdw_tracking.definitions import defs
from rdw_tracking.resources import TargetDatabase, TargetDatabaseError, redact
from rdw_tracking.sensors import ExecutionsCursor, ExecutionsPolling, workflow_executions_sensor
from rdw_tracking.walkthrough import evaluate
from rdw_tracking.writes import LOCK_CLASS, exclusive_write
from rdw_tracking_tests.assets.test_population import failure_text
from rdw_tracking_tests.conftest import (
    create_database,
    database_checksums,
    drop_database,
    launch_refusal,
)
from rdw_tracking_tests.test_definitions import dg_cli_process
from rdw_tracking_tests.test_no_leaks import everything_recorded
from rdw_tracking_tests.test_sensors import complete, tick

# -- 1. the demo and the UI touch only the demo's database --------------------------------

COMMENTS = """
SELECT n.nspname || '.' || c.relname, coalesce(obj_description(c.oid, 'pg_class'), '')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' ORDER BY 1
"""


def fingerprint(url: str) -> tuple:
    """Schema, data and table comments of a database: "unchanged" means all three equal."""
    with psycopg.connect(url, autocommit=True) as conn:
        return (*database_checksums(conn), conn.execute(COMMENTS).fetchall())


@pytest.fixture
def production_url(admin_url):
    """A database holding real tables named like the demo's (not marked as the demo's)."""
    name = f"rdw_test_{os.getpid()}_production"
    url = create_database(admin_url, name)
    demo.build(url, demo.DemoShape(rows=208))
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("report_data_weeks", "workflow_executions", "report_data_collections"):
            conn.execute(f"COMMENT ON TABLE {table} IS NULL")  # as a real team's tables are
        conn.execute("UPDATE report_data_weeks SET error_message = 'production row'")
    yield url
    drop_database(admin_url, name)


@pytest.fixture
def demo_url(admin_url):
    """An empty database standing in for the embedded server's demo database."""
    name = f"rdw_test_{os.getpid()}_demo"
    yield create_database(admin_url, name)
    drop_database(admin_url, name)


def test_demo_and_ui_never_touch_an_exported_database(
    production_url, demo_url, tmp_path, monkeypatch
):
    # The operator's shell, as docs/operating.md tells them to set it up for production.
    monkeypatch.setenv("RDW_DATABASE_URL", production_url)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "production_dagster_home"))
    monkeypatch.setenv("RDW_FLEET_FILE", str(tmp_path / "fleet.yaml"))
    monkeypatch.setenv("RDW_DEMO_DATABASE_URL", demo_url)
    monkeypatch.setenv("RDW_HOME", str(tmp_path / "rdw"))
    # The test's server stands in for the embedded one (already running, or not needed).
    monkeypatch.setattr(embedded, "start", lambda: False)
    monkeypatch.setattr(embedded, "dagster_storage_url", lambda: "postgresql+psycopg2://demo")
    before = fingerprint(production_url)

    cli.use_embedded_environment()
    assert os.environ["RDW_DATABASE_URL"] == demo_url
    assert Path(os.environ["DAGSTER_HOME"]) == tmp_path / "rdw" / "dagster_home"
    assert "RDW_FLEET_FILE" not in os.environ
    walkthrough.ensure_demo_data(rows=104, rebuild=True)  # what `make demo` does first
    walkthrough.ensure_demo_data(rows=104)  # what `make ui` does first

    assert fingerprint(production_url) == before
    with psycopg.connect(demo_url) as conn:
        assert conn.execute("SELECT count(*) FROM report_data_weeks").fetchone() == (104,)


def test_demo_and_ui_reach_no_webhook_or_broker_of_the_shell(
    production_url, demo_url, tmp_path, monkeypatch, capsys
):
    """A shell set up for production: the demo's failures must post to no webhook, its
    steps queue on no broker. The variables are cleared (named, never quoted), and a
    failed demo run's alert sensor then posts nothing."""
    from rdw_tracking import engine
    from rdw_tracking.alerts import run_failure_alert_sensor

    shell = {
        "RDW_ALERT_WEBHOOK_URL": "https://hooks.example.com/services/T0KEN-prod",
        "RDW_EXECUTOR": "celery",
        "RDW_CELERY_BROKER": "pyamqp://prod:Broker-pw@rabbit.example:5672//",
        "RDW_CELERY_QUEUE": "production",
    }
    for name, value in shell.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RDW_DEMO_DATABASE_URL", demo_url)
    monkeypatch.setenv("RDW_HOME", str(tmp_path / "rdw"))
    monkeypatch.setattr(embedded, "start", lambda: False)
    monkeypatch.setattr(embedded, "dagster_storage_url", lambda: "postgresql+psycopg2://demo")

    cli.use_embedded_environment()
    message = capsys.readouterr().err
    for name, value in shell.items():
        assert name not in os.environ and name in message and value not in message
    assert engine.executor(dg.in_process_executor) is dg.in_process_executor
    walkthrough.ensure_demo_data(rows=104, rebuild=True)
    with dg.instance_for_test() as instance:
        failed = defs.resolve_job_def("weekly_collection").execute_in_process(
            instance=instance,
            resources={"target_db": TargetDatabase(url="postgresql://demo@127.0.0.1:1/none")},
            raise_on_error=False,
        )
        assert not failed.success
        skipped = run_failure_alert_sensor(
            dg.build_run_status_sensor_context(
                sensor_name="run_failure_alert_sensor",
                dagster_event=failed.get_run_failure_event(),
                dagster_instance=instance,
                dagster_run=failed.dagster_run,
            ).for_run_failure()
        )
    assert isinstance(skipped, dg.SkipReason) and "is not set" in skipped.skip_message


@pytest.mark.parametrize("unmarked", ["report_data_weeks", "workflow_executions"])
def test_demo_build_refuses_tables_it_did_not_mark(production_url, unmarked):
    """Even pointed at a real database (RDW_DEMO_DATABASE_URL set by mistake), the demo
    drops nothing: one table without its mark is enough to refuse."""
    with psycopg.connect(production_url, autocommit=True) as conn:
        for table in ("report_data_weeks", "workflow_executions", "report_data_collections"):
            if table != unmarked:
                conn.execute(f"COMMENT ON TABLE {table} IS '{demo.MARKER}'")
    before = fingerprint(production_url)
    with pytest.raises(demo.NotDemoTables, match=f"public.{unmarked} exist"):
        demo.build(production_url, demo.DemoShape(rows=104))
    assert fingerprint(production_url) == before


@pytest.mark.parametrize("layout", ["inheritance", "multilevel"])
def test_demo_rebuilds_its_own_tables_in_any_layout(empty_database_url, layout):
    from rdw_tracking.demo_layouts import relayout

    demo.build(empty_database_url, demo.DemoShape(rows=208))
    relayout(empty_database_url, layout)
    summary = demo.build(empty_database_url, demo.DemoShape(rows=104))
    assert summary["rows"] == 104


def test_demo_drop_leaves_objects_built_on_its_tables(empty_database_url, sql_exec):
    """No CASCADE: a view someone built on a demo table makes the rebuild fail, not vanish."""
    demo.build(empty_database_url, demo.DemoShape(rows=104))
    sql_exec("CREATE VIEW weekly_report AS SELECT id FROM report_data_weeks")
    with pytest.raises(psycopg.errors.DependentObjectsStillExist):
        demo.build(empty_database_url, demo.DemoShape(rows=104))
    assert sql_exec("SELECT count(*) FROM weekly_report") == [(104,)]


# -- 2. a stray `/` or `@` in the password ------------------------------------------------

SECRET = ("Pa55", "w0rd!x")  # the password is SECRET joined by the stray character


def malformed_url(database_url: str, stray: str) -> str:
    info = conninfo_to_dict(database_url)
    host = info.get("host") or "127.0.0.1"
    port = info.get("port") or "5432"
    return f"postgresql://rdw:{stray.join(SECRET)}@{host}:{port}/{info['dbname']}"


@pytest.mark.parametrize("stray", ["/", "@"])
def test_malformed_url_leaks_no_part_of_the_password(
    database_url, stray, run_job, tmp_path, capfd, monkeypatch
):
    bad = malformed_url(database_url, stray)
    texts: dict[str, str] = {}
    # As the resource's url (code or run config): refused by its validator.
    with pytest.raises(Exception) as err:
        TargetDatabase(url=bad)
    texts["validator"] = f"{err.value}\n{err.value!r}"
    # As RDW_DATABASE_URL: every message that names the database.
    monkeypatch.setenv("RDW_DATABASE_URL", bad)
    for label, attempt in {
        "describe": lambda: TargetDatabase().describe(),
        "connect": lambda: TargetDatabase().connect().__enter__(),
    }.items():
        with pytest.raises(TargetDatabaseError) as err:
            attempt()
        texts[label] = f"{err.value}\n{err.value!r}"
        assert "unencoded" in str(err.value)
    with (
        dg.build_sensor_context(
            cursor=ExecutionsCursor(dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)).to_json(),
            resources={"target_db": TargetDatabase(), "executions_polling": ExecutionsPolling()},
        ) as context,
        pytest.raises(Exception) as err,
    ):
        evaluate(workflow_executions_sensor, context)
    texts["sensor tick"] = f"{err.value}\n{err.value!r}"
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = run_job("post_collection_validation", instance=instance)
        assert not result.success
        texts["run failure"] = failure_text(result)
        monkeypatch.setenv("RDW_DATABASE_URL", database_url)
        in_config = {"resources": {"target_db": {"config": {"url": bad}}}}
        texts["launch"] = launch_refusal(
            run_job, "post_collection_validation", in_config, instance=instance
        )
        texts |= everything_recorded(instance, tmp_path)
    out, errors = capfd.readouterr()
    texts |= {"stdout": out, "stderr": errors}
    texts["redact"] = redact(f"libpq said: port {SECRET[0]}, dbname {SECRET[1]}@db", bad)
    assert "unencoded" in texts["run failure"] and "unencoded" in texts["launch"]
    leaks = [(where, part) for where, text in texts.items() for part in SECRET if part in text]
    assert not leaks, leaks


def test_malformed_port_is_refused_without_quoting_it():
    with pytest.raises(Exception) as err:
        TargetDatabase(url="postgresql://rdw@db.example:Pa55word/reports")
    assert "url has a port that is not a number" in str(err.value)
    assert "Pa55word" not in str(err.value)


# -- 4 and 5. run config cannot send credentials elsewhere; guards on the assets ----------


class PasswordCatcher:
    """A fake PostgreSQL server on 127.0.0.1 that asks for a cleartext password and
    records every one it is sent."""

    def __init__(self):
        self.passwords: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._session(conn)
                except OSError:
                    pass

    @staticmethod
    def _read(conn, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def _session(self, conn):
        length, code = struct.unpack("!ii", self._read(conn, 8))
        if code in (80877103, 80877104):  # SSLRequest / GSSENCRequest: no
            conn.sendall(b"N")
            length, code = struct.unpack("!ii", self._read(conn, 8))
        self._read(conn, length - 8)  # the startup packet's parameters
        conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        kind, length = struct.unpack("!ci", self._read(conn, 5))
        if kind == b"p":
            self.passwords.append(self._read(conn, length - 4).rstrip(b"\0").decode())

    def close(self):
        self.sock.close()


@pytest.fixture
def catcher():
    server = PasswordCatcher()
    yield server
    server.close()


def run_failure_text(result) -> str:
    """Every error of a run (resource init, step, run), with causes."""
    texts = []
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        while error is not None:
            texts.append(error.message)
            error = error.cause
    return "\n".join(texts)


def implicit_asset_run(asset: str, run_config: dict, instance=None):
    """Materialize `asset` through the implicit asset job, as the asset graph's
    Materialize button does: none of the write jobs' launch-time checks or tags."""
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        run_config=run_config,
        asset_selection=[dg.AssetKey(asset)],
        instance=instance or dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def test_run_config_url_cannot_send_the_password_to_another_server(
    database_url, catcher, run_job, monkeypatch
):
    monkeypatch.setenv("PGPASSWORD", "worker-Secret-9")
    elsewhere = f"postgresql://rdw@127.0.0.1:{catcher.port}/reports"
    in_config = {"resources": {"target_db": {"config": {"url": elsewhere}}}}
    refusal = launch_refusal(run_job, "post_collection_validation", in_config)
    assert "another server" in refusal
    rollback = {
        "ops": {"execution_id_rollback": {"config": {"cutoff_date": "2020-01-01"}}},
        **in_config,
    }
    for asset, config in [
        ("execution_id_population", in_config),
        ("execution_id_rollback", rollback),
    ]:
        result = implicit_asset_run(asset, config)
        assert not result.success
        assert "another server" in run_failure_text(result)
    assert catcher.passwords == []
    # The same server, another database or user: run config may still choose those.
    same_server = make_conninfo(database_url, application_name="rdw_via_run_config")
    result = run_job(
        "post_collection_validation",
        {"resources": {"target_db": {"config": {"url": same_server}}}},
    )
    assert result.success


def test_password_in_run_config_is_refused_from_the_asset_graph(password_url, sql_exec):
    in_config = {"resources": {"target_db": {"config": {"url": password_url}}}}
    result = implicit_asset_run("execution_id_indexes", in_config)
    assert not result.success
    assert "url carries a password" in run_failure_text(result)
    assert sql_exec(
        "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'idx_report_data_weeks_%'"
    ) == [(0,)]


def test_write_asset_from_the_asset_graph_waits_for_the_write_slot(
    database_url, sql_exec, tmp_path
):
    """A write materialized outside the write jobs (no `rdw/db-writes` run tag) still
    waits while another write holds the `rdw/db-writes` pool's one slot."""
    indexes = "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'idx_report_data_weeks_%'"
    overrides = {"concurrency": {"pools": {"default_limit": 1}}}
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides=overrides) as instance:
        storage = instance.event_log_storage
        storage.initialize_concurrency_limit_to_default("rdw/db-writes")
        storage.claim_concurrency_slot("rdw/db-writes", "another-write-run", "its-step")
        done = {}
        worker = threading.Thread(
            target=lambda: done.update(
                result=implicit_asset_run("execution_id_indexes", {}, instance=instance)
            )
        )
        worker.start()
        worker.join(6)
        assert worker.is_alive(), "the write ran beside another write"
        assert sql_exec(indexes) == [(0,)]
        storage.free_concurrency_slots_for_run("another-write-run")
        worker.join(120)
    assert done["result"].success
    assert sql_exec(indexes) == [(2,)]


def test_dg_launch_of_a_write_asset_waits_for_the_write_slot(
    database_url, dagster_home, sql_exec, tmp_path
):
    """`dg launch` runs in its own process, outside the run queue and its tag limits:
    a write asset launched that way still waits for the `rdw/db-writes` pool's slot of
    the deployment's instance (dagster.yaml's `concurrency.pools`)."""
    indexes = "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'idx_report_data_weeks_%'"
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        storage.initialize_concurrency_limit_to_default("rdw/db-writes")
        assert storage.get_concurrency_info("rdw/db-writes").slot_count == 1
        storage.claim_concurrency_slot("rdw/db-writes", "another-write-run", "its-step")
        log = tmp_path / "dg_launch.log"
        launch = dg_cli_process(
            "launch", "--assets", "execution_id_indexes", env=dagster_home, log=log
        )
        try:
            deadline = time.monotonic() + 120
            while "blocked by limit for pool rdw/db-writes" not in launch_log(instance):
                assert launch.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "dg launch never waited for the slot"
                time.sleep(1)
            time.sleep(3)
            assert sql_exec(indexes) == [(0,)], "the write ran beside another write"
            storage.free_concurrency_slots_for_run("another-write-run")
            launch.wait(timeout=240)
        finally:
            if launch.poll() is None:
                launch.kill()
        assert launch.returncode == 0, log.read_text()[-3000:]
    assert sql_exec(indexes) == [(2,)]


def launch_log(instance: dg.DagsterInstance) -> str:
    """The engine messages of every run of the instance, one per line."""
    return "\n".join(
        record.event_log_entry.user_message
        for run in instance.get_runs()
        for record in instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT
        ).records
    )


def test_every_write_asset_and_op_sits_in_the_write_pool():
    job = defs.resolve_implicit_global_asset_job_def()
    pools = {node.name: node.definition.pool for node in job.graph.node_dict.values()}
    for name in ("execution_id_indexes", "execution_id_rollback", "execution_id_restore"):
        assert pools[name] == "rdw/db-writes", name
    for job_name, op in [
        ("add_execution_id_foreign_key", "add_foreign_key"),
        ("weekly_collection", "collect_weeks"),
    ]:
        assert (
            defs.resolve_job_def(job_name).graph.node_named(op).definition.pool == "rdw/db-writes"
        )


# -- 6. no session idles in a transaction for ever ----------------------------------------


def test_connections_end_idle_transactions_and_keep_alive(database_url, sql_exec):
    with TargetDatabase(url=database_url).connect() as conn:
        assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("1min",)
        parameters = conn.info.get_parameters()
        assert {k: parameters.get(k) for k in ("keepalives", "keepalives_idle")} == {
            "keepalives": "1",
            "keepalives_idle": "30",
        }
        assert (parameters.get("keepalives_interval"), parameters.get("keepalives_count")) == (
            "10",
            "3",
        )
        # Server side too (0 on a Unix socket, where TCP keepalives do not apply).
        idle = conn.execute("SHOW tcp_keepalives_idle").fetchone()[0]
        socket_path = conn.info.host.startswith("/")
        assert idle == ("0" if socket_path else "30")

    db = TargetDatabase(url=database_url, idle_in_transaction_timeout_ms=300)
    with db.connect() as conn:
        pid = conn.info.backend_pid
        conn.execute("SELECT id FROM report_data_weeks LIMIT 1 FOR UPDATE")  # a row lock
        time.sleep(1.5)  # the worker "dies" inside its transaction
        assert sql_exec("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]) == [(0,)]
        with pytest.raises(psycopg.Error, match="idle-in-transaction"):
            conn.execute("SELECT 1")
    # The row lock went with the session: another writer gets the row at once.
    sql_exec("SET lock_timeout = '100ms'; UPDATE report_data_weeks SET status = status")


# -- 7. the polling sensor and a date in 2099; the write lock's session ---------------------


def test_a_future_completed_at_does_not_silence_the_sensor(database_url, sql_exec):
    cursor = tick(None, database_url).cursor
    future = complete(sql_exec, 1, at="'2099-01-01T00:00:00Z'")
    data = tick(cursor, database_url)
    assert not data.run_requests
    assert "in the future" in data.skip_message or "after the database's now()" in data.skip_message
    assert future[0] in data.skip_message
    watermark = ExecutionsCursor.from_json(data.cursor).watermark
    assert watermark.year < 2099

    later = complete(sql_exec, 1)
    data = tick(data.cursor, database_url)
    assert data.run_requests and data.run_requests[0].tags["rdw/new_executions"] == "1"
    assert set(later) <= set(ExecutionsCursor.from_json(data.cursor).seen)
    assert future[0] not in ExecutionsCursor.from_json(data.cursor).seen

    # A first tick, and a cursor already pushed to 2099 by the code before the fix.
    first = tick(None, database_url)
    assert ExecutionsCursor.from_json(first.cursor).watermark.year < 2099
    poisoned = ExecutionsCursor(dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc)).to_json()
    again = complete(sql_exec, 1)
    data = tick(poisoned, database_url)
    assert data.run_requests, data.skip_message
    assert set(again) <= set(ExecutionsCursor.from_json(data.cursor).seen)


def terminate(sql_exec, pid: int) -> None:
    sql_exec("SELECT pg_terminate_backend(%s)", [pid])


def test_a_lost_write_lock_stops_the_next_change(db, sql_exec):
    with pytest.raises(dg.Failure, match="was lost"):  # and again as the job ends
        with exclusive_write(db, "some_write_job") as lock:
            terminate(sql_exec, lock.pid)
            # The job's next connection (each batch, each DDL) refuses to start.
            with pytest.raises(dg.Failure, match="write lock .* was lost") as err:
                with db.connect():
                    pass
            assert "some_write_job stopped" in err.value.description
            with pytest.raises(dg.Failure, match="was lost"):
                lock.check()
    # Nothing checked it in between: the job still fails as the lock turns out lost.
    with pytest.raises(dg.Failure, match="was lost"):
        with exclusive_write(db, "some_write_job") as lock:
            terminate(sql_exec, lock.pid)
    # Held throughout: the check passes and the lock is released.
    with exclusive_write(db, "some_write_job") as lock:
        lock.check()
    with exclusive_write(db, "next_job"):
        pass


def test_a_write_job_whose_lock_session_is_killed_fails(database_url, sql_exec, run_job):
    stop = threading.Event()
    killed = []

    def killer():
        while not stop.is_set() and not killed:
            rows = sql_exec(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s",
                [LOCK_CLASS],
            )
            for (pid,) in rows:
                terminate(sql_exec, pid)
                killed.append(pid)
            time.sleep(0.002)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        result = run_job("create_execution_id_indexes")
    finally:
        stop.set()
        thread.join()
    assert killed, "the job ended before its lock was seen"
    assert not result.success
    assert "write lock" in failure_text(result) and "was lost" in failure_text(result)
