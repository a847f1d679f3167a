"""The Definitions load, and carry the contract's public names."""

import os
import subprocess
import sys
from pathlib import Path

from rdw_tracking.definitions import defs

ROOT = Path(__file__).resolve().parents[1]


def test_dagster_definitions_validate(tmp_path):
    dagster = Path(sys.executable).with_name("dagster")
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    proc = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", str(ROOT / "workspace.yaml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
