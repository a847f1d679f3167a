"""Issue 26.5: docs/reference.md names exactly the public names the code has.

Each table's first column is compared with the loaded definitions (`rdw_tracking.definitions`)
or the code, both ways; the metadata keys of what `verify_execution_tracking` materializes
are compared with a run's; the planned factory and component are marked planned for as
long as `rdw_tracking` lacks them.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

import rdw_tracking
from rdw_tracking.definitions import defs
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.sensors import ExecutionsPolling

from .conftest import check_results, materialization_metadata

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference.md"
NAME = re.compile(r"`([^`]+)`")


@cache
def sections() -> dict[str, list[list[str]]]:
    """{`## heading`: rows of its table, each a list of cell texts}."""
    found: dict[str, list[list[str]]] = {}
    heading = ""
    for line in PAGE.read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
            found[heading] = []
        elif line.startswith("| `") and heading:
            found[heading].append([cell.strip() for cell in line.strip("|").split("|")])
    return found


def first_column(heading: str) -> set[str]:
    return {NAME.match(row[0]).group(1) for row in sections()[heading]}


def test_assets_are_the_definitions_assets():
    graph = defs.resolve_asset_graph()
    assert first_column("Assets") == {k.to_user_string() for k in graph.get_all_asset_keys()}


def test_checks_and_their_assets_are_the_definitions_checks():
    graph = defs.resolve_asset_graph()
    listed = {
        (NAME.match(r[0]).group(1), NAME.match(r[1]).group(1)) for r in sections()["Asset checks"]
    }
    assert listed == {(k.name, k.asset_key.to_user_string()) for k in graph.asset_check_keys}


def test_jobs_sensors_schedules_are_the_definitions_own():
    jobs = {j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__")}
    assert first_column("Jobs") == jobs
    assert first_column("Sensors") == {s.name for s in defs.sensors}
    schedules = {
        (NAME.match(r[0]).group(1), NAME.match(r[1]).group(1), NAME.match(r[2]).group(1))
        for r in sections()["Schedules"]
    }
    assert schedules == {(s.name, s.job_name, s.cron_schedule) for s in defs.schedules}


def test_resources_and_their_config_fields():
    rows = {NAME.match(r[0]).group(1): set(NAME.findall(r[1])) for r in sections()["Resources"]}
    assert rows == {
        "target_db": set(TargetDatabase.model_fields),
        "executions_polling": set(ExecutionsPolling.model_fields),
    }
    assert set(rows) <= set(defs.resources)


def project_source() -> str:
    files = [*(ROOT / "rdw_tracking").rglob("*.py"), *(ROOT / "rdw_tracking").rglob("*.yaml")]
    return "\n".join(p.read_text() for p in files)


def test_environment_variables_are_those_the_code_reads():
    listed = first_column("Environment variables")
    source = project_source()
    read = set(re.findall(r"\b(RDW_[A-Z_]*[A-Z])\b", source)) - {"RDW_URL_EU", "RDW_URL_US"}
    read.discard("RDW_FLEET_URL")  # the demo fleet's RDW_FLEET_URL_<i>, set by the demo itself
    tests_read = {"RDW_TEST_DATABASE_URL"}  # rdw_tracking_tests/conftest.py
    assert listed - {"DAGSTER_HOME"} == read | tests_read
    assert "DAGSTER_HOME" in source


def metadata_rows() -> dict[str, list[str]]:
    return {NAME.match(r[0]).group(1): NAME.findall(r[1]) for r in sections()["Metadata keys"]}


def test_every_metadata_key_is_written_by_the_code():
    source = project_source()
    missing = [
        (owner, key)
        for owner, keys in metadata_rows().items()
        for key in keys
        if f'"{key}"' not in source
    ]
    assert missing == []


def test_metadata_keys_are_those_a_verification_run_records(run_job, database_url):
    """What `verify_execution_tracking` materializes carries at least the keys listed."""
    result = run_job("verify_execution_tracking")
    assert result.success
    rows = metadata_rows()
    for asset in (
        "execution_id_schema",
        "execution_id_population",
        "execution_id_join_plan",
        "execution_id_storage",
    ):
        assert set(rows[asset]) <= set(materialization_metadata(result, asset)), asset
    orphans = check_results(result)["execution_ids_exist"].metadata
    assert set(rows["execution_ids_exist"]) <= set(orphans)


@pytest.mark.parametrize("name", ["build_defs", "ExecutionTrackingComponent"])
def test_factory_and_component_are_named_and_marked_planned_until_they_exist(name):
    text = PAGE.read_text()
    assert f"`rdw_tracking.{name}" in text
    planned = "(planned)" in text.split(f"`rdw_tracking.{name}")[0].rsplit("## ", 1)[-1]
    assert planned == (not hasattr(rdw_tracking, name)), (
        f"rdw_tracking.{name} exists now: drop '(planned)' from its heading"
        if hasattr(rdw_tracking, name)
        else f"rdw_tracking.{name} does not exist: its heading must say (planned)"
    )
