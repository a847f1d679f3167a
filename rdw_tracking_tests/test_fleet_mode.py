"""Fleet mode on real PostgreSQL: six databases looked after by one set of definitions.

The fleet: five reachable databases with their own row counts, two of them in other
schemas under other table names, one range-partitioned, and one database whose URL
points at a closed port. Built once for the module (each is a few thousand demo rows);
the tests only read them, except the write tests, which build the indexes (idempotent)
and insert completed executions (which no other test counts).

The definitions are built from the fleet file the way `definitions.py` builds them at
import (`fleet_databases(fleet.load())`), with RDW_FLEET_FILE and the URL variables set
in this process, as a deployment sets them.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from psycopg import sql

from rdw_tracking import deploy, fleet
from rdw_tracking.demo import DemoNames, DemoShape
from rdw_tracking.sensors import ExecutionsPolling
from rdw_tracking.walkthrough import evaluate
from rdw_tracking.writes import LOCK_CLASS
from rdw_tracking_tests import fleet_runs, test_celery
from rdw_tracking_tests.conftest import create_database, drop_database, materialization_metadata
from rdw_tracking_tests.fleet_runs import failures
from rdw_tracking_tests.test_celery import REPO, step_pids, worker_of_steps

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"
# test_celery's fixtures: its session queue, the workers' -y file, real workers.
celery_setup = test_celery.celery_setup
workers = test_celery.workers
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass(frozen=True)
class Member:
    """One database of the test fleet: its rows, names and layout."""

    rows: int
    names: DemoNames = DemoNames()
    layout: str = "ordinary"

    def entry(self, name: str) -> dict:
        """Its fleet file entry: the env var of its URL, and only the fields that differ."""
        fields = {
            "schema_name": self.names.schema,
            "weeks_table": self.names.weeks,
            "executions_table": self.names.executions,
            "collections_table": self.names.collections,
        }
        defaults = dict(zip(fields, DemoNames().__dict__.values(), strict=True))
        own = {k: v for k, v in fields.items() if v != defaults[k]}
        return {"name": name, "url_env": url_env(name), **own}


MEMBERS = {
    "alpha": Member(1_040),
    "beta": Member(1_300, DemoNames(schema="reporting", weeks="report_weeks")),
    "omega": None,  # unreachable: a closed port; in the middle, so later ones still run
    "gamma": Member(1_560, layout="range"),
    "delta": Member(
        1_820,
        DemoNames(
            schema="analytics",
            weeks="weekly_rows",
            executions="executions",
            collections="collections",
        ),
    ),
    "epsilon": Member(2_080),
}
REACHABLE = [name for name, member in MEMBERS.items() if member is not None]


def url_env(name: str) -> str:
    return f"RDW_TEST_FLEET_URL_{name.upper()}"


@dataclass
class FleetUnderTest:
    path: Path
    defs: dg.Definitions
    urls: dict[str, str]  # the reachable databases'

    def weeks(self, name: str) -> sql.Identifier:
        names = MEMBERS[name].names
        return sql.Identifier(names.schema, names.weeks)

    def counts(self, name: str) -> tuple[int, int]:
        """(rows, rows with execution_id) of the database's own weeks table."""
        with psycopg.connect(self.urls[name]) as conn:
            query = sql.SQL("SELECT count(*), count(execution_id) FROM {}")
            return conn.execute(query.format(self.weeks(name))).fetchone()

    def complete(self, name: str, count: int = 1, at: str = "now()") -> list[str]:
        """Insert `count` completed executions (completed_at = `at`) into the database's
        executions table; their ids."""
        names = MEMBERS[name].names
        statement = sql.SQL(
            "INSERT INTO {} (status, completed_at) SELECT 'completed', " + at + " "
            "FROM generate_series(1, %s) RETURNING id::text"
        ).format(sql.Identifier(names.schema, names.executions))
        with psycopg.connect(self.urls[name], autocommit=True) as conn:
            return sorted(row[0] for row in conn.execute(statement, [count]))


