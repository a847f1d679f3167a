"""The fleet's wiring: every asset per database, each run pointed at its own database.

With a fleet file (`RDW_FLEET_FILE`), the database-level assets are partitioned by the
databases' names, the daily history by database x day, and each run's `target_db` is
the fleet entry of the run's partition: the partition is the only source of a run's
database, and a run whose `rdw/database`, `rdw/reads` or `rdw/db-writes` tag names
another (tags are editable at launch) is refused before it touches anything. Sensors
watch every database with a cursor each; an unreachable database is reported and
skipped, never holding the others back. Write jobs carry `rdw/db-writes=<database>`, read jobs
`rdw/reads=<database>`: the run queue (dagster.yaml) limits each per value, so two
databases' index builds run at once and two on one database never (the advisory lock,
as before, also holds across deployments).
"""

import json

import dagster as dg

from rdw_tracking import sensors as single
from rdw_tracking.errors import StatementTimeout, TargetDatabaseError
from rdw_tracking.fleet import (
    DATABASE_TAG,
    DB_WRITES_TAG,
    DIMENSION,
    READS_TAG,
    Fleet,
    FleetFileError,
    RunDatabaseError,
    database_of,
)
from rdw_tracking.jobs import checked_op
from rdw_tracking.resources import TargetDatabase


def target_db_resource(fleet: Fleet) -> dg.ResourceDefinition:
    @dg.resource(
        description=(
            "The fleet database of this run's partition (its only source; a run whose "
            "rdw/database, rdw/reads or rdw/db-writes tag names another is refused): its URL "
            "from the env var the fleet file names, its target_db fields."
        )
    )
    def target_db(init_context: dg.InitResourceContext) -> TargetDatabase:
        run = init_context.run
        try:
            name = database_of(run.tags) if run is not None else None
            if name is None:
                raise dg.Failure(
                    description=(
                        f"this run has no partition, so it names no database of the fleet "
                        f"({', '.join(fleet.names)}); launch it for one partition"
                    ),
                    allow_retries=False,
                )
            return TargetDatabase(**fleet.get(name).resource_config(), fleet_name=name)
        except (FleetFileError, RunDatabaseError) as err:
            raise dg.Failure(description=str(err), allow_retries=False) from None

    return target_db


def database_partitions(fleet: Fleet) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(fleet.names))


def per_database(
    assets: list,
    databases: dg.StaticPartitionsDefinition,
    daily: dg.PartitionsDefinition,
) -> list:
    """Each asset partitioned by database; the daily history by database x day."""
    history = dg.MultiPartitionsDefinition({DIMENSION: databases, "day": daily})
    partitioned = []
    for asset in assets:
        if not isinstance(asset, dg.AssetsDefinition) or not asset.is_materializable:
            partitioned.append(asset)
            continue
        if any(spec.partitions_def is not None for spec in asset.specs):
            chosen = history
        else:
            chosen = databases
        partitioned.append(
            launch_checked(
                asset.map_asset_specs(
                    lambda spec, p=chosen: spec.replace_attributes(partitions_def=p)
                )
            )
        )
    return partitioned


