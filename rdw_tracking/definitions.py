"""The one place where everything is wired into `Definitions`."""

import os

import dagster as dg

from rdw_tracking.alerts import alert_sensors
from rdw_tracking.assets.daily import daily_assets, daily_checks
from rdw_tracking.assets.indexes import index_assets, index_checks
from rdw_tracking.assets.performance import performance_assets
from rdw_tracking.assets.population import population_assets
from rdw_tracking.assets.restore import restore_assets
from rdw_tracking.assets.rollback import rollback_assets
from rdw_tracking.assets.schema import schema_assets, schema_checks
from rdw_tracking.assets.tables import external_tables
from rdw_tracking.jobs import jobs
from rdw_tracking.resources import URL_ENV, TargetDatabase
from rdw_tracking.schedules import schedules
from rdw_tracking.sensors import ExecutionsPolling, sensors


def target_db() -> TargetDatabase:
    """Where the URL comes from, as the UI shows it: `dg.EnvVar` when the deployment sets
    RDW_DATABASE_URL (the UI names the variable, never its value); unset, TargetDatabase's
    own default."""
    return TargetDatabase(url=dg.EnvVar(URL_ENV)) if os.environ.get(URL_ENV) else TargetDatabase()


defs = dg.Definitions(
    assets=[
        *external_tables,
        *schema_assets,
        *index_assets,
        *population_assets,
        *daily_assets,
        *performance_assets,
        *rollback_assets,
        *restore_assets,
    ],
    asset_checks=[*schema_checks, *index_checks, *daily_checks],
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
