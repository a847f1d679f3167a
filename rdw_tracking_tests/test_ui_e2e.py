"""End to end through the UI's own API: `dg dev` against the test database.

Starts `dg dev` (webserver, daemon, code server) from the repository root as a clone
runs it: the top-level `workspace.yaml`, and no DAGSTER_HOME, so Dagster's temporary
instance reads the top-level `dagster.yaml`, with its storage (RDW_DAGSTER_STORAGE_URL)
in a fresh PostgreSQL database. It asks its GraphQL API for the contract's names,
launches `post_collection_validation` with Dagster's `DagsterGraphQLClient`, and sees it
succeed with its checks evaluated and its run and events stored in PostgreSQL.
"""

import os
import shutil
import time
from pathlib import Path

import psycopg
import pytest
from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient

from rdw_tracking import devserver
from rdw_tracking.devserver import free_port, graphql, sqlalchemy_url

from .conftest import create_database, drop_database

LOCATION = "rdw_tracking"
STARTUP_TIMEOUT = 150
ROOT = Path(__file__).resolve().parents[1]

CONTRACT_ASSETS = {
    "report_data_weeks",
    "workflow_executions",
    "report_data_collections",
    "execution_id_schema",
    "execution_id_indexes",
    "execution_id_population",
    "execution_id_join_plan",
    "execution_id_storage",
    "execution_id_rollback",
}
CONTRACT_CHECKS = {
    "execution_id_column_contract",
    "execution_id_foreign_key",
    "execution_id_indexes_valid",
    "execution_id_recent_population_rate",
    "execution_ids_exist",
    "execution_id_population_trend",
    "execution_id_join_uses_index",
}
CONTRACT_JOBS = {
    "verify_execution_tracking",
    "create_execution_id_indexes",
    "add_execution_id_foreign_key",
    "rollback_execution_id",
    "restore_execution_id",
    "post_collection_validation",
    "weekly_collection",
}
CONTRACT_SENSORS = {"collection_run_sensor", "workflow_executions_sensor"}
CONTRACT_SCHEDULES = {"daily_population_snapshot", "weekly_execution_tracking_verification"}

DEFINITIONS_QUERY = """
{
  assetNodes { assetKey { path } description
    assetChecksOrError { ... on AssetChecks { checks { name description } } } }
  repositoriesOrError { ... on RepositoryConnection { nodes {
    name location { name }
    jobs { name }
    sensors { name sensorState { status } }
    schedules { name cronSchedule executionTimezone }
  } } }
}
"""

RUN = """
query Run($runId: ID!) {
  runOrError(runId: $runId) { ... on Run { status } }
  logsForRun(runId: $runId) { ... on EventConnection { events {
    __typename
    ... on MaterializationEvent { assetKey { path } }
    ... on AssetCheckEvaluationEvent { evaluation { checkName success } } } } }
}
"""


@pytest.fixture
def dagster_dev(tmp_path, admin_url, database_url):
    """A running `dg dev` from the repository root, on its top-level workspace.yaml and
    dagster.yaml; yields (port, storage libpq URL). Stopped by its pid."""
    storage_name = f"rdw_test_dagster_{os.getpid()}"
    storage = create_database(admin_url, storage_name)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"},
        "RDW_DAGSTER_STORAGE_URL": sqlalchemy_url(storage),
        "RDW_DATABASE_URL": database_url,
    }
    log = (tmp_path / "dagster_dev.log").open("w")
    # Dagster's temporary instance folders, made in the root; a stopped group leaves them.
    before = set(ROOT.glob(".tmp_dagster_home_*"))
    proc = devserver.start(Path("workspace.yaml"), port, env=env, log=log, cwd=ROOT)
    try:
        # ~20 s on an idle 2-core machine; far more when other suites share its cores
        try:
            devserver.wait_ready(proc, port, STARTUP_TIMEOUT)
        except (RuntimeError, TimeoutError) as err:
            pytest.fail(f"{err}\n{(tmp_path / 'dagster_dev.log').read_text()[-3000:]}")
        yield port, storage
    finally:
        devserver.stop(proc, timeout_s=15)
        log.close()
        for folder in set(ROOT.glob(".tmp_dagster_home_*")) - before:
            shutil.rmtree(folder, ignore_errors=True)
        drop_database(admin_url, storage_name)


@pytest.mark.timeout(360)
def test_ui_shows_the_contract_and_runs_validation(dagster_dev):
    port, storage = dagster_dev
    data = graphql(port, DEFINITIONS_QUERY)
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    assert CONTRACT_ASSETS <= set(nodes)
    assert all(nodes[key]["description"] for key in CONTRACT_ASSETS)
    checks = {
        c["name"]: c
        for n in nodes.values()
        for c in (n["assetChecksOrError"] or {}).get("checks", [])
    }
    assert CONTRACT_CHECKS <= set(checks)
    assert all(checks[name]["description"] for name in CONTRACT_CHECKS)
    [repo] = data["repositoriesOrError"]["nodes"]
    assert repo["location"]["name"] == LOCATION
    assert CONTRACT_JOBS <= {j["name"] for j in repo["jobs"]}
    sensors = {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
    assert {name: sensors.get(name) for name in CONTRACT_SENSORS} == dict.fromkeys(
        CONTRACT_SENSORS, "RUNNING"
    )
    schedules = {s["name"]: s for s in repo["schedules"]}
    assert CONTRACT_SCHEDULES <= set(schedules)
    assert {s["executionTimezone"] for s in schedules.values()} == {"UTC"}

    # Launch as the UI's Launch button does, through Dagster's own GraphQL client.
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    run_id = client.submit_job_execution(
        "post_collection_validation",
        repository_location_name=LOCATION,
        repository_name=repo["name"],
        run_config={},
    )

    deadline = time.monotonic() + 75
    while True:
        status = client.get_run_status(run_id)
        if status in (
            DagsterRunStatus.SUCCESS,
            DagsterRunStatus.FAILURE,
            DagsterRunStatus.CANCELED,
        ):
            break
        assert time.monotonic() < deadline, f"run {run_id} still {status} after 75 s"
        time.sleep(1)
    assert status == DagsterRunStatus.SUCCESS
    # The run's events: the client has no call for them, so the UI's own query.
    run = graphql(port, RUN, {"runId": run_id})
    assert run["runOrError"]["status"] == "SUCCESS"
    events = run["logsForRun"]["events"]
    materialized = {
        "/".join(e["assetKey"]["path"]) for e in events if e["__typename"] == "MaterializationEvent"
    }
    evaluated = {
        e["evaluation"]["checkName"]
        for e in events
        if e["__typename"] == "AssetCheckEvaluationEvent"
    }
    # every check of every asset the validation materialized was evaluated; the history's
    # days it publishes are not its step (their reconcile runs in the weekly verification)
    expected = {
        c["name"]
        for key in materialized - {"execution_id_daily_population"}
        for c in (nodes[key]["assetChecksOrError"] or {}).get("checks", [])
    }
    assert materialized and expected and evaluated == expected

    with psycopg.connect(storage) as conn:
        stored = conn.execute("SELECT status FROM runs WHERE run_id = %s", [run_id]).fetchone()
        events = conn.execute(
            "SELECT count(*) FILTER (WHERE dagster_event_type = 'ASSET_CHECK_EVALUATION'), "
            "count(*) FROM event_logs WHERE run_id = %s",
            [run_id],
        ).fetchone()
    assert stored == ("SUCCESS",)
    assert events[0] == len(evaluated) and events[1] > events[0]
