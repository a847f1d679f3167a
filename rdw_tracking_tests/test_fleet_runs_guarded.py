"""A fleet run reaches only the database of its partition, with its config checked at
launch, on real PostgreSQL: two databases copied from the test template.

Tags are editable in the Launchpad and through GraphQL; the partition is what Dagster
records a run's materializations and checks against, so it alone names the database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg
import pytest
import yaml

from rdw_tracking import fleet
from rdw_tracking.jobs import RunConfigError
from rdw_tracking_tests.conftest import (
    create_database,
    database_checksums,
    drop_database,
)
from rdw_tracking_tests.fleet_runs import failures

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
NAMES = ("alpha", "beta")


@dataclass
class TwoDatabases:
    defs: dg.Definitions
    urls: dict[str, str]

    def run(self, job: str, partition: str, tags: dict | None = None, run_config=None):
        """`job` for `partition`, its launch tags edited by `tags` (as the Launchpad and
        GraphQL allow: execute_in_process would put the partition's own tags back)."""
        job_def = self.defs.resolve_job_def(job)
        return job_def.execute_in_process(
            instance=dg.DagsterInstance.ephemeral(),
            partition_key=None if tags else partition,
            tags={**job_def.get_tags_for_partition_key(partition, None), **tags} if tags else None,
            run_config={**QUIET, **(run_config or {})},
            raise_on_error=False,
        )


def url_env(name: str) -> str:
    return f"RDW_TEST_GUARD_URL_{name.upper()}"


@pytest.fixture
def two_databases(admin_url, template_name, tmp_path, monkeypatch) -> Iterator[TwoDatabases]:
    from rdw_tracking import definitions

    databases = {name: f"rdw_test_{os.getpid()}_guard_{name}" for name in NAMES}
    urls = {name: create_database(admin_url, db, template_name) for name, db in databases.items()}
    path = tmp_path / "fleet.yaml"
    entries = [{"name": name, "url_env": url_env(name)} for name in NAMES]
    path.write_text(yaml.safe_dump({"databases": entries}, sort_keys=False))
    monkeypatch.setenv(fleet.FLEET_ENV, str(path))
    for name, url in urls.items():
        monkeypatch.setenv(url_env(name), url)
    monkeypatch.delenv("RDW_EXECUTOR", raising=False)
    monkeypatch.delenv("RDW_DATABASE_URL", raising=False)
    try:
        yield TwoDatabases(definitions.fleet_databases(fleet.load()), urls)
    finally:
        for database in databases.values():
            drop_database(admin_url, database)


# -- point 1: the partition is the only source of a run's database ----------------------


@pytest.mark.parametrize(
    "tag, job",
    [
        ("rdw/database", "post_collection_validation"),
        ("rdw/reads", "verify_execution_tracking"),
    ],
)
def test_a_read_run_tagged_for_another_database_is_refused(two_databases, tag, job):
    """Partition alpha, tag naming beta: the run fails before any step reads, naming both."""
    result = two_databases.run(job, "alpha", tags={tag: "beta"})
    assert not result.success
    assert not result.get_asset_materialization_events()
    assert not result.get_asset_check_evaluations()
    [message] = {m.split(" <- ")[0] for m in failures(result)} or [_resource_failure(result)]
    assert f"tag {tag}='beta' disagrees with its partition 'alpha'" in message


def _resource_failure(result) -> str:
    """The message of the run's resource initialization failure."""
    for event in result.all_events:
        if event.event_type_value == "RESOURCE_INIT_FAILURE":
            return event.event_specific_data.error.message
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            return event.event_specific_data.error.message
    raise AssertionError("the run failed with no resource or step failure")


def test_a_write_run_tagged_for_another_database_touches_neither(two_databases):
    """A real rollback for alpha, queued as a write on beta: refused, and both databases'
    schema and rows stay exactly as they were."""
    before = {name: database_checksums(url) for name, url in two_databases.urls.items()}
    config = {
        "ops": {
            "execution_id_rollback": {"config": {"cutoff_date": "2020-01-01", "dry_run": False}}
        }
    }
    result = two_databases.run(
        "rollback_execution_id", "alpha", tags={"rdw/db-writes": "beta"}, run_config=config
    )
    assert not result.success
    assert "tag rdw/db-writes='beta' disagrees with its partition 'alpha'" in _resource_failure(
        result
    )
    after = {name: database_checksums(url) for name, url in two_databases.urls.items()}
    assert after == before


def test_the_partition_alone_picks_the_database(two_databases):
    """Agreeing tags (what every launch sets from the partition) run on that database."""
    result = two_databases.run("post_collection_validation", "beta", tags={"rdw/reads": "beta"})
    assert result.success, failures(result)
    assert result.dagster_run.tags["rdw/database"] == "beta"


@pytest.mark.parametrize(
    "tags, words",
    [
        ({"rdw/database": "beta"}, "tag rdw/database='beta' disagrees with its partition 'alpha'"),
        (
            {"dagster/partition": "alpha", "dagster/partition/database": "beta"},
            "partition tags name two databases, 'alpha' and 'beta'",
        ),
        (
            {
                "dagster/asset_partition_range_start": "alpha|2026-01-01",
                "dagster/asset_partition_range_end": "beta|2026-01-02",
            },
            "partition tags name two databases, 'alpha' and 'beta'",
        ),
    ],
)
def test_database_of_refuses_disagreeing_tags(tags, words):
    with pytest.raises(fleet.RunDatabaseError) as err:
        fleet.database_of({"dagster/partition": "alpha", **tags})
    assert words in str(err.value)


def test_database_of_reads_the_partition_not_the_tag():
    assert fleet.database_of({"rdw/database": "beta"}) is None
    assert fleet.database_of({"dagster/partition": "alpha|2026-01-01"}) == "alpha"
    tags = {"dagster/partition": "alpha", "rdw/database": "alpha", "rdw/reads": "alpha"}
    assert fleet.database_of(tags) == "alpha"


# -- point 2: fleet jobs refuse bad run config at launch, as one database does ------------


@pytest.mark.parametrize(
    "job, op, config, field",
    [
        (
            "rollback_execution_id",
            "execution_id_rollback",
            {"cutoff_date": "2099-01-01"},
            "cutoff_date",
        ),
        (
            "rollback_execution_id",
            "execution_id_rollback",
            {"cutoff_date": "2020-01-01", "batch_size": 0},
            "batch_size",
        ),
        (
            "post_collection_validation",
            "execution_id_population",
            {"window_days": -1},
            "window_days",
        ),
        (
            "add_execution_id_foreign_key",
            "add_foreign_key",
            {"on_delete": "DROP TABLE"},
            "on_delete",
        ),
    ],
)
def test_a_fleet_job_refuses_bad_config_at_launch(two_databases, job, op, config, field):
    """Refused while the run config is resolved, before a run exists, naming the field;
    neither database changes."""
    before = {name: database_checksums(url) for name, url in two_databases.urls.items()}
    with pytest.raises(dg.DagsterUserCodeExecutionError) as err:
        two_databases.run(job, "alpha", run_config={"ops": {op: {"config": config}}})
    cause = err.value.user_exception
    assert isinstance(cause, RunConfigError), repr(err.value)
    assert str(cause).startswith(f"ops.{op}.config: ") and field in str(cause)
    assert {name: database_checksums(url) for name, url in two_databases.urls.items()} == before


def test_a_fleet_job_with_good_config_still_runs(two_databases):
    config = {"ops": {"execution_id_rollback": {"config": {"cutoff_date": "2020-01-01"}}}}
    result = two_databases.run("rollback_execution_id", "beta", run_config=config)
    assert result.success, failures(result)