@pytest.fixture(scope="module")
def test_fleet(admin_url, tmp_path_factory) -> Iterator[FleetUnderTest]:
    from rdw_tracking import definitions, demo
    from rdw_tracking.demo_layouts import relayout

    databases = {name: f"rdw_test_{os.getpid()}_fleet_{name}" for name in REACHABLE}
    urls = {}
    path = tmp_path_factory.mktemp("fleet") / "fleet.yaml"
    with pytest.MonkeyPatch.context() as env:
        try:
            for name, database in databases.items():
                member = MEMBERS[name]
                urls[name] = create_database(admin_url, database)
                demo.build(urls[name], DemoShape(rows=member.rows), member.names)
                relayout(urls[name], member.layout, member.names)
            entries = [
                MEMBERS[name].entry(name)
                if MEMBERS[name]
                else {"name": name, "url_env": url_env(name)}
                for name in MEMBERS
            ]
            path.write_text(yaml.safe_dump({"databases": entries}, sort_keys=False))
            env.setenv(fleet.FLEET_ENV, str(path))
            for name in MEMBERS:
                env.setenv(url_env(name), urls.get(name, UNREACHABLE))
            env.delenv("RDW_EXECUTOR", raising=False)
            env.delenv("RDW_DATABASE_URL", raising=False)
            yield FleetUnderTest(path, definitions.fleet_databases(fleet.load()), urls)
        finally:
            for database in databases.values():
                drop_database(admin_url, database)


def run(test_fleet: FleetUnderTest, job: str, name: str, instance, **kwargs):
    return test_fleet.defs.resolve_job_def(job).execute_in_process(
        instance=instance,
        partition_key=name,
        run_config={**QUIET, **kwargs.pop("run_config", {})},
        raise_on_error=False,
        **kwargs,
    )


# -- every database validated, the unreachable one failing alone --------------------------


@pytest.mark.timeout(900)
def test_every_database_is_validated_on_its_own_table(test_fleet):
    with dg.instance_for_test() as instance:
        outcomes = {
            (job, name): run(test_fleet, job, name, instance)
            for name in MEMBERS
            for job in ("verify_execution_tracking", "post_collection_validation")
        }
    for (job, name), result in outcomes.items():
        tags = result.dagster_run.tags
        assert tags["rdw/database"] == name and tags["rdw/reads"] == name, tags
        assert "rdw/db-writes" not in tags
        if name == "omega":
            assert not result.success, f"{job} on the unreachable database succeeded"
            messages = failures(result)
            assert messages and all("fleet database omega" in m for m in messages), messages
            assert all("cannot connect to PostgreSQL" in m for m in messages), messages
            # The way out is the entry's own env var, not the single database's.
            assert all("url_env of 'omega' in the fleet file" in m for m in messages), messages
            assert not any("RDW_DATABASE_URL" in m for m in messages), messages
            continue
        assert result.success, (job, name, failures(result))
        population = materialization_metadata(result, "execution_id_population")
        rows, stamped = test_fleet.counts(name)
        assert (population["total_rows"], population["with_execution_id"]) == (rows, stamped)
        assert rows == MEMBERS[name].rows
        partitions = {
            e.event_specific_data.materialization.partition
            for e in result.get_asset_materialization_events()
            if e.event_specific_data.materialization.asset_key.to_user_string()
            == "execution_id_population"
        }
        assert partitions == {name}
        if job == "verify_execution_tracking":
            schema = materialization_metadata(result, "execution_id_schema")
            assert schema["data_type"] == "uuid"


# -- the polling sensor: one cursor per database --------------------------------------------


def tick(test_fleet: FleetUnderTest, instance, cursor: str | None):
    sensor = test_fleet.defs.resolve_sensor_def("workflow_executions_sensor")
    with dg.build_sensor_context(
        cursor=cursor, instance=instance, resources={"executions_polling": ExecutionsPolling()}
    ) as context:
        return evaluate(sensor, context)


