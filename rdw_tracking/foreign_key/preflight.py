"""What the foreign key job refuses before it changes anything, each refusal naming the fix."""

from rdw_tracking.contract import SchemaReport
from rdw_tracking.errors import refuse
from rdw_tracking.foreign_key.plan import leaf_constraint
from rdw_tracking.layout import Layout
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.writes import Need, refuse_without_grants, weeks_need


def refuse_unless_possible(report: SchemaReport, db: TargetDatabase, job: str) -> None:
    """Both tables exist, the layout is one a constraint can cover, execution_id is uuid."""
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


def refuse_without_rights(db: TargetDatabase, job: str, layout: Layout, builds_index: bool) -> None:
    """Owner of the table and of each partition, REFERENCES on the executions table, and
    CREATE on the schema only if the index must be built (an index lives there)."""
    create = ("CREATE",) if builds_index else ()
    refuse_without_grants(
        db,
        job,
        [
            weeks_need(db, "OWNER", "SELECT", *create),
            Need(db.schema_name, db.executions_table, ("SELECT", "REFERENCES")),
            *(Need(m.schema, m.name, ("OWNER",)) for m in layout.partitions),
        ],
    )


def refuse_other_on_delete(report: SchemaReport, db: TargetDatabase, on_delete: str) -> None:
    """The constraint exists with another ON DELETE than asked: it is the user's to drop."""
    fk = report.foreign_key
    if fk is not None and fk.on_delete != on_delete:
        raise refuse(
            f"foreign key {fk.name} on {db.qualified(db.weeks_table)}.execution_id exists "
            f"with ON DELETE {fk.on_delete}, config asks for {on_delete}; nothing was "
            "changed. Set on_delete to match, or drop the constraint first"
        )


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


def refuse_orphans(db: TargetDatabase, count: int, sample: list[str]) -> None:
    """VALIDATE could only fail while any execution_id has no executions row."""
    if count:
        raise refuse(
            f"{db.qualified(db.weeks_table)}.execution_id has {count} orphaned value(s) with "
            f"no {db.qualified(db.executions_table)} row (e.g. {', '.join(sample[:3])}); "
            "restore those executions or clear the ids, then run the job again",
            orphan_count=count,
            orphan_sample=sample,
        )
