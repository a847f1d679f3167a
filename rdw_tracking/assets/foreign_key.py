"""Safe foreign key addition: `report_data_weeks.execution_id` → `workflow_executions(id)`.

Manual, never scheduled. On an ordinary table the statements are
`schema.foreign_key_ddl()`'s: `ADD CONSTRAINT ... NOT VALID` (a brief SHARE ROW EXCLUSIVE
lock on both tables, capped by `lock_timeout_ms`), then `VALIDATE CONSTRAINT` in its own
transaction (SHARE UPDATE EXCLUSIVE: writers keep going while it scans).

On a partitioned table no statement ever scans rows under a lock that blocks writers:

- PostgreSQL 18+: the parent's `ADD CONSTRAINT ... NOT VALID` (brief SHARE ROW EXCLUSIVE
  on the parent, every partition and `workflow_executions`, no scan), then `VALIDATE
  CONSTRAINT` partition by partition, each its own transaction holding SHARE UPDATE
  EXCLUSIVE on that partition only, and last the parent's `VALIDATE` (catalog only).
- Before 18 a partitioned table takes no `NOT VALID` foreign key. Each partition holding
  rows gets its own constraint `NOT VALID` and validates it, as on a plain table; then the
  parent's plain `ADD CONSTRAINT` finds those validated equivalents and takes them over
  without scanning (brief SHARE ROW EXCLUSIVE on the whole tree, and ACCESS EXCLUSIVE on
  `workflow_executions` while it drops the partitions' now-redundant action triggers).

Either way an interrupted run resumes: the next one skips what is already validated. An
inheritance parent is refused: foreign keys are not inherited by child tables.
"""

from dataclasses import dataclass
from typing import Any

import dagster as dg
import psycopg
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
    SchemaReport,
    add_constraint_ddl,
    inspect_schema,
    validate_ddl,
)
from rdw_tracking.errors import refuse
from rdw_tracking.layout import Layout
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


def refuse_unless_possible(report: SchemaReport, db: TargetDatabase, job: str) -> None:
    weeks, executions = db.qualified(db.weeks_table), db.qualified(db.executions_table)
    if not report.weeks_exists:
        raise refuse(f"table {weeks} does not exist; check target_db.schema_name and weeks_table")
    refusal = report.layout.refusal(job)
    if refusal:
        raise refuse(refusal, layout=report.layout.kind)
    if report.layout.kind == "inheritance":
        raise refuse(
            f"{job} refused: {weeks} is an inheritance parent of "
            f"{len(report.layout.partitions)} child table(s), and foreign keys are not "
            "inherited by child tables, so a constraint on the parent would leave their rows "
            "unchecked; nothing was changed. Add the constraint to each table yourself (the "
            "execution_id_foreign_key check lists the statements) or move to declarative "
            "partitioning",
            layout="inheritance",
        )
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


@dataclass(frozen=True)
class Step:
    """One statement of the route, run in its own transaction."""

    statement: sql.Composed
    what: str  # for logs and messages
    phase: str  # "add", "validate" or "attach" (the parent taking validated partitions over)
    blocks_writers: bool  # SHARE ROW EXCLUSIVE or more: wait for no idle session first
    tables: tuple[str, ...]  # tables (of target_db's schema) whose lock holders matter
    partition: str | None = None  # the partition it works on; None: the table itself


def native_not_valid(db: TargetDatabase) -> bool:
    """PostgreSQL 18 accepts `NOT VALID` foreign keys on partitioned tables."""
    with db.connect(autocommit=True) as conn:
        return conn.info.server_version >= 180000


def _local(db: TargetDatabase, layout: Layout, *more: str) -> tuple[str, ...]:
    names = [m.name for m in layout.members if m.schema == db.schema_name]
    return tuple(dict.fromkeys([*names, *more]))


def leaf_constraint(report: SchemaReport, oid: int, on_delete: str):
    """The leaf's foreign key that the parent's would take over, if it has one."""
    return next((fk for fk in report.foreign_keys_of(oid) if fk.on_delete == on_delete), None)