def launch_checked(asset: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """`asset` with its op's run config checked at launch (`jobs.checked_op`): a fleet
    job's PartitionedConfig takes the place of the single database's config mapping."""
    op = asset.node_def
    if not isinstance(op, dg.OpDefinition) or checked_op(op) is op:
        return asset
    return dg.AssetsDefinition.dagster_internal_init(
        **{**asset.get_attributes_dict(), "node_def": checked_op(op)}
    )


def _partitioned_config(
    databases: dg.StaticPartitionsDefinition, write: bool
) -> dg.PartitionedConfig:
    def tags(name: str) -> dict[str, str]:
        extra = {DB_WRITES_TAG: name} if write else {READS_TAG: name}
        return {DATABASE_TAG: name, **extra}

    return dg.PartitionedConfig(
        partitions_def=databases,
        run_config_for_partition_key_fn=lambda _: {},
        tags_for_partition_key_fn=tags,
    )


def per_database_jobs(jobs: list, databases: dg.StaticPartitionsDefinition) -> list:
    """The project's jobs, each launched for one database, tagged with it."""
    built = []
    for job in jobs:
        write = DB_WRITES_TAG in (job.tags or {})
        tags = {k: v for k, v in (job.tags or {}).items() if k != DB_WRITES_TAG}
        config = _partitioned_config(databases, write)
        if isinstance(job, dg.JobDefinition):  # an op job
            graph = dg.GraphDefinition(
                name=job.graph.name,
                node_defs=[checked_op(op) for op in job.graph.node_defs],
                dependencies=job.graph.dependencies,
            )
            built.append(
                graph.to_job(
                    name=job.name,
                    description=job.description,
                    tags=tags,
                    config=config,
                    executor_def=job.executor_def,
                )
            )
        else:
            built.append(
                dg.define_asset_job(
                    job.name,
                    selection=job.selection,
                    description=job.description,
                    tags=tags,
                    config=config,
                    executor_def=job.executor_def,
                )
            )
    return built


# -- sensors ------------------------------------------------------------------------------


def for_the_run_database(
    fleet: Fleet, context: dg.RunStatusSensorContext, outcome: dg.RunRequest | dg.SkipReason
) -> dg.RunRequest | dg.SkipReason:
    """A single-database sensor's request, for the database of the run it followed."""
    try:
        name = database_of(context.dagster_run.tags)
    except RunDatabaseError as err:
        return dg.SkipReason(str(err))
    if name not in fleet.names:
        return dg.SkipReason("the run names no database")
    if not isinstance(outcome, dg.RunRequest):
        return outcome
    return dg.RunRequest(
        run_key=outcome.run_key,
        run_config=outcome.run_config,
        tags={**outcome.tags, DATABASE_TAG: name, READS_TAG: name},
        partition_key=name,
    )


def collection_sensor(fleet: Fleet, weekly_collection, validation) -> dg.SensorDefinition:
    @dg.run_status_sensor(
        name="collection_run_sensor",
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitored_jobs=[weekly_collection],
        request_job=validation,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=15,
        description=(
            "After each successful weekly_collection run, requests post_collection_validation "
            "for the same database (partition and tag rdw/database)."
        ),
    )
    def collection_run_sensor(context: dg.RunStatusSensorContext):
        return for_the_run_database(fleet, context, single.collection_request(context))

    return collection_run_sensor


def rollback_sensor(fleet: Fleet, write_jobs: list, validation) -> dg.SensorDefinition:
    @dg.run_status_sensor(
        name="rollback_history_sensor",
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitored_jobs=write_jobs,
        request_job=validation,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=15,
        description=(
            "After a rollback or restore that changed rows, requests post_collection_validation "
            "for the same database with refresh_days reaching back to its cutoff_date."
        ),
    )
    def rollback_history_sensor(context: dg.RunStatusSensorContext):
        return for_the_run_database(fleet, context, single.history_request(context))

    return rollback_history_sensor


def executions_sensor(fleet: Fleet, validation) -> dg.SensorDefinition:
    @dg.sensor(
        name="workflow_executions_sensor",
        job=validation,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description=(
            "Polls workflow_executions of every fleet database, each from its own cursor, and "
            "requests post_collection_validation for each database that saw new executions. "
            "An unreachable database is reported and skipped; its cursor stays."
        ),
    )
    def workflow_executions_sensor(
        context: dg.SensorEvaluationContext, executions_polling: single.ExecutionsPolling
    ):
        """Polls every database of the fleet from its own cursor: one database's executions
        are never missed or repeated because of another's, and one unreachable database
        only skips itself."""
        cursors = json.loads(context.cursor) if context.cursor else {}
        requests, notes = [], []
        for entry in fleet.databases:
            try:
                db = TargetDatabase(**entry.resource_config(), fleet_name=entry.name)
                outcome = single.tick(context.log, db, executions_polling, cursors.get(entry.name))
            except (TargetDatabaseError, StatementTimeout, FleetFileError) as err:
                message = getattr(err, "description", None) or str(err)
                context.log.warning(f"database {entry.name}: {message}")
                notes.append(f"{entry.name}: failed ({message})")
                continue
            if outcome.cursor is not None:
                cursors[entry.name] = outcome.cursor
            if outcome.request is None:
                notes.append(f"{entry.name}: {outcome.skip.strip()}")
                continue
            request = outcome.request
            requests.append(
                dg.RunRequest(
                    run_key=f"{entry.name}:{request.run_key}",
                    run_config=request.run_config,
                    tags={**request.tags, DATABASE_TAG: entry.name, READS_TAG: entry.name},
                    partition_key=entry.name,
                )
            )
        cursor = json.dumps(cursors, sort_keys=True)
        if not requests:
            context.update_cursor(cursor)
            return dg.SkipReason(" | ".join(notes))
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    return workflow_executions_sensor


# -- schedules ----------------------------------------------------------------------------


def fan_out(
    fleet: Fleet, schedule: dg.ScheduleDefinition, job, run_config: dict | None = None
) -> dg.ScheduleDefinition:
    """`schedule`, requesting one run per database of the fleet."""

    @dg.schedule(
        name=schedule.name,
        cron_schedule=schedule.cron_schedule,
        execution_timezone=schedule.execution_timezone,
        job=job,
        default_status=schedule.default_status,
        description=f"{schedule.description} One run per fleet database.",
    )
    def fanned(context: dg.ScheduleEvaluationContext):
        when = context.scheduled_execution_time.isoformat()
        return [
            dg.RunRequest(
                run_key=f"{name}:{when}",
                partition_key=name,
                run_config=run_config or {},
                tags={DATABASE_TAG: name, READS_TAG: name},
            )
            for name in fleet.names
        ]

    return fanned
