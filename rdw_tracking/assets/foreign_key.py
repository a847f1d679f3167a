"""Safe foreign key addition: `report_data_weeks.execution_id` → `workflow_executions(id)`.

Manual, never scheduled. The statements are `schema.foreign_key_ddl()`'s: `ADD CONSTRAINT
... NOT VALID` (a brief SHARE ROW EXCLUSIVE lock on both tables, capped by
`lock_timeout_ms`), then `VALIDATE CONSTRAINT` in its own transaction (SHARE UPDATE
EXCLUSIVE: writers keep going while it scans).
"""

from typing import Any

import dagster as dg
import psycopg
from pydantic import Field, field_validator

from rdw_tracking.assets import refuse
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
    SchemaReport,
    foreign_key_ddl,
    inspect_schema,
)
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.writes import Need, exclusive_write, refuse_without_grants, weeks_need


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


def refuse_unless_possible(report: SchemaReport, db: TargetDatabase) -> None:
    weeks, executions = db.qualified(db.weeks_table), db.qualified(db.executions_table)
    if not report.weeks_exists:
        raise refuse(f"table {weeks} does not exist; check target_db.schema_name and weeks_table")
    if not report.executions_exists:
        raise refuse(
            f"table {executions} does not exist, so {weeks}.execution_id cannot reference it; "
            "check target_db.executions_table"
        )
    column = report.execution_id
    if column is None or column.data_type != "uuid":
        found = "is missing" if column is None else f"is {column.data_type}"
        raise refuse(
            f"{weeks}.execution_id {found}, expected uuid; fix the column "
            "(see the execution_id_column_contract check) before adding the foreign key"
        )


def _refusal(db: TargetDatabase, err: psycopg.Error, added: bool) -> dg.Failure:
    weeks = db.qualified(db.weeks_table)
    state = (
        f"constraint {FK_NAME} stays NOT VALID (it already checks new writes)"
        if added
        else "nothing was changed"
    )
    if isinstance(err, psycopg.errors.ForeignKeyViolation):
        return refuse(
            f"VALIDATE found orphaned {weeks}.execution_id values written since the orphan "
            f"check; {state}. Clear them, then run add_execution_id_foreign_key again"
        )
    if isinstance(err, psycopg.errors.InsufficientPrivilege):
        return refuse(
            f"adding the foreign key needs the owner of {weeks} and REFERENCES on "
            f"{db.qualified(db.executions_table)}; {state}. Run the job as that role"
        )
    return refuse(f"adding the foreign key on {weeks} failed ({state}): {err}")


@dg.op(
    name="add_foreign_key",
    pool="rdw/db-writes",  # one database write at a time, however it is launched
    description="Adds the FK from execution_id to workflow_executions(id): NOT VALID, then VALIDATE.",
)
def add_foreign_key(
    context: dg.OpExecutionContext, config: ForeignKeyConfig, target_db: TargetDatabase
) -> dg.Output[str]:
    """Refuses while any orphaned `execution_id` exists. Makes sure the single-column index
    `idx_report_data_weeks_execution_id` exists first (built concurrently if not): without
    it every delete from `workflow_executions` would scan `report_data_weeks`."""
    db, log = target_db, context.log
    weeks = db.qualified(db.weeks_table)
    with exclusive_write(db, context.run.job_name):
        report = inspect_schema(db)
        refuse_unless_possible(report, db)
        # CREATE on the schema only if the index must be built (an index lives there).
        spec = contract_indexes(db)[EXECUTION_ID_INDEX]
        builds_index = ("CREATE",) if index_to_build(db, spec) else ()
        refuse_without_grants(
            db,
            context.run.job_name,
            [
                weeks_need(db, "OWNER", "SELECT", *builds_index),
                Need(db.schema_name, db.executions_table, ("SELECT", "REFERENCES")),
            ],
        )
        fk = report.foreign_key
        if fk is not None and fk.on_delete != config.on_delete:
            raise refuse(
                f"foreign key {fk.name} on {weeks}.execution_id exists with ON DELETE "
                f"{fk.on_delete}, config asks for {config.on_delete}; nothing was changed. "
                "Set on_delete to match, or drop the constraint first"
            )
        metadata: dict[str, Any] = {"constraint": fk.name if fk else FK_NAME}
        metadata["on_delete"] = config.on_delete
        if fk is not None and fk.validated:
            log.info(f"{fk.name} already exists and is validated: nothing to do")
            return dg.Output("unchanged", metadata={**metadata, "action": "unchanged"})
        count, sample = orphans(db)
        if count:
            raise refuse(
                f"{weeks}.execution_id has {count} orphaned value(s) with no "
                f"{db.qualified(db.executions_table)} row (e.g. {', '.join(sample[:3])}); "
                "restore those executions or clear the ids, then run the job again",
                orphan_count=count,
                orphan_sample=sample,
            )
        index = build_index(
            db,
            contract_indexes(db)[EXECUTION_ID_INDEX],
            log,
            retries=config.lock_retries,
            backoff_s=config.retry_backoff_s,
        )
        metadata["index_action"] = index.action
        add, validate = foreign_key_ddl(db, config.on_delete, metadata["constraint"])
        tables = [db.weeks_table, db.executions_table]

        def attempt(statement, what: str, check_stuck: bool) -> float:
            if check_stuck:  # ADD's lock conflicts with writers; VALIDATE's does not
                raise_if_stuck(db, tables, what, snapshots=False)
            return run_watched(db, statement, what, log)

        added = fk is not None
        try:
            if not added:
                metadata["add_seconds"] = round(
                    with_lock_retries(
                        lambda: attempt(add, f"ADD CONSTRAINT {FK_NAME} NOT VALID", True),
                        f"ADD CONSTRAINT {FK_NAME}",
                        log,
                        config.lock_retries,
                        config.retry_backoff_s,
                    ),
                    3,
                )
                added = True
                log.info(f"{FK_NAME} added NOT VALID; validating the existing rows")
            metadata["validate_seconds"] = round(
                with_lock_retries(
                    lambda: attempt(
                        validate, f"VALIDATE CONSTRAINT {metadata['constraint']}", False
                    ),
                    f"VALIDATE CONSTRAINT {metadata['constraint']}",
                    log,
                    config.lock_retries,
                    config.retry_backoff_s,
                ),
                3,
            )
        except LockWait as wait:
            state = (
                f"constraint {metadata['constraint']} is in place NOT VALID; run the job again "
                "to validate it"
                if added
                else "nothing was changed"
            )
            raise refuse(
                f"gave up on the foreign key of {weeks}.execution_id after "
                f"{config.lock_retries + 1} attempts, each waiting {db.lock_timeout_ms} ms at "
                f"most for a lock held by {describe(wait.blockers)}; {state}",
                blocking_sessions=describe(wait.blockers),
            ) from None
        except psycopg.Error as err:
            raise _refusal(db, err, added) from None
    action = "validated" if fk is not None else "added"
    log.info(f"{metadata['constraint']} {action} and validated")
    return dg.Output(action, metadata={**metadata, "action": action, "orphan_count": 0})