def requested(requests) -> dict[str, list[str]]:
    """{database: execution ids} of one tick's run requests, each checked to be for its
    own database: partition key, tags and run key agree."""
    found = {}
    for request in requests:
        name = request.partition_key
        assert request.tags["rdw/database"] == name and request.tags["rdw/reads"] == name
        assert request.run_key.startswith(f"{name}:")
        assert name not in found, f"two requests for {name} in one tick"
        found[name] = request.run_config["ops"]["execution_id_population"]["config"][
            "execution_ids"
        ]
    return found


@pytest.mark.timeout(300)
def test_each_database_has_its_own_cursor_under_interleaved_completions(test_fleet):
    a, b = "alpha", "delta"  # delta: analytics.executions
    with dg.instance_for_test() as instance:
        first = tick(test_fleet, instance, None)
        assert not first.run_requests and "first tick" in first.skip_message
        assert "omega: failed" in first.skip_message
        assert "fleet database omega" in first.skip_message
        cursors = json.loads(first.cursor)
        assert set(cursors) == set(REACHABLE)  # the unreachable one has none yet

        steps: list[dict[str, list[str]]] = []
        ticks = [first]

        def step(*completions: tuple[str, int, str]) -> None:
            """Insert these completions, then tick from the last tick's cursor."""
            steps.append({})
            for name, count, at in completions:
                steps[-1].setdefault(name, []).extend(test_fleet.complete(name, count, at))
            ticks.append(tick(test_fleet, instance, ticks[-1].cursor))

        step((a, 1, "now()"))
        # Half an hour before alpha's newest, past the 10-minute look-back: one cursor
        # shared by the fleet would never look there again; delta's own has not moved.
        step((b, 1, "now() - interval '30 minutes'"), (a, 1, "now()"))
        step((b, 2, "now()"))  # a tie: both in one statement, one completed_at
        step((a, 1, "now()"), (b, 1, "now()"))
        step()  # nothing new anywhere

        per_tick = [requested(t.run_requests) for t in ticks[1:]]
        assert [{k: sorted(v) for k, v in found.items()} for found in per_tick] == steps
        assert "no execution completed since" in ticks[-1].skip_message
        assert "omega: failed" in ticks[-1].skip_message
        assert set(json.loads(ticks[-1].cursor)) == set(REACHABLE)

        # Every new execution requested exactly once, in a request for its own database.
        seen = collections.Counter(
            (name, execution)
            for found in per_tick
            for name, ids in found.items()
            for execution in ids
        )
        assert all(count == 1 for count in seen.values()), seen
        assert set(seen) == {
            (n, i) for inserted in steps for n, ids in inserted.items() for i in ids
        }

        # A request runs against its own database: delta's tie is judged there.
        tie = next(r for r in ticks[3].run_requests if r.partition_key == b)
        validation = run(
            test_fleet,
            tie.job_name or "post_collection_validation",
            b,
            instance,
            run_config=tie.run_config,
            tags={**tie.tags, "dagster/sensor_name": "workflow_executions_sensor"},
        )
    assert validation.success, failures(validation)
    verdict = {e.check_name: e for e in validation.get_asset_check_evaluations()}
    judged = verdict["execution_id_run_stamped"]
    assert judged.passed and judged.metadata["executions"].value == 2
    population = materialization_metadata(validation, "execution_id_population")
    assert population["total_rows"] == test_fleet.counts(b)[0]


# -- concurrency: per database, by the advisory lock and by the run queue ------------------


