"""Run retries: a rollback that failed mid-way is launched again and resumes by itself.

The daemon's retry re-executes the failed run with its own run config (strategy
ALL_STEPS). Here the first run loses its batch connection mid-way, and the re-execution
is made in process the same way (`dg.execute_job` with `ReexecutionOptions` of the
failed run): it must continue the same rollback_id, not start another.
"""

import threading
from pathlib import Path

import dagster as dg
import yaml

from rdw_tracking.definitions import defs
from rdw_tracking.rollback import ROLLBACK_APPLICATION_NAME
from rdw_tracking_tests.assets.test_rollback import (
    BACKUP,
    add_recent_rows,
    days_ago,
    last_matched_row_locked,
    rollback_config,
)
from rdw_tracking_tests.conftest import materialization_metadata

ROOT = Path(__file__).resolve().parents[1]


def rollback_job() -> dg.JobDefinition:
    return defs.resolve_job_def("rollback_execution_id")


def test_rollback_and_restore_ask_to_be_retried():
    for name in ("rollback_execution_id", "restore_execution_id"):
        tags = defs.resolve_job_def(name).tags
        assert tags["dagster/max_retries"] == "2"
        assert tags["dagster/retry_strategy"] == "ALL_STEPS"
        assert tags["rdw/db-writes"] == "true"
    # Read-only jobs are rerun by their schedule or sensor instead.
    assert "dagster/max_retries" not in defs.resolve_job_def("verify_execution_tracking").tags


def test_dagster_yaml_turns_run_retries_on_for_tagged_jobs_only():
    config = yaml.safe_load((ROOT / "rdw_tracking" / "deploy" / "dagster.yaml").read_text())
    assert config["run_retries"] == {"enabled": True, "max_retries": 0}
    settings = {key: config[key] for key in ("run_retries", "run_monitoring")}
    with dg.instance_for_test(overrides=settings) as instance:
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 0
        assert instance.run_monitoring_enabled


def test_a_retried_rollback_resumes_the_same_rollback_id(database_url, sql_exec):
    add_recent_rows(sql_exec, 6_000)
    cutoff = days_ago(20)
    config = rollback_config(cutoff_date=cutoff, dry_run=False, batch_size=100)
    job = dg.reconstructable(rollback_job)
    killed = threading.Event()

    def killer():
        with last_matched_row_locked(database_url, cutoff, sql_exec):
            sql_exec(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND datname = current_database()",
                [ROLLBACK_APPLICATION_NAME],
            )
            killed.set()

    with dg.instance_for_test() as instance:
        thread = threading.Thread(target=killer)
        thread.start()
        with dg.execute_job(job, instance, run_config=config) as first:
            thread.join()
            assert killed.is_set() and not first.success
            parent = first.run_id
        [(started,)] = sql_exec(f"SELECT DISTINCT rollback_id::text FROM {BACKUP}")  # noqa: S608

        with dg.execute_job(
            job, instance, reexecution_options=dg.ReexecutionOptions(parent_run_id=parent)
        ) as retry:
            assert retry.success
            assert retry.dagster_run.parent_run_id == parent
            assert retry.dagster_run.run_config == first.dagster_run.run_config
            meta = materialization_metadata(retry, "execution_id_rollback")
    assert meta["resumed"] is True and meta["rollback_id"] == started
    assert sql_exec(f"SELECT count(DISTINCT rollback_id) FROM {BACKUP}") == [(1,)]  # noqa: S608
