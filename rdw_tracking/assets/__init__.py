"""The tracking assets, one module per concern of the spec, each with its checks."""

import datetime as dt
import os

import dagster as dg

from rdw_tracking.errors import refuse  # noqa: F401  (re-exported: the old import path)

GROUP = "execution_tracking"

# Write assets and ops sit in this Dagster pool: one database write at a time, however
# they are launched. A fleet (RDW_FLEET_FILE) serializes writes per database instead
# (run tag rdw/db-writes=<database> and the advisory lock), so no global pool there.
WRITE_POOL = None if os.environ.get("RDW_FLEET_FILE") else "rdw/db-writes"

# Read-only assets ride out a database restart or a dropped connection; a user-facing
# error is raised as `refuse(...)`, which is never retried.
READ_RETRY = dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL)

# The population snapshot is taken every day at 06:00 UTC (daily_population_snapshot):
# one that has not landed by 07:00 UTC, within the 24 hours before, shows as stale
# (freshness FAIL in the UI's asset health, evaluated by the daemon).
DAILY_SNAPSHOT_FRESHNESS = dg.FreshnessPolicy.cron(
    deadline_cron="0 7 * * *", lower_bound_delta=dt.timedelta(hours=24), timezone="UTC"
)
