"""How the indexes on the weeks table fall short of the spec, as sentences naming each
index, partition or child table and the fix; the check reports them."""

from dataclasses import dataclass

from rdw_tracking.indexes.existing import (
    ExistingIndex,
    equivalent_of,
    matches,
    member_indexes,
    table_indexes,
)
from rdw_tracking.indexes.specs import (
    COLLECTION_EXECUTION_INDEX,
    COMPLETED_AT_INDEX,
    CREATED_AT_INDEX,
    EXECUTION_ID_INDEX,
    IndexSpec,
    completed_at_index,
    contract_indexes,
    created_at_index,
)
from rdw_tracking.layout import Layout, Member, table_layout
from rdw_tracking.resources import TargetDatabase

FIX = "run create_execution_id_indexes"


def index_problems(
    db: TargetDatabase, indexes: list[ExistingIndex]
) -> tuple[list[str], dict[str, str]]:
    """(each way the expected indexes fall short, as a sentence; {expected: equivalent})."""
    by_name = {i.name: i for i in indexes}
    expected = list(contract_indexes(db).values())
    if COMPLETED_AT_INDEX in by_name:  # opt-in: judged only once someone built it
        expected.append(completed_at_index(db))
    if CREATED_AT_INDEX in by_name:
        expected.append(created_at_index(db))
    problems, equivalents = [], {}
    for spec in expected:
        where = f"{db.schema_name}.{spec.name}"
        index = by_name.get(spec.name)
        if index is None:
            other = equivalent_of(spec, [i for i in indexes if i.table == spec.table])
            if other is not None:
                equivalents[spec.name] = other.name
            else:
                problems.append(f"{where} is missing; {FIX}")
        elif not index.valid and index.partitioned:
            problems.append(f"{where} is INVALID: not every partition's index is attached; {FIX}")
        else:
            problems += _judge(db, spec, index, where)
    return problems, equivalents


def _judge(db: TargetDatabase, spec: IndexSpec, index: ExistingIndex, what: str) -> list[str]:
    """How `index` falls short of `spec`, if it does."""
    if not index.valid:
        return [f"{what} is INVALID (a failed or cancelled build); {FIX}"]
    if not index.ready:
        return [f"{what} is not ready for inserts; {FIX}"]
    if not matches(spec, index):
        return [
            f"{what} is `{index.definition}`, expected `{spec.definition(db)}`; drop it, "
            "then " + FIX
        ]
    return []


def partition_problems(
    db: TargetDatabase,
    layout: Layout,
    tree: dict[int, list[ExistingIndex]],
    equivalents: dict[str, str],
) -> list[str]:
    """Each partition (any level) or child table lacking a contract index (or the opt-in
    created_at index, once built), or whose index is invalid, not ready or of another
    definition, as a sentence naming it."""
    problems: list[str] = []
    specs = list(contract_indexes(db).values())
    if any(i.name == CREATED_AT_INDEX for i in tree.get(layout.root.oid, [])):
        specs.append(created_at_index(db))  # opt-in: judged on every partition once built
    for spec in specs:
        if layout.kind == "inheritance":
            for child in (m for m in layout.partitions if m.relkind == "r"):
                problems += _child_problems(db, spec, child, tree.get(child.oid, []))
            continue
        root_name = equivalents.get(spec.name, spec.name)
        root = next((i for i in tree.get(layout.root.oid, []) if i.name == root_name), None)
        if root is not None:  # a missing one is reported once, as missing
            problems += _attached_problems(db, spec, layout, tree, layout.root, root)
    return problems


def _attached_problems(
    db: TargetDatabase,
    spec: IndexSpec,
    layout: Layout,
    tree: dict[int, list[ExistingIndex]],
    parent: Member,
    parent_index: ExistingIndex,
) -> list[str]:
    problems: list[str] = []
    for child in (m for m in layout.members if m.parent_oid == parent.oid):
        if child.relkind not in ("r", "p"):
            continue  # a foreign partition holds no index
        on_child = tree.get(child.oid, [])
        attached = next((i for i in on_child if i.attached_to == parent_index.oid), None)
        if attached is None:
            problems.append(
                f"partition {child.label} has no index attached to "
                f"{parent_index.schema}.{parent_index.name} ({spec.name}); {FIX}"
            )
            own = spec.on_member(child)
            mine = next((i for i in on_child if i.name == own.name), None)
            if child.relkind == "p" and mine is not None:  # name the partitions below too
                problems += _attached_problems(db, spec, layout, tree, child, mine)
            continue
        what = f"partition {child.label}'s index {child.schema}.{attached.name}"
        problems += _judge(db, spec.on_member(child), attached, what)
        if child.relkind == "p":
            problems += _attached_problems(db, spec, layout, tree, child, attached)
    return problems


def _child_problems(
    db: TargetDatabase, spec: IndexSpec, child: Member, on_child: list[ExistingIndex]
) -> list[str]:
    own = spec.on_member(child)
    named = next((i for i in on_child if i.name == own.name), None)
    if named is None:
        if equivalent_of(own, on_child) is not None:
            return []
        columns = ", ".join(spec.columns)
        return [
            f"child table {child.label} has no index on ({columns}) WHERE {spec.predicate} "
            f"({spec.name} of the parent; expected {child.schema}.{own.name}); {FIX}"
        ]
    return _judge(db, own, named, f"child table {child.label}'s index {child.schema}.{own.name}")


@dataclass(frozen=True)
class WeeksIndexes:
    """The weeks table's indexes, and how they fall short of the spec."""

    layout: Layout | None
    indexes: list[ExistingIndex]  # on the weeks table, and any of the spec's by name
    tree: dict[int, list[ExistingIndex]]  # by partition or child oid; {} on a plain table
    problems: list[str]
    equivalents: dict[str, str]  # {expected index: the equivalent one serving for it}


def weeks_table_problems(db: TargetDatabase) -> WeeksIndexes:
    """Read the weeks table's indexes (and its partitions' or children's), and judge them."""
    with db.cursor() as cur:
        layout = table_layout(cur, db.schema_name, db.weeks_table)
        indexes = table_indexes(
            cur,
            db.schema_name,
            [db.weeks_table],
            [EXECUTION_ID_INDEX, COLLECTION_EXECUTION_INDEX, COMPLETED_AT_INDEX, CREATED_AT_INDEX],
        )
        tree = member_indexes(cur, layout) if layout is not None and layout.is_tree else {}
    if layout is not None and layout.kind not in ("ordinary", "partitioned", "inheritance"):
        not_a_table = (
            f"{layout.label} is a {layout.kind}, not a table, so it carries none of the "
            "expected indexes; point target_db.weeks_table at the table that holds the rows"
        )
        return WeeksIndexes(layout, indexes, tree, [not_a_table], {})
    problems, equivalents = index_problems(db, indexes)
    if tree:
        problems += partition_problems(db, layout, tree, equivalents)
    return WeeksIndexes(layout, indexes, tree, problems, equivalents)
