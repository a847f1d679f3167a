"""The foreign key job as Dagster runs it: its run config and the `add_foreign_key` op.

Adding `report_data_weeks.execution_id` → `workflow_executions(id)` online (NOT VALID,
then VALIDATE; routed per layout; resumable) is the package `rdw_tracking.foreign_key`,
callable without Dagster. This module checks what the user asked for, gathers what the
engine may not import itself (the schema report, the orphans, the index, the lock-aware
statement runner, all from the asset layer), and turns what was done into the op's
metadata. Manual, never scheduled.
"""

from typing import Any

import dagster as dg
from psycopg import sql
from pydantic import Field, field_validator

from rdw_tracking.assets import WRITE_POOL
from rdw_tracking.assets.indexes import (
    EXECUTION_ID_INDEX,
    LockWait,
    build_index,
    contract_indexes,
    describe,
    equivalent_of,
    lookup,
    raise_if_stuck,
    run_watched,
    with_lock_retries,
)
from rdw_tracking.assets.population import find_orphans
from rdw_tracking.assets.schema import (
    FK_NAME,
    ON_DELETE_ACTIONS,
    add_constraint_ddl,
    inspect_schema,
    validate_ddl,
)
from rdw_tracking.foreign_key import apply, preflight
from rdw_tracking.foreign_key.apply import Added, GaveUp, Log, Request, RunStep
from rdw_tracking.foreign_key.plan import Step, native_not_valid, route
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.writes import exclusive_write


class ForeignKeyConfig(dg.Config):
    on_delete: str = Field(
        default="NO ACTION",
        description=f"ON DELETE of the constraint: {', '.join(ON_DELETE_ACTIONS)}.",
    )
    lock_retries: int = Field(
        default=3, ge=0, le=20, description="Retries after a lock wait times out."
    )
    retry_backoff_s: float = Field(
        default=2.0, ge=0, le=600, description="First back-off (s); doubles each retry."
    )

    @field_validator("on_delete")
    @classmethod
    def _action(cls, value: str) -> str:
        action = " ".join(value.upper().split())
        if action not in ON_DELETE_ACTIONS:
            raise ValueError(f"on_delete must be one of {', '.join(ON_DELETE_ACTIONS)}")
        return action


def orphans(db: TargetDatabase) -> tuple[int, list[str]]:
    """(how many orphaned execution_ids there are, some of them): the population's query."""
    count, pairs = find_orphans(db)
    return count, [execution_id for _, execution_id in pairs]


def index_to_build(db: TargetDatabase, spec) -> bool:
    """Whether `build_index(spec)` would create or rebuild an index (as it decides it)."""
    named, on_table = lookup(db, spec)
    if named is not None:
        return not named.valid
    return equivalent_of(spec, on_table) is None


def statement(db: TargetDatabase, step: Step, on_delete: str) -> sql.Composed:
    """The step's DDL, as the schema check lists it."""
    if step.phase == "validate":
        return validate_ddl(step.table, step.constraint)
    not_valid = step.phase == "add"  # "attach": the parent's plain ADD
    return add_constraint_ddl(db, step.table, on_delete, step.constraint, not_valid=not_valid)


def step_runner(db: TargetDatabase, config: ForeignKeyConfig, log: Log) -> RunStep:
    """Each step run as the index builds run their DDL: not started behind an idle
    session, watched for blockers, retried after a lock wait (that machinery lives in
    `rdw_tracking.assets.indexes`, above the engine)."""

    def attempt(step: Step) -> float:
        if step.blocks_writers:  # its lock conflicts with writers; VALIDATE's does not
            raise_if_stuck(db, list(step.tables), step.what, snapshots=False)
        return run_watched(db, statement(db, step, config.on_delete), step.what, log)

    def run(step: Step) -> float:
        try:
            return with_lock_retries(
                lambda: attempt(step),
                step.what,
                log,
                config.lock_retries,
                config.retry_backoff_s,
            )
        except LockWait as wait:
            raise GaveUp(wait.what, describe(wait.blockers)) from None

    return run


def added_metadata(added: Added) -> dict[str, Any]:
    """Seconds per phase, and every statement run as a table."""
    return {
        "add_seconds": round(added.seconds("add"), 3),
        "validate_seconds": round(added.seconds("validate"), 3),
        "attach_seconds": round(added.seconds("attach"), 3),
        "partitions_validated": added.partitions_validated,
        "statements": dg.MetadataValue.table(
            records=[
                dg.TableRecord(
                    {
                        "statement": d.statement,
                        "phase": d.phase,
                        "table": d.table,
                        "seconds": round(d.seconds, 3),
                    }
                )
                for d in added.done
            ],
            schema=dg.TableSchema(
                columns=[
                    dg.TableColumn("statement", "string"),
                    dg.TableColumn("phase", "string"),
                    dg.TableColumn("table", "string"),
                    dg.TableColumn("seconds", "float"),
                ]
            ),
        ),
    }


@dg.op(
    name="add_foreign_key",
    pool=WRITE_POOL,  # one database write at a time, however it is launched
    description="Adds the FK from execution_id to workflow_executions(id): NOT VALID, then VALIDATE.",
)
def add_foreign_key(
    context: dg.OpExecutionContext, config: ForeignKeyConfig, target_db: TargetDatabase
) -> dg.Output[str]:
    """Refuses while any orphaned `execution_id` exists. Makes sure the single-column index
    `idx_report_data_weeks_execution_id` exists first (built concurrently if not): without
    it every delete from `workflow_executions` would scan `report_data_weeks`."""
    db, log, job = target_db, context.log, context.run.job_name
    with exclusive_write(db, job):
        report = inspect_schema(db)
        preflight.refuse_unless_possible(report, db, job)
        layout, fk, native = report.layout, report.foreign_key, native_not_valid(db)
        spec = contract_indexes(db)[EXECUTION_ID_INDEX]
        preflight.refuse_without_rights(db, job, layout, index_to_build(db, spec))
        preflight.refuse_other_on_delete(report, db, config.on_delete)
        name = fk.name if fk else FK_NAME
        metadata: dict[str, Any] = {"constraint": name, "on_delete": config.on_delete}
        metadata |= {"layout": layout.kind, "route": route(layout, native)}
        if fk is not None and fk.validated:
            log.info(f"{fk.name} already exists and is validated: nothing to do")
            return dg.Output("unchanged", metadata={**metadata, "action": "unchanged"})
        if layout.kind == "partitioned" and not native:
            preflight.refuse_conflicting_leaves(report, db, config.on_delete)
        preflight.refuse_orphans(db, *orphans(db))
        log.info(f"{layout.describe()}; route: {metadata['route']}")
        retries, backoff_s = config.lock_retries, config.retry_backoff_s
        index = build_index(db, spec, log, retries=retries, backoff_s=backoff_s)
        metadata["index_action"] = index.action
        request = Request(config.on_delete, name, native, config.lock_retries)
        run = step_runner(db, config, log)
        added = apply.add(db, report, request, run, inspect_schema, log)
    action = "validated" if fk is not None else "added"
    log.info(f"{name} {action} and validated")
    metadata |= added_metadata(added)
    return dg.Output(action, metadata={**metadata, "action": action, "orphan_count": 0})
