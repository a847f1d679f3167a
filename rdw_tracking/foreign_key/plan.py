"""The route for the table's layout, and the steps left on it, read from the catalog."""

from dataclasses import dataclass

from psycopg import sql

from rdw_tracking.contract import MemberForeignKey, SchemaReport
from rdw_tracking.layout import Layout
from rdw_tracking.resources import TargetDatabase


@dataclass(frozen=True)
class Step:
    """One statement of the route, run in its own transaction."""

    table: sql.Composable  # the table it alters
    constraint: str  # the constraint it adds or validates
    what: str  # for logs and messages
    phase: str  # "add" (NOT VALID), "validate" or "attach" (the parent taking validated partitions over)
    blocks_writers: bool  # SHARE ROW EXCLUSIVE or more: wait for no idle session first
    tables: tuple[str, ...]  # tables (of target_db's schema) whose lock holders matter
    partition: str | None = None  # the partition it works on; None: the table itself


def native_not_valid(db: TargetDatabase) -> bool:
    """PostgreSQL 18 accepts `NOT VALID` foreign keys on partitioned tables."""
    with db.connect(autocommit=True) as conn:
        return conn.info.server_version >= 180000


def route(layout: Layout, native: bool) -> str:
    if layout.kind == "ordinary":
        return "NOT VALID, then VALIDATE"
    if native:
        return "parent NOT VALID, then VALIDATE per partition and on the parent (PostgreSQL 18+)"
    return (
        "NOT VALID and VALIDATE per partition, then the parent's ADD takes them over "
        "(PostgreSQL < 18)"
    )


def leaf_constraint(report: SchemaReport, oid: int, on_delete: str) -> MemberForeignKey | None:
    """The leaf's foreign key that the parent's would take over, if it has one."""
    return next((fk for fk in report.foreign_keys_of(oid) if fk.on_delete == on_delete), None)


def next_steps(
    report: SchemaReport, db: TargetDatabase, on_delete: str, name: str, native: bool
) -> list[Step]:
    """What is left to do, read from the catalog: a rerun, or a run resuming an
    interrupted one, skips every constraint already validated."""
    fk = report.foreign_key
    if fk is not None and fk.validated:
        return []
    if report.layout.kind == "ordinary" or native:
        return _from_the_table(report, db, name)
    return _partition_by_partition(report, db, on_delete, name) or [
        _take_over(report.layout, db, name)
    ]


def _from_the_table(report: SchemaReport, db: TargetDatabase, name: str) -> list[Step]:
    """The table's own constraint: added NOT VALID; then validated, on a partitioned
    table (18+) one partition per transaction first, the parent (catalog only) last."""
    layout, fk = report.layout, report.foreign_key
    if fk is None:
        return [_add(db.weeks, name, layout.label, _local(db, layout, db.executions_table))]
    pending = [
        _validate(leaf.ident, own.name, leaf.label, partition=leaf.label)
        for leaf in (layout.leaves if layout.kind == "partitioned" else [])
        for own in report.foreign_keys_of(leaf.oid)
        if own.inherited and not own.validated
    ]
    return [*pending, _validate(db.weeks, fk.name, layout.root.label)]


def _partition_by_partition(
    report: SchemaReport, db: TargetDatabase, on_delete: str, name: str
) -> list[Step]:
    """Before 18: each partition first, as a plain table; empty once all are validated."""
    steps = []
    for leaf in report.layout.leaves:
        own = leaf_constraint(report, leaf.oid, on_delete)
        if own is not None and own.validated:
            continue
        if own is None:
            local = (leaf.name,) if leaf.schema == db.schema_name else ()
            tables = (*local, db.executions_table)
            steps.append(_add(leaf.ident, name, leaf.label, tables, partition=leaf.label))
        constraint = own.name if own else name
        steps.append(_validate(leaf.ident, constraint, leaf.label, partition=leaf.label))
    return steps


def _take_over(layout: Layout, db: TargetDatabase, name: str) -> Step:
    """Before 18, once every partition is validated: the parent's plain ADD, which takes
    the partitions' constraints over rather than scanning their rows."""
    return Step(
        db.weeks,
        name,
        f"ADD CONSTRAINT {name} on {layout.label}, taking over the partitions' constraints",
        "attach",
        True,
        _local(db, layout, db.executions_table),
    )


def _add(
    table: sql.Composable,
    name: str,
    label: str,
    tables: tuple[str, ...],
    partition: str | None = None,
) -> Step:
    what = f"ADD CONSTRAINT {name} NOT VALID on {label}"
    return Step(table, name, what, "add", True, tables, partition)


def _validate(table: sql.Composable, name: str, label: str, partition: str | None = None) -> Step:
    # SHARE UPDATE EXCLUSIVE: writers keep going, so no lock holder needs a look first.
    what = f"VALIDATE CONSTRAINT {name} on {label}"
    return Step(table, name, what, "validate", False, (), partition)


def _local(db: TargetDatabase, layout: Layout, *more: str) -> tuple[str, ...]:
    """The layout's tables in target_db's schema, and `more`, each once."""
    names = [m.name for m in layout.members if m.schema == db.schema_name]
    return tuple(dict.fromkeys([*names, *more]))
