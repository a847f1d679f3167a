"""workflow_executions_sensor tick time at N executions; --latency: collection to validation.

Default mode: N `workflow_executions` rows (inserted server-side with generate_series in a
schema of their own, `bench_sensor`), then sensor ticks as the daemon evaluates them:
the first tick, empty ticks, and ticks that each find 10 new completions; without and
then with `idx_workflow_executions_completed_at` (built CONCURRENTLY).

`--latency`: starts `dg dev` (webserver + daemon) on a database of its own, launches
`weekly_collection` through GraphQL and measures from that run's end to the last check
evaluation of the `post_collection_validation` run that `collection_run_sensor` requested.
"""

import datetime as dt
import os
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import dagster as dg
import psycopg
from dagster_graphql import DagsterGraphQLClient
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from rdw_tracking import demo, deploy, devserver
from rdw_tracking.devserver import graphql, sqlalchemy_url
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.sensors import INDEX_NAME, ExecutionsPolling, workflow_executions_sensor
from rdw_tracking.walkthrough import evaluate

TITLE = "Sensor tick time and collection-to-validation latency"
NOTES = (
    "Target: a tick under 100 ms at 1M and 5M workflow_executions rows; a collection run's "
    "validation checks evaluated under 60 s after it succeeds, under `dg dev` with the "
    "daemon (`--latency`; collection_run_sensor ticks every 15 s)."
)
SCHEMA = "bench_sensor"


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--ticks", type=int, default=20, help="timed ticks per case")
    parser.add_argument(
        "--latency", action="store_true", help="measure collection -> validation under dg dev"
    )
    parser.add_argument("--repeats", type=int, default=3, help="collection runs in --latency")


def run(args) -> list[dict]:
    if args.latency:
        # RESULTS.md keeps one section per name: the latency table gets its own.
        args.name = "sensor --latency"
        return latency(args)
    return tick_times(args)


# -- tick time ----------------------------------------------------------------------------

FILL = """
INSERT INTO {executions} (id, status, created_at, completed_at, workflow_name)
SELECT gen_random_uuid(),
       CASE WHEN n %% 100 = 0 THEN 'running' ELSE 'completed' END,
       now() - make_interval(mins => n::int) - interval '1 hour',
       CASE WHEN n %% 100 = 0 THEN NULL ELSE now() - make_interval(mins => n::int) END,
       'bench'
FROM generate_series(1, %s) AS n
"""
COMPLETE = """
INSERT INTO {executions} (status, created_at, completed_at, workflow_name)
SELECT 'completed', now(), clock_timestamp(), 'bench' FROM generate_series(1, 10)
"""


def prepare(url: str, rows: int) -> None:
    names = demo.DemoNames(schema=SCHEMA)
    ids = names.ids()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ids["schema"]))
        demo.create_tables(conn, names)
        conn.execute(sql.SQL(FILL).format(**ids), [rows])
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(ids["executions"]))


def tick(
    instance: dg.DagsterInstance, db: TargetDatabase, cursor: str | None
) -> tuple[float, str | None, int]:
    """(ms, cursor after, runs requested) of one evaluation, on an instance as the daemon's
    (without one, Dagster builds an ephemeral instance per tick, which would dominate)."""
    resources = {"target_db": db, "executions_polling": ExecutionsPolling()}
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        started = time.perf_counter()
        data = evaluate(workflow_executions_sensor, context)
        ms = (time.perf_counter() - started) * 1000
        return ms, data.cursor or context.cursor, len(data.run_requests or [])


def measure(
    instance: dg.DagsterInstance, url: str, db: TargetDatabase, rows: int, index: bool, ticks: int
) -> dict:
    first_ms, cursor, _ = tick(instance, db, None)
    empty = []
    busy = []
    for _ in range(ticks):
        ms, cursor, requested = tick(instance, db, cursor)
        assert requested == 0
        empty.append(ms)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL(COMPLETE).format(executions=db.executions))
        ms, cursor, requested = tick(instance, db, cursor)
        assert requested == 1
        busy.append(ms)
    return {
        "rows": rows,
        "completed_at_index": "yes" if index else "no",
        "first_tick_ms": round(first_ms, 1),
        "empty_tick_median_ms": round(statistics.median(empty), 1),
        "new_completions_tick_median_ms": round(statistics.median(busy), 1),
        "tick_max_ms": round(max(empty + busy), 1),
    }


def tick_times(args) -> list[dict]:
    results = []
    db = TargetDatabase(url=args.url, schema_name=SCHEMA)
    with dg.instance_for_test() as instance:
        for rows in args.rows:
            results += tick_times_at(instance, args, db, rows)
    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    return results