def refuse_conflicting_leaves(report: SchemaReport, db: TargetDatabase, on_delete: str) -> None:
    """Before 18: a partition's constraint with another ON DELETE would not be taken over,
    and the parent's ADD would then validate a new one under a lock that blocks writers."""
    clashing = [
        f"{m.label} ({fk.name}, ON DELETE {fk.on_delete})"
        for m in report.layout.leaves
        if leaf_constraint(report, m.oid, on_delete) is None
        for fk in report.foreign_keys_of(m.oid)
    ]
    if clashing:
        raise refuse(
            f"partitions of {db.qualified(db.weeks_table)} already carry a foreign key on "
            f"execution_id with another ON DELETE than the {on_delete} asked for: "
            f"{'; '.join(clashing)}; nothing was changed. Set on_delete to match, or drop "
            "those constraints first"
        )


def next_steps(
    report: SchemaReport, db: TargetDatabase, on_delete: str, name: str, native: bool
) -> list[Step]:
    """What is left to do, read from the catalog: a rerun, or a run resuming an
    interrupted one, skips every constraint already validated."""
    layout, fk = report.layout, report.foreign_key
    executions = db.executions_table
    if fk is not None and fk.validated:
        return []
    root = layout.root
    if layout.kind == "ordinary" or native:
        if fk is None:
            return [
                Step(
                    add_constraint_ddl(db, db.weeks, on_delete, name),
                    f"ADD CONSTRAINT {name} NOT VALID on {layout.label}",
                    "add",
                    True,
                    _local(db, layout, executions),
                )
            ]
        steps = []
        if layout.kind == "partitioned":  # one partition per transaction, then the parent
            for leaf in layout.leaves:
                own = report.foreign_keys_of(leaf.oid)
                pending = [c for c in own if c.inherited and not c.validated]
                steps += [
                    Step(
                        validate_ddl(leaf.ident, c.name),
                        f"VALIDATE CONSTRAINT {c.name} on {leaf.label}",
                        "validate",
                        False,
                        (),
                        leaf.label,
                    )
                    for c in pending
                ]
        return [
            *steps,
            Step(
                validate_ddl(db.weeks, fk.name),
                f"VALIDATE CONSTRAINT {fk.name} on {root.label}",
                "validate",
                False,
                (),
            ),
        ]
    steps = []
    for leaf in layout.leaves:  # before 18: each partition first, as a plain table
        own = leaf_constraint(report, leaf.oid, on_delete)
        if own is not None and own.validated:
            continue
        if own is None:
            local = (leaf.name,) if leaf.schema == db.schema_name else ()
            steps.append(
                Step(
                    add_constraint_ddl(db, leaf.ident, on_delete, name),
                    f"ADD CONSTRAINT {name} NOT VALID on {leaf.label}",
                    "add",
                    True,
                    (*local, executions),
                    leaf.label,
                )
            )
        steps.append(
            Step(
                validate_ddl(leaf.ident, own.name if own else name),
                f"VALIDATE CONSTRAINT {own.name if own else name} on {leaf.label}",
                "validate",
                False,
                (),
                leaf.label,
            )
        )
    if steps:
        return steps
    return [
        Step(
            add_constraint_ddl(db, db.weeks, on_delete, name, not_valid=False),
            f"ADD CONSTRAINT {name} on {layout.label}, taking over the partitions' constraints",
            "attach",
            True,
            _local(db, layout, executions),
        )
    ]


def route(layout: Layout, native: bool) -> str:
    if layout.kind == "ordinary":
        return "NOT VALID, then VALIDATE"
    if native:
        return "parent NOT VALID, then VALIDATE per partition and on the parent (PostgreSQL 18+)"
    return (
        "NOT VALID and VALIDATE per partition, then the parent's ADD takes them over "
        "(PostgreSQL < 18)"
    )


