"""Jobs: what a person launches from the UI, and what schedules and sensors request."""

import dagster as dg

from rdw_tracking.assets.foreign_key import add_foreign_key
from rdw_tracking.collection import collect_weeks

# Jobs that write to the looked-after database carry this tag; dagster.yaml lets one of
# them run at a time, and each also takes a PostgreSQL advisory lock (see writes.py).
DB_WRITES_TAG = "rdw/db-writes"
WRITE_JOB_TAGS = {DB_WRITES_TAG: "true"}

verify_execution_tracking = dg.define_asset_job(
    "verify_execution_tracking",
    selection=dg.AssetSelection.assets("execution_id_schema")
    # The index check alone: verification must never build the indexes.
    | dg.AssetSelection.checks(
        dg.AssetCheckKey(dg.AssetKey("execution_id_indexes"), "execution_id_indexes_valid")
    ),
    description=(
        "Read-only verification of execution tracking: the schema of execution_id and its "
        "foreign key, with every check. Safe to run at any time."
    ),
)

create_execution_id_indexes = dg.define_asset_job(
    "create_execution_id_indexes",
    selection=dg.AssetSelection.assets("execution_id_indexes"),
    tags=WRITE_JOB_TAGS,
    description=(
        "Builds the two partial indexes on execution_id with CREATE INDEX CONCURRENTLY "
        "(writers keep going); opt-in idx_workflow_executions_completed_at. Idempotent."
    ),
)


@dg.job(
    tags=WRITE_JOB_TAGS,
    description=(
        "Manual: adds the FK from report_data_weeks.execution_id to workflow_executions(id) "
        "(NOT VALID, then VALIDATE); refused while orphaned execution_ids exist."
    ),
)
def add_execution_id_foreign_key():
    add_foreign_key()


jobs = [verify_execution_tracking, create_execution_id_indexes, add_execution_id_foreign_key]

# Manual only: in no schedule, sensor or default job. Both default to a dry run.
rollback_execution_id = dg.define_asset_job(
    "rollback_execution_id",
    selection=dg.AssetSelection.assets("execution_id_rollback"),
    tags=WRITE_JOB_TAGS,
    description=(
        "Rollback cleanup: clears execution_id on rows created since cutoff_date, in "
        "backed-up batches. Dry run unless ops.execution_id_rollback.config.dry_run is false."
    ),
)
restore_execution_id = dg.define_asset_job(
    "restore_execution_id",
    selection=dg.AssetSelection.assets("execution_id_restore"),
    tags=WRITE_JOB_TAGS,
    description=(
        "Puts back the execution_id values a rollback cleared, where still NULL. Dry run "
        "unless ops.execution_id_restore.config.dry_run is false."
    ),
)
jobs += [rollback_execution_id, restore_execution_id]

# placeholder until the population issue lands
post_collection_validation = dg.define_asset_job(
    "post_collection_validation", selection=dg.AssetSelection.assets("execution_id_schema")
)
jobs.append(post_collection_validation)


@dg.job(
    name="weekly_collection",
    tags=WRITE_JOB_TAGS,
    description=(
        "The demo collection run, with the fix: this week's row of each collection is written "
        "inside a tracked workflow_executions row whose id is stamped on every row. Its "
        "success triggers post_collection_validation through collection_run_sensor."
    ),
)
def weekly_collection() -> None:
    collect_weeks()


jobs.append(weekly_collection)
