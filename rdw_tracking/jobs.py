"""Jobs: what a person launches from the UI, and what schedules and sensors request."""

import dagster as dg

from rdw_tracking import engine
from rdw_tracking.assets.foreign_key import ForeignKeyConfig, add_foreign_key
from rdw_tracking.assets.indexes import IndexConfig
from rdw_tracking.assets.performance import JoinPlanConfig, StorageConfig
from rdw_tracking.assets.population import PopulationConfig
from rdw_tracking.assets.restore import RestoreConfig
from rdw_tracking.assets.rollback import RollbackConfig
from rdw_tracking.collection import CollectionConfig, collect_weeks
from rdw_tracking.fleet import DB_WRITES_TAG
from rdw_tracking.resources import TargetDatabase, run_config_url_problem

# Jobs that write to the looked-after database carry this tag; dagster.yaml lets one of
# them run at a time, and each also takes a PostgreSQL advisory lock (see writes.py).
WRITE_JOB_TAGS = {DB_WRITES_TAG: "true"}
# Rollback and restore resume where they stopped when run again with the same config,
# which is what a retry does: with `run_retries` enabled in dagster.yaml, a run that
# failed (a lost connection, a dead worker its launcher detects) is launched again.
RESUME_BY_RETRY_TAGS = {"dagster/max_retries": "2", "dagster/retry_strategy": "ALL_STEPS"}


class RunConfigError(Exception):
    """A run config value refused at launch: the message names the field."""


# Every op whose run config a launch checks, with its Config class: the fleet's jobs
# (whose partitioned config leaves no room for a config mapping) check the same ops.
LAUNCH_CHECKED: dict[str, type[dg.Config]] = {}


def checked_at_launch(**op_configs: type[dg.Config]) -> dg.ConfigMapping:
    """Run config `ops.<op>.config`, validated by each op's Config class at launch.

    Dagster runs pydantic validators only when a step starts; passing the run config
    through this mapping refuses a malformed or future date, a batch size of 0 and the
    like before a run is even created, with the same `ops.<op>.config` shape. The same
    goes for `resources.target_db.config` (an empty name, a negative timeout, a
    malformed URL), and for a URL carrying a password: run config is stored with the run.
    """
    LAUNCH_CHECKED.update(op_configs)
    schema = {
        "ops": {
            op: {"config": cls.to_config_schema().as_field()} for op, cls in op_configs.items()
        },
        "resources": dg.Field(dg.Permissive(), is_required=False),
        "loggers": dg.Field(dg.Permissive(), is_required=False),
        "execution": dg.Field(dg.Permissive(), is_required=False),
    }

    @dg.config_mapping(config_schema=schema)
    def validate(outer: dict) -> dict:
        for op, cls in op_configs.items():
            check_op_config(op, cls, outer.get("ops", {}).get(op, {}).get("config", {}))
        check_target_db(outer.get("resources", {}).get("target_db", {}).get("config", {}))
        return outer

    return validate


def check_op_config(op: str, cls: type[dg.Config], values: dict) -> dict:
    """`ops.<op>.config`, by the op's Config class's own validators; `values` if good."""
    try:
        cls(**values)
    except dg.Failure as err:
        raise RunConfigError(f"ops.{op}.config: {err.description}") from None
    except Exception as err:  # pydantic's ValidationError names the field
        raise RunConfigError(f"ops.{op}.config: {_first_error(err)}") from None
    return values


def checked_op(op: dg.OpDefinition) -> dg.OpDefinition:
    """`op`, its config checked when a run is launched (as `checked_at_launch` does), by
    an op-level config function, which Dagster applies while it resolves the run config:
    for jobs whose config is a PartitionedConfig, which leaves no room for a mapping."""
    cls = LAUNCH_CHECKED.get(op.name)
    if cls is None:
        return op
    return op.configured(
        lambda values: check_op_config(op.name, cls, values),
        name=op.name,
        config_schema=cls.to_config_schema().as_field(),
    )


def check_target_db(values: dict) -> None:
    """Run config `resources.target_db.config`, by TargetDatabase's own validators."""
    where = "resources.target_db.config"
    # {env: NAME} and other non-literal sources are Dagster's to resolve and check.
    literal = {k: v for k, v in (values or {}).items() if not isinstance(v, dict)}
    try:
        TargetDatabase(**literal)
    except Exception as err:  # the message holds no input value: it may be the URL
        raise RunConfigError(f"{where}: {_first_error(err)}") from None
    url = literal.get("url")
    problem = run_config_url_problem(url) if url else None
    if problem:
        raise RunConfigError(
            f"{where}.{problem}" if problem.startswith("url ") else f"{where}.url: {problem}"
        )


