"""Jobs: what a person launches from the UI, and what schedules and sensors request."""

import dagster as dg

# Jobs that write to the looked-after database carry this tag; dagster.yaml lets one of
# them run at a time, and each also takes a PostgreSQL advisory lock (see writes.py).
DB_WRITES_TAG = "rdw/db-writes"
WRITE_JOB_TAGS = {DB_WRITES_TAG: "true"}

verify_execution_tracking = dg.define_asset_job(
    "verify_execution_tracking",
    selection=dg.AssetSelection.assets("execution_id_schema")
    | dg.AssetSelection.assets(
        "execution_id_population", "execution_id_join_plan", "execution_id_storage"
    ),
    description=(
        "Read-only verification of execution tracking: the schema of execution_id and its "
        "foreign key, the population snapshot, the join plan and the storage impact, with "
        "every check. Safe to run at any time."
    ),
)

post_collection_validation = dg.define_asset_job(
    "post_collection_validation",
    selection=dg.AssetSelection.assets("execution_id_population"),
    description=(
        "Read-only population snapshot of execution_id with its checks (recent rate, "
        "orphaned ids, daily trend); run after each collection."
    ),
)

jobs = [verify_execution_tracking, post_collection_validation]
