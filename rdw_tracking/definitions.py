"""The one place where everything is wired into `Definitions`."""

import os

import dagster as dg

from rdw_tracking import fleet, fleet_defs
from rdw_tracking.alerts import alert_sensors
from rdw_tracking.assets.daily import daily_assets, daily_checks, daily_partitions
from rdw_tracking.assets.indexes import index_assets, index_checks
from rdw_tracking.assets.performance import performance_assets
from rdw_tracking.assets.population import population_assets
from rdw_tracking.assets.restore import restore_assets
from rdw_tracking.assets.rollback import rollback_assets
from rdw_tracking.assets.schema import schema_assets, schema_checks
from rdw_tracking.assets.tables import external_tables
from rdw_tracking.fleet import Fleet
from rdw_tracking.jobs import jobs
from rdw_tracking.resources import URL_ENV, TargetDatabase
from rdw_tracking.schedules import (
    DAILY_RUN_CONFIG,
    daily_population_snapshot,
    schedules,
    weekly_execution_tracking_verification,
)
from rdw_tracking.sensors import ExecutionsPolling, sensors


def target_db() -> TargetDatabase:
    """Where the URL comes from, as the UI shows it: `dg.EnvVar` when the deployment sets
    RDW_DATABASE_URL (the UI names the variable, never its value); unset, TargetDatabase's
    own default."""
    return TargetDatabase(url=dg.EnvVar(URL_ENV)) if os.environ.get(URL_ENV) else TargetDatabase()


ASSETS = [
    *external_tables,
    *schema_assets,
    *index_assets,
    *population_assets,
    *daily_assets,
    *performance_assets,
    *rollback_assets,
    *restore_assets,
]
CHECKS = [*schema_checks, *index_checks, *daily_checks]


def single_database() -> dg.Definitions:
    """One database: RDW_DATABASE_URL (or the embedded server)."""
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=CHECKS,
        jobs=jobs,
        schedules=schedules,
        sensors=[*sensors, *alert_sensors],
        resources={
            "target_db": target_db(),
            "executions_polling": ExecutionsPolling(),
            # Explicit, so in-process runs (the demo, tests) also store the population
            # DataFrame where notebooks find it: defs.load_asset_value("execution_id_population").
            "io_manager": dg.FilesystemIOManager(),
        },
    )


def fleet_databases(fleet: Fleet) -> dg.Definitions:
    """Every database of the fleet file: assets partitioned by database (the history by
    database x day), runs pointed at their database, sensors and schedules over all."""
    databases = fleet_defs.database_partitions(fleet)
    fleet_jobs = {job.name: job for job in fleet_defs.per_database_jobs(jobs, databases)}
    validation = fleet_jobs["post_collection_validation"]
    return dg.Definitions(
        assets=fleet_defs.per_database(ASSETS, databases, daily_partitions),
        asset_checks=CHECKS,
        jobs=list(fleet_jobs.values()),
        schedules=[
            fleet_defs.fan_out(fleet, daily_population_snapshot, validation, DAILY_RUN_CONFIG),
            fleet_defs.fan_out(
                fleet,
                weekly_execution_tracking_verification,
                fleet_jobs["verify_execution_tracking"],
            ),
        ],
        sensors=[
            fleet_defs.collection_sensor(fleet, fleet_jobs["weekly_collection"], validation),
            fleet_defs.rollback_sensor(
                fleet,
                [fleet_jobs["rollback_execution_id"], fleet_jobs["restore_execution_id"]],
                validation,
            ),
            fleet_defs.executions_sensor(fleet, validation),
            *alert_sensors,
        ],
        resources={
            "target_db": fleet_defs.target_db_resource(fleet),
            "executions_polling": ExecutionsPolling(),
            # Nothing a step returns is read from another step's disk: the population's
            # DataFrame is for notebooks only.
            "io_manager": dg.FilesystemIOManager(),
        },
    )


FLEET = fleet.load()  # None without RDW_FLEET_FILE; a bad file is refused here, by entry
defs = fleet_databases(FLEET) if FLEET else single_database()