def write_locks(admin_url: str) -> dict[str, int]:
    """{database: backend pid} of every rdw_tracking write lock granted on the server."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT d.datname, l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s"
            " AND l.objsubid = 2",
            [LOCK_CLASS],
        ).fetchall()
    return dict(rows)


class Blocker:
    """A session idle in its transaction holding ROW EXCLUSIVE on a weeks table: an index
    build will not start behind it, and backs off (holding its write lock) until it ends."""

    def __init__(self, url: str, table: sql.Identifier):
        self.conn = psycopg.connect(url)
        self.conn.execute(sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(table))

    def release(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


# Back off briefly and often: the builds wait for the blockers the tests release.
PATIENT = {
    "ops": {"execution_id_indexes": {"config": {"lock_retries": 12, "retry_backoff_s": 0.25}}}
}


def wait_for(condition, timeout_s: float, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    return None


def conninfo_dbname(url: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    return conninfo_to_dict(url)["dbname"]


@pytest.mark.timeout(300)
def test_two_databases_build_their_indexes_at_once(test_fleet, admin_url):
    """Each run in a process of its own, as a run launcher starts them; while both back
    off behind a blocker on their own table, the server shows both write locks held."""
    names = ("alpha", "beta")
    databases = {conninfo_dbname(test_fleet.urls[name]) for name in names}
    blockers = [Blocker(test_fleet.urls[name], test_fleet.weeks(name)) for name in names]
    with fleet_runs.process_pool(2) as pool:
        try:
            runs = {
                name: fleet_runs.launch(pool, "create_execution_id_indexes", name, PATIENT)
                for name in names
            }
            both = wait_for(lambda: databases <= set(write_locks(admin_url)), timeout_s=180)
        finally:
            for blocker in blockers:
                blocker.release()
        outcomes = {name: future.result(timeout=180) for name, future in runs.items()}
    assert both, "the two write jobs never held their locks at the same time"
    for name, outcome in outcomes.items():
        assert outcome["success"], outcome["failures"]
        assert outcome["tags"]["rdw/db-writes"] == name
        assert outcome["tags"]["rdw/database"] == name
        assert outcome["metadata"]["execution_id_indexes"]["created"] == 2
    spans = sorted((o["started"], o["ended"]) for o in outcomes.values())
    assert spans[1][0] < spans[0][1], spans  # and so the runs' own spans overlap


@pytest.mark.timeout(300)
def test_two_writes_on_one_database_never_run_together(test_fleet, admin_url):
    """The second write on one database fails fast naming the first's session, and the
    first is not disturbed (without a run queue in between: the advisory lock alone)."""
    name = "delta"
    database = conninfo_dbname(test_fleet.urls[name])
    blocker = Blocker(test_fleet.urls[name], test_fleet.weeks(name))
    with fleet_runs.process_pool(2) as pool:
        try:
            first = fleet_runs.launch(pool, "create_execution_id_indexes", name, PATIENT)
            holder = wait_for(lambda: write_locks(admin_url).get(database), timeout_s=180)
            assert holder, "the first write job never took its lock"
            second = fleet_runs.launch(pool, "create_execution_id_indexes", name).result(180)
            # Still the first job's lock: the second never held it.
            assert write_locks(admin_url).get(database) == holder
        finally:
            blocker.release()
        first = first.result(timeout=180)
    assert not second["success"]
    [message] = second["failures"]
    assert "create_execution_id_indexes refused: another rdw_tracking write job" in message
    assert "analytics.weekly_rows" in message and f"pid {holder} " in message, message
    assert second["ended"] < first["ended"]  # refused while the first still ran
    assert first["success"], first["failures"]
    assert first["metadata"]["execution_id_indexes"]["created"] == 2


def test_run_queue_limits_each_database_by_dagster_yamls_own_rules(test_fleet):
    """The run-queue daemon's own choice of which queued runs to start, with the
    `concurrency:` block of the shipped dagster.yaml and the tags the fleet's jobs give
    a run launched for a partition."""
    from dagster._core.remote_origin import (
        RegisteredCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.test_utils import create_run_for_test
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
        QueuedRunCoordinatorDaemon,
    )

    concurrency = yaml.safe_load(deploy.DAGSTER_YAML.read_text())["concurrency"]
    origin = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("rdw_tracking"), "__repository__")

    def tags(job: str, name: str) -> dict[str, str]:
        return dict(test_fleet.defs.resolve_job_def(job).get_tags_for_partition_key(name, None))

    def dequeued(queued: list[tuple[str, str]], running: list[tuple[str, str]] = ()) -> list:
        """Labels ("job:database") of the queued runs the daemon would start now."""
        with dg.instance_for_test(overrides={"concurrency": concurrency}) as instance:
            labels = {}
            for job, name in running:
                create_run_for_test(
                    instance, job_name=job, status=dg.DagsterRunStatus.STARTED, tags=tags(job, name)
                )
            for job, name in queued:
                run = create_run_for_test(
                    instance,
                    job_name=job,
                    status=dg.DagsterRunStatus.QUEUED,
                    tags=tags(job, name),
                    remote_job_origin=RemoteJobOrigin(origin, job),
                )
                labels[run.run_id] = f"{job}:{name}"
            daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
            chosen = daemon._get_runs_to_dequeue(instance, instance.get_concurrency_config(), None)
            return [labels[r.run_id] for r in chosen]

    write, read = "create_execution_id_indexes", "verify_execution_tracking"
    rdw = {k: v for k, v in tags(write, "alpha").items() if k.startswith("rdw/")}
    assert rdw == {"rdw/database": "alpha", "rdw/db-writes": "alpha"}
    rdw = {k: v for k, v in tags(read, "alpha").items() if k.startswith("rdw/")}
    assert rdw == {"rdw/database": "alpha", "rdw/reads": "alpha"}
    # Two databases' writes start together; a second write on one database waits.
    assert dequeued([(write, "alpha"), (write, "alpha"), (write, "beta")]) == [
        f"{write}:alpha",
        f"{write}:beta",
    ]
    assert dequeued([(write, "alpha"), (write, "beta")], running=[(write, "alpha")]) == [
        f"{write}:beta"
    ]
    # Read-only runs: two at once per database.
    assert dequeued([(read, "alpha")] * 3 + [(read, "beta")]) == [
        f"{read}:alpha",
        f"{read}:alpha",
        f"{read}:beta",
    ]
    assert dequeued([(read, "alpha")], running=[(read, "alpha"), (read, "alpha")]) == []
    # A read never waits for a write on the same database (the advisory lock is the
    # write's alone), and the add-FK job counts as a write there too.
    assert dequeued(
        [(read, "alpha"), ("add_execution_id_foreign_key", "alpha")], [(write, "alpha")]
    ) == [f"{read}:alpha"]


def test_every_fleet_job_tags_its_runs_with_the_database(test_fleet):
    writes = {
        "create_execution_id_indexes",
        "add_execution_id_foreign_key",
        "rollback_execution_id",
        "restore_execution_id",
        "weekly_collection",
    }
    reads = {"verify_execution_tracking", "post_collection_validation"}
    jobs = {job.name: job for job in test_fleet.defs.resolve_all_job_defs()}
    assert writes | reads <= set(jobs)
    for name in jobs.keys() & (writes | reads):
        job = jobs[name]
        kind = "rdw/db-writes" if name in writes else "rdw/reads"
        for database in MEMBERS:
            tags = {**job.tags, **job.get_tags_for_partition_key(database, None)}
            assert tags["rdw/database"] == database and tags[kind] == database, (name, tags)
            # No global write slot: the value `true` would serialize the whole fleet.
            assert tags.get("rdw/db-writes") in (None, database), (name, tags)


POOLS_AND_PARTITIONS = """
import json
import dagster as dg
from rdw_tracking.definitions import defs