def tick_times_at(instance: dg.DagsterInstance, args, db: TargetDatabase, rows: int) -> list[dict]:
    """Both cases at `rows` executions: without the completed_at index, then with it."""
    started = time.monotonic()
    prepare(args.url, rows)
    print(f"{rows:,} executions in {time.monotonic() - started:.1f} s", flush=True)
    results = [measure(instance, args.url, db, rows, index=False, ticks=args.ticks)]
    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE INDEX CONCURRENTLY {} ON {} (completed_at)"  # as the index job builds it
            ).format(sql.Identifier(INDEX_NAME), db.executions)
        )
    results.append(measure(instance, args.url, db, rows, index=True, ticks=args.ticks))
    print(harness_row(results), flush=True)
    return results


def harness_row(rows: list[dict]) -> str:
    return "; ".join(f"{r['completed_at_index']} index: max {r['tick_max_ms']} ms" for r in rows)


# -- latency under dg dev --------------------------------------------------------------


def with_database(url: str, database: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = database
    return make_conninfo("", **params)


def fresh_database(url: str, name: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(url, name)


SENSOR_TICKS = """
query Ticks($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) { ... on Sensor { sensorState { ticks(limit: 1) { status } } } }
}
"""
RUN = """
query Run($runId: ID!) {
  runOrError(runId: $runId) { ... on Run { status endTime } }
  logsForRun(runId: $runId) { ... on EventConnection { events {
    __typename ... on AssetCheckEvaluationEvent { timestamp } } } }
}
"""
TRIGGERED = """
query Triggered($tags: [ExecutionTag!]) {
  runsOrError(filter: {tags: $tags}) { ... on Runs { results { runId status } } }
}
"""


def wait_for(what: str, probe, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: nothing after {timeout:.0f} s")
        time.sleep(every)


def finished(port: int, run_id: str) -> dict | None:
    data = graphql(port, RUN, {"runId": run_id})
    run = data["runOrError"]
    if run["status"] in ("FAILURE", "CANCELED"):
        raise RuntimeError(f"run {run_id} ended {run['status']}")
    return data if run["status"] == "SUCCESS" else None


def triggered(port: int, run_id: str) -> str | None:
    """Id of the run that collection_run_sensor requested for `run_id`, once it exists."""
    tags = [{"key": "rdw/triggered_by_run", "value": run_id}]
    runs = graphql(port, TRIGGERED, {"tags": tags})["runsOrError"]["results"]
    return runs[0]["runId"] if runs else None


def latency(args) -> list[dict]:
    target = fresh_database(args.url, "rdw_bench_latency")
    demo.build(target, demo.DemoShape(rows=20_000))
    storage = fresh_database(args.url, "rdw_bench_dagster")
    home = Path(tempfile.mkdtemp(prefix="rdw_bench_home_"))
    shutil.copyfile(deploy.DAGSTER_YAML, home / "dagster.yaml")
    port = devserver.free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "RDW_DAGSTER_STORAGE_URL": sqlalchemy_url(storage),
        "RDW_DATABASE_URL": target,
    }
    proc = devserver.start(
        deploy.WORKSPACE_YAML, port, env=env, log=(home / "dagster_dev.log").open("w")
    )
    results = []
    try:
        wait_for("dg dev", lambda: graphql(port, "{ version }")["version"], 120)
        location = {"repositoryLocationName": "rdw_tracking", "repositoryName": "__repository__"}
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        # The run-status sensor's first tick sets its cursor after every run so far: wait
        # for it, or the first collection run would count as history.
        wait_for(
            "collection_run_sensor's first tick",
            lambda: graphql(
                port,
                SENSOR_TICKS,
                {"selector": {**location, "sensorName": "collection_run_sensor"}},
            )["sensorOrError"]["sensorState"]["ticks"],
            120,
            every=1,
        )
        for attempt in range(args.repeats):
            run_id = client.submit_job_execution(
                "weekly_collection",
                repository_location_name=location["repositoryLocationName"],
                repository_name=location["repositoryName"],
            )
            collection = wait_for("weekly_collection", partial(finished, port, run_id), 120)
            ended = collection["runOrError"]["endTime"]
            validation_id = wait_for("the triggered run", partial(triggered, port, run_id), 180)
            validation = wait_for("validation", partial(finished, port, validation_id), 180)
            checked = max(
                float(e["timestamp"]) / 1000
                for e in validation["logsForRun"]["events"]
                if e["__typename"] == "AssetCheckEvaluationEvent"
            )
            seconds = round(checked - ended, 1)
            print(
                f"collection {attempt + 1}: checks evaluated {seconds} s after success", flush=True
            )
            results.append(
                {
                    "collection_run": run_id[:8],
                    "validation_run": validation_id[:8],
                    "collection_ended_utc": f"{dt.datetime.fromtimestamp(ended, dt.timezone.utc):%H:%M:%S}",
                    "success_to_checks_s": seconds,
                    "under_60_s": seconds < 60,
                }
            )
    finally:
        devserver.stop(proc)
        shutil.rmtree(home, ignore_errors=True)
    return results