def _first_error(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ()))
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        return f"{field}: {message}"
    return str(err)


verify_execution_tracking = dg.define_asset_job(
    "verify_execution_tracking",
    # Short read-only steps: one process saves a process start per step (seconds each);
    # RDW_EXECUTOR=celery (or k8s) runs them on workers instead, being safe to run twice.
    executor_def=engine.executor(dg.in_process_executor),
    config=checked_at_launch(
        execution_id_population=PopulationConfig,
        execution_id_join_plan=JoinPlanConfig,
        execution_id_storage=StorageConfig,
    ),
    selection=dg.AssetSelection.assets("execution_id_schema")
    | dg.AssetSelection.assets(
        "execution_id_population", "execution_id_join_plan", "execution_id_storage"
    )
    # The index check alone: verification must never build the indexes.
    | dg.AssetSelection.checks(
        dg.AssetCheckKey(dg.AssetKey("execution_id_indexes"), "execution_id_indexes_valid"),
        # The reconcile alone: the weekly verification compares the stored history with
        # the table, it does not rewrite it.
        dg.AssetCheckKey(
            dg.AssetKey("execution_id_daily_population"), "execution_id_daily_history_matches"
        ),
    ),
    description=(
        "Read-only verification of execution tracking: the schema of execution_id and its "
        "foreign key, the population snapshot, the join plan and the storage impact, with "
        "every check. Safe to run at any time."
    ),
)

post_collection_validation = dg.define_asset_job(
    "post_collection_validation",
    # Short read-only steps: one process saves a process start per step (seconds each);
    # RDW_EXECUTOR=celery (or k8s) runs them on workers instead, being safe to run twice.
    executor_def=engine.executor(dg.in_process_executor),
    config=checked_at_launch(execution_id_population=PopulationConfig),
    selection=dg.AssetSelection.assets("execution_id_population"),
    description=(
        "Read-only population snapshot of execution_id with its checks (recent rate, "
        "orphaned ids, daily trend) and the verdict on the executions it validates "
        "(execution_id_run_stamped); publishes the days it recounted to "
        "execution_id_daily_population. Run after each collection."
    ),
)

create_execution_id_indexes = dg.define_asset_job(
    "create_execution_id_indexes",
    config=checked_at_launch(execution_id_indexes=IndexConfig),
    selection=dg.AssetSelection.assets("execution_id_indexes"),
    tags=WRITE_JOB_TAGS,
    description=(
        "Builds the two partial indexes on execution_id with CREATE INDEX CONCURRENTLY "
        "(writers keep going); opt-in idx_workflow_executions_completed_at. Idempotent."
    ),
)


@dg.job(
    config=checked_at_launch(add_foreign_key=ForeignKeyConfig),
    tags=WRITE_JOB_TAGS,
    description=(
        "Manual: adds the FK from report_data_weeks.execution_id to workflow_executions(id) "
        "(NOT VALID, then VALIDATE); refused while orphaned execution_ids exist."
    ),
)
def add_execution_id_foreign_key():
    add_foreign_key()


jobs = [
    verify_execution_tracking,
    post_collection_validation,
    create_execution_id_indexes,
    add_execution_id_foreign_key,
]

# Manual only: in no schedule, sensor or default job. Both default to a dry run.
rollback_execution_id = dg.define_asset_job(
    "rollback_execution_id",
    config=checked_at_launch(execution_id_rollback=RollbackConfig),
    selection=dg.AssetSelection.assets("execution_id_rollback"),
    tags={**WRITE_JOB_TAGS, **RESUME_BY_RETRY_TAGS},
    description=(
        "Rollback cleanup: clears execution_id on rows created since cutoff_date, in "
        "backed-up batches. Dry run unless ops.execution_id_rollback.config.dry_run is false."
    ),
)
restore_execution_id = dg.define_asset_job(
    "restore_execution_id",
    config=checked_at_launch(execution_id_restore=RestoreConfig),
    selection=dg.AssetSelection.assets("execution_id_restore"),
    tags={**WRITE_JOB_TAGS, **RESUME_BY_RETRY_TAGS},
    description=(
        "Puts back the execution_id values a rollback cleared, where still NULL. Dry run "
        "unless ops.execution_id_restore.config.dry_run is false."
    ),
)
jobs += [rollback_execution_id, restore_execution_id]


@dg.job(
    name="weekly_collection",
    config=checked_at_launch(collect_weeks=CollectionConfig),
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