pools = {
    op.name: op.pool for job in defs.resolve_all_job_defs() for op in job.graph.iterate_op_defs()
}
partitions = {}
for key in defs.resolve_asset_graph().materializable_asset_keys:
    p = defs.resolve_assets_def(key).partitions_def
    dims = [d.name for d in p.partitions_defs] if isinstance(p, dg.MultiPartitionsDefinition) else None
    partitions[key.to_user_string()] = dims or p.get_partition_keys()
print(json.dumps({"pools": pools, "partitions": partitions}))
"""


def test_the_loaded_fleet_definitions_partition_by_database_with_no_global_write_pool(
    test_fleet,
):
    """What a code location loads from RDW_FLEET_FILE: every asset partitioned by the
    fleet's databases (the daily history by database x day), and no write op in the
    single-database pool `rdw/db-writes` (dagster.yaml gives it one slot for the whole
    deployment: a fleet serializes writes per database instead)."""
    proc = subprocess.run(
        [sys.executable, "-c", POOLS_AND_PARTITIONS],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"execution_id_indexes", "collect_weeks", "add_foreign_key"} <= set(loaded["pools"])
    assert set(loaded["pools"].values()) == {None}, loaded["pools"]
    partitions = loaded["partitions"]
    assert partitions.pop("execution_id_daily_population") == ["database", "day"]
    assert {"execution_id_schema", "execution_id_population", "execution_id_indexes"} <= set(
        partitions
    )
    assert all(keys == list(MEMBERS) for keys in partitions.values()), partitions


# -- celery: a fleet run's steps on two workers ----------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:Task name 'execute_plan' is already registered")
def test_a_fleet_run_on_celery_with_two_workers(test_fleet, workers):
    """`verify_execution_tracking` for one database on dagster-celery: every step in a
    worker (both take some), each pointed at that database by the run's partition."""
    from rdw_tracking_tests.celery_jobs import fleet_verify

    name = "beta"  # reporting.report_weeks
    workers.start("rdw_fleet_a", "rdw_fleet_b")
    job = test_fleet.defs.resolve_job_def("verify_execution_tracking")
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(
            dg.reconstructable(fleet_verify),
            instance=instance,
            run_config=QUIET,
            tags=job.get_tags_for_partition_key(name, None),
            raise_on_error=False,
        )
        assert result.success, failures(result)
        pids = step_pids(instance, result.run_id)
        nodes = {node for _, node in worker_of_steps(instance, result.run_id)}
        run = instance.get_run_by_id(result.run_id)
    assert run.tags["rdw/database"] == name and run.tags["dagster/partition"] == name
    assert pids and os.getpid() not in pids.values()
    assert nodes == set(workers.node.values()), nodes
    population = materialization_metadata(result, "execution_id_population")
    assert population["total_rows"] == test_fleet.counts(name)[0]


