"""The Definitions load, carry the contract's public names, and work through `dg`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from rdw_tracking.definitions import defs

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_JOBS = {
    "verify_execution_tracking",
    "create_execution_id_indexes",
    "add_execution_id_foreign_key",
    "post_collection_validation",
    "rollback_execution_id",
    "restore_execution_id",
    "weekly_collection",
}


def dg_cli_process(*args: str, env: dict, log: Path) -> subprocess.Popen:
    """`dg <args>` started from the project root, its output into the file `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dagster_dg_cli.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def dg_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`dg <args>` from the project root (its pyproject.toml's `[tool.dg]`), with this
    interpreter's venv."""
    return subprocess.run(
        [sys.executable, "-m", "dagster_dg_cli.cli", *args],
        cwd=ROOT,
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dg_check_defs(tmp_path):
    proc = dg_cli("check", "defs", env={**os.environ, "DAGSTER_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All definitions loaded successfully" in proc.stdout + proc.stderr
    assert "SupersessionWarning" not in proc.stdout + proc.stderr


def test_dg_list_defs_lists_the_contract(tmp_path):
    proc = dg_cli("list", "defs", "--json", env={**os.environ, "DAGSTER_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = json.loads(proc.stdout)
    assert CONTRACT_JOBS <= {job["name"] for job in listed["jobs"]}
    assert {"collection_run_sensor", "workflow_executions_sensor"} <= {
        sensor["name"] for sensor in listed["sensors"]
    }
    assert {"daily_population_snapshot", "weekly_execution_tracking_verification"} <= {
        schedule["name"] for schedule in listed["schedules"]
    }
    assert {"execution_id_schema", "execution_id_population"} <= {
        asset["asset_key"] for asset in listed["assets"]
    }


def test_dg_launch_runs_a_read_only_job(database_url, dagster_home, sql_exec):
    """`dg launch --job` runs the job against the database of RDW_DATABASE_URL and
    records the run in the instance's PostgreSQL storage."""
    before = sql_exec("SELECT count(*), sum(hashtext(t::text)) FROM report_data_weeks t")
    proc = dg_cli(
        "launch",
        "--job",
        "verify_execution_tracking",
        env={**dagster_home, "RDW_DATABASE_URL": database_url},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs(dg.RunsFilter(job_name="verify_execution_tracking"))
        assert [run.status for run in runs] == [dg.DagsterRunStatus.SUCCESS]
        checks = {
            record.event_log_entry.dagster_event.event_specific_data.check_name
            for record in instance.get_records_for_run(
                runs[0].run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
            ).records
        }
    assert {"execution_id_column_contract", "execution_id_indexes_valid"} <= checks
    assert sql_exec("SELECT count(*), sum(hashtext(t::text)) FROM report_data_weeks t") == before


def test_contract_assets_and_checks_present():
    repo = defs.get_repository_def()
    keys = {key.to_user_string() for key in repo.asset_graph.get_all_asset_keys()}
    assert {
        "report_data_weeks",
        "workflow_executions",
        "report_data_collections",
        "execution_id_schema",
    } <= keys
    checks = {key.name for key in repo.asset_graph.asset_check_keys}
    assert {"execution_id_column_contract", "execution_id_foreign_key"} <= checks
    assert "verify_execution_tracking" in {job.name for job in repo.get_all_jobs()}
