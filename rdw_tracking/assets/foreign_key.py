"""The foreign key job as Dagster runs it: its run config and the `add_foreign_key` op.

Adding `report_data_weeks.execution_id` → `workflow_executions(id)` online (NOT VALID,
then VALIDATE; routed per layout; resumable) is the package `rdw_tracking.foreign_key`,
callable without Dagster. This module checks what the user asked for, runs the engine's
refusals and steps in order (the orphan count is the population's own query), and turns
what was done into the op's metadata. Manual, never scheduled.
"""

from typing import Any

import dagster as dg
from pydantic import Field, field_validator

from rdw_tracking.assets import WRITE_POOL
from rdw_tracking.assets.metadata import metadata_table
from rdw_tracking.contract import FK_NAME, ON_DELETE_ACTIONS, inspect_schema
from rdw_tracking.foreign_key import apply, preflight
from rdw_tracking.foreign_key.apply import Added, Request
from rdw_tracking.foreign_key.plan import native_not_valid, route
from rdw_tracking.foreign_key.steps import index_to_build, step_runner
from rdw_tracking.indexes.online import build_index
from rdw_tracking.indexes.specs import EXECUTION_ID_INDEX, contract_indexes
from rdw_tracking.population.orphans import find_orphans
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


def added_metadata(added: Added) -> dict[str, Any]:
    """Seconds per phase, and every statement run as a table."""
    return {
        "add_seconds": round(added.seconds("add"), 3),
        "validate_seconds": round(added.seconds("validate"), 3),
        "attach_seconds": round(added.seconds("attach"), 3),
        "partitions_validated": added.partitions_validated,
        "statements": metadata_table(
            {"statement": "string", "phase": "string", "table": "string", "seconds": "float"},
            (
                {
                    "statement": d.statement,
                    "phase": d.phase,
                    "table": d.table,
                    "seconds": round(d.seconds, 3),
                }
                for d in added.done
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
        run = step_runner(db, config.on_delete, retries, backoff_s, log)
        added = apply.add(db, report, request, run, log)
    action = "validated" if fk is not None else "added"
    log.info(f"{name} {action} and validated")
    metadata |= added_metadata(added)
    return dg.Output(action, metadata={**metadata, "action": action, "orphan_count": 0})
