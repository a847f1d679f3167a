"""Schedules: the population snapshot every day, the full verification every week.

Both run in UTC, like every day boundary in the project (connections set TimeZone=UTC
and the population windows are UTC days), and both are read-only, so they start
running as soon as the daemon does.
"""

import dagster as dg

from rdw_tracking.jobs import post_collection_validation, verify_execution_tracking

REFRESH_DAYS = 3
DAILY_RUN_CONFIG = {"ops": {"execution_id_population": {"config": {"refresh_days": REFRESH_DAYS}}}}

daily_population_snapshot = dg.ScheduleDefinition(
    name="daily_population_snapshot",
    job=post_collection_validation,
    # 06:00 UTC: after the UTC day has closed and nightly loads have settled, so the
    # latest complete day is in the snapshot and its trend check, before the working day.
    cron_schedule="0 6 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    # Re-materialize the last few days of execution_id_daily_population: late rows and
    # rollbacks on days that have closed show up in the history by the next morning.
    run_config=DAILY_RUN_CONFIG,
    description=(
        "Every day at 06:00 UTC: a population snapshot of execution_id with its checks "
        "(post_collection_validation), so a collection path that stops stamping rows shows "
        "up within a day even when no collection run triggers validation; re-publishes the "
        f"last {REFRESH_DAYS} days of execution_id_daily_population."
    ),
)

weekly_execution_tracking_verification = dg.ScheduleDefinition(
    name="weekly_execution_tracking_verification",
    job=verify_execution_tracking,
    # Monday 07:00 UTC: after the weekend's weekly collections and the daily snapshot.
    cron_schedule="0 7 * * 1",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Every Monday at 07:00 UTC: the full read-only verification "
        "(verify_execution_tracking): schema, foreign key, indexes, population, join plan "
        "and storage, with every check."
    ),
)

schedules = [daily_population_snapshot, weekly_execution_tracking_verification]