# -- a bad fleet file stops the definitions from loading ---------------------------------


@pytest.mark.parametrize(
    "entries, words",
    [
        (
            "[{name: eu, url_env: RDW_TEST_BAD_URL}, {name: eu, url_env: RDW_TEST_BAD_URL}]",
            "databases[1] ('eu') has the same name as databases[0]",
        ),
        (
            "[{name: eu, url_env: RDW_TEST_UNSET_URL}]",
            "databases[0] ('eu') names env RDW_TEST_UNSET_URL",
        ),
    ],
)
def test_a_bad_fleet_file_is_refused_when_the_definitions_load(tmp_path, entries, words):
    path = tmp_path / "fleet.yaml"
    path.write_text(f"databases: {entries}\n")
    env = {
        **os.environ,
        fleet.FLEET_ENV: str(path),
        "RDW_TEST_BAD_URL": "postgresql://rdw:hunter22@db.example/reports",
        "PYTHONPATH": str(REPO),
    }
    env.pop("RDW_TEST_UNSET_URL", None)
    proc = subprocess.run(
        [sys.executable, "-c", "import rdw_tracking.definitions"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rdw_tracking.fleet.FleetFileError: "), proc.stderr[-2000:]
    assert words in last and str(path) in last
    assert "hunter22" not in proc.stderr + proc.stdout