def _refusal(db: TargetDatabase, err: psycopg.Error, added: bool) -> dg.Failure:
    weeks = db.qualified(db.weeks_table)
    state = (
        "the constraints added so far stay in place (NOT VALID ones already check new "
        "writes); run the job again to continue"
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
            f"adding the foreign key needs the owner of {weeks} (and of its partitions) and "
            f"REFERENCES on {db.qualified(db.executions_table)}; {state}. Run the job as that "
            "role"
        )
    return refuse(f"adding the foreign key on {weeks} failed ({state}): {err}")


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
    weeks = db.qualified(db.weeks_table)
    with exclusive_write(db, job):
        report = inspect_schema(db)
        refuse_unless_possible(report, db, job)
        layout = report.layout
        native = native_not_valid(db)
        # CREATE on the schema only if the index must be built (an index lives there).
        spec = contract_indexes(db)[EXECUTION_ID_INDEX]
        builds_index = ("CREATE",) if index_to_build(db, spec) else ()
        refuse_without_grants(
            db,
            job,
            [
                weeks_need(db, "OWNER", "SELECT", *builds_index),
                Need(db.schema_name, db.executions_table, ("SELECT", "REFERENCES")),
                *(Need(m.schema, m.name, ("OWNER",)) for m in layout.partitions),
            ],
        )
        fk = report.foreign_key
        if fk is not None and fk.on_delete != config.on_delete:
            raise refuse(
                f"foreign key {fk.name} on {weeks}.execution_id exists with ON DELETE "
                f"{fk.on_delete}, config asks for {config.on_delete}; nothing was changed. "
                "Set on_delete to match, or drop the constraint first"
            )
        name = fk.name if fk else FK_NAME
        metadata: dict[str, Any] = {"constraint": name, "on_delete": config.on_delete}
        metadata |= {"layout": layout.kind, "route": route(layout, native)}
        if fk is not None and fk.validated:
            log.info(f"{fk.name} already exists and is validated: nothing to do")
            return dg.Output("unchanged", metadata={**metadata, "action": "unchanged"})
        if layout.kind == "partitioned" and not native:
            refuse_conflicting_leaves(report, db, config.on_delete)
        count, sample = orphans(db)
        if count:
            raise refuse(
                f"{weeks}.execution_id has {count} orphaned value(s) with no "
                f"{db.qualified(db.executions_table)} row (e.g. {', '.join(sample[:3])}); "
                "restore those executions or clear the ids, then run the job again",
                orphan_count=count,
                orphan_sample=sample,
            )
        log.info(f"{layout.describe()}; route: {metadata['route']}")
        index = build_index(
            db, spec, log, retries=config.lock_retries, backoff_s=config.retry_backoff_s
        )
        metadata["index_action"] = index.action

        def attempt(step: Step) -> float:
            if step.blocks_writers:  # its lock conflicts with writers; VALIDATE's does not
                raise_if_stuck(db, list(step.tables), step.what, snapshots=False)
            return run_watched(db, step.statement, step.what, log)

        changed = fk is not None or any(report.member_foreign_keys)
        seconds = {"add": 0.0, "validate": 0.0, "attach": 0.0}
        done: list[dict] = []
        try:
            # Each pass re-reads the catalog: a partition attached meanwhile is seen.
            for _ in range(len(layout.members) + 3):
                steps = next_steps(report, db, config.on_delete, name, native)
                if not steps:
                    break
                for step in steps:
                    took = with_lock_retries(
                        lambda step=step: attempt(step),
                        step.what,
                        log,
                        config.lock_retries,
                        config.retry_backoff_s,
                    )
                    changed = True
                    seconds[step.phase] += took
                    done.append(
                        {
                            "statement": step.what,
                            "phase": step.phase,
                            "table": step.partition or "",
                            "seconds": round(took, 3),
                        }
                    )
                    log.info(f"{step.what}: done in {took:.2f} s")
                report = inspect_schema(db)
                layout = report.layout
            else:
                raise refuse(
                    f"the partitions of {weeks} kept changing while the foreign key was "
                    "added; the constraints added so far stay in place: run the job again"
                )
        except LockWait as wait:
            state = (
                "the constraints added so far stay in place (NOT VALID ones already check "
                "new writes); run the job again to continue"
                if changed
                else "nothing was changed"
            )
            raise refuse(
                f"gave up on the foreign key of {weeks}.execution_id at {wait.what} after "
                f"{config.lock_retries + 1} attempts, each waiting {db.lock_timeout_ms} ms at "
                f"most for a lock held by {describe(wait.blockers)}; {state}",
                blocking_sessions=describe(wait.blockers),
            ) from None
        except psycopg.Error as err:
            raise _refusal(db, err, changed) from None
    action = "validated" if fk is not None else "added"
    log.info(f"{name} {action} and validated")
    metadata |= {
        "add_seconds": round(seconds["add"], 3),
        "validate_seconds": round(seconds["validate"], 3),
        "attach_seconds": round(seconds["attach"], 3),
        "partitions_validated": sum(1 for d in done if d["phase"] == "validate" and d["table"]),
        "statements": dg.MetadataValue.table(
            records=[dg.TableRecord(d) for d in done],
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
    return dg.Output(action, metadata={**metadata, "action": action, "orphan_count": 0})
