"""The one place where everything is wired into `Definitions`."""

import dagster as dg

from rdw_tracking.alerts import alert_sensors
from rdw_tracking.assets.indexes import index_assets, index_checks
from rdw_tracking.assets.performance import performance_assets
from rdw_tracking.assets.population import population_assets
from rdw_tracking.assets.restore import restore_assets
from rdw_tracking.assets.rollback import rollback_assets
from rdw_tracking.assets.schema import schema_assets, schema_checks
from rdw_tracking.assets.tables import external_tables
from rdw_tracking.jobs import jobs
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.schedules import schedules
from rdw_tracking.sensors import ExecutionsPolling, sensors

defs = dg.Definitions(
    assets=[
        *external_tables,
        *schema_assets,
        *index_assets,
        *population_assets,
        *performance_assets,
        *rollback_assets,
        *restore_assets,
    ],
    asset_checks=[*schema_checks, *index_checks],
    jobs=jobs,
    schedules=schedules,
    sensors=[*sensors, *alert_sensors],
    resources={
        "target_db": TargetDatabase(),
        "executions_polling": ExecutionsPolling(),
        # Explicit, so in-process runs (the demo, tests) also store the population
        # DataFrame where notebooks find it: defs.load_asset_value("execution_id_population").
        "io_manager": dg.FilesystemIOManager(),
    },
)
