"""What is refused before any index is built: a layout that cannot take the index, a
missing table, column or grant, and an index of a spec's name that is not that spec."""

from rdw_tracking import catalog
from rdw_tracking.errors import refuse
from rdw_tracking.indexes.existing import lookup, member_indexes
from rdw_tracking.indexes.specs import IndexSpec
from rdw_tracking.indexes.table import refuse_conflict
from rdw_tracking.layout import Layout, table_layout
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.writes import Need, refuse_without_grants


def refuse_unless_buildable(db: TargetDatabase, specs: list[IndexSpec]) -> None:
    """Each index's table and columns exist: say so plainly rather than fail in the DDL."""
    with db.cursor() as cur:
        for table in dict.fromkeys(spec.table for spec in specs):
            columns = {c.name for c in catalog.columns(cur, db.schema_name, table)}
            if not columns:
                field = "weeks_table" if table == db.weeks_table else "executions_table"
                raise refuse(
                    f"table {db.qualified(table)} does not exist; check target_db.schema_name "
                    f"and target_db.{field}"
                )
            needed = [c for spec in specs if spec.table == table for c in spec.columns]
            for column in dict.fromkeys(needed):
                if column not in columns:
                    raise refuse(
                        f"{db.qualified(table, column)} does not exist, so no index can use it; "
                        "see the execution_id_column_contract check"
                    )


def refuse_conflicts(db: TargetDatabase, spec: IndexSpec) -> None:
    """`refuse_conflict` for `spec` on its table and, on a partitioned or inheritance
    table, for its partition-named index on each partition or child."""
    refuse_conflict(db, spec, lookup(db, spec).named)
    with db.cursor() as cur:
        layout = table_layout(cur, spec.schema_of(db), spec.table)
        tree = member_indexes(cur, layout) if layout is not None and layout.is_tree else {}
    for member in layout.partitions if tree else []:
        own = spec.on_member(member)
        refuse_conflict(db, own, next((i for i in tree[member.oid] if i.name == own.name), None))


def refuse_before_building(
    db: TargetDatabase, job: str, specs: list[IndexSpec], layout: Layout | None
) -> None:
    """Refuse `job` before any change: the weeks table's layout (`layout`) cannot take the
    indexes, a table or column of `specs` is missing, or the role lacks OWNER and CREATE
    on a table (or any partition or child) it would index."""
    refusal = layout.refusal(job) if layout is not None else None
    if refusal:
        raise refuse(refusal)
    refuse_unless_buildable(db, specs)
    tables = dict.fromkeys(spec.table for spec in specs)
    members = layout.partitions if layout is not None else []
    refuse_without_grants(
        db,
        job,
        [Need(db.schema_name, table, ("OWNER", "CREATE")) for table in tables]
        + [Need(m.schema, m.name, ("OWNER", "CREATE")) for m in members],
    )
