"""Performance and storage impact of `execution_id`: the spec's join under EXPLAIN
ANALYZE, and what the table, its partitions or children, its indexes and the column take
on disk."""

import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import dagster as dg
import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row
from pydantic import Field, field_validator

from rdw_tracking import catalog
from rdw_tracking.assets import GROUP, READ_RETRY
from rdw_tracking.assets.metadata import metadata_table
from rdw_tracking.assets.tables import report_data_weeks, workflow_executions
from rdw_tracking.errors import refuse
from rdw_tracking.layout import KINDS, Layout, table_layout
from rdw_tracking.resources import TargetDatabase

JOIN_PLAN = "execution_id_join_plan"
USES_INDEX_CHECK = "execution_id_join_uses_index"
STORAGE = "execution_id_storage"
MAX_BYTES = 2**63 - 1

# -- execution_id_join_plan ---------------------------------------------------------------


class JoinPlanConfig(dg.Config):
    """Run config of `execution_id_join_plan` (`ops.execution_id_join_plan.config`)."""

    collection_id: str | None = Field(
        default=None,
        description="Collection to plan the join for; default: the one with the most weeks.",
    )

    @field_validator("collection_id")
    @classmethod
    def _uuid(cls, value: str | None, info) -> str | None:
        if value is None:
            return None
        try:
            return str(uuid.UUID(value.strip()))
        except ValueError:
            raise refuse(f"{info.field_name} must be a UUID, got {value!r}") from None


# The spec's performance query, verbatim but for the schema-qualified names.
JOIN_SQL = """
EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
SELECT rdw.*, we.status, we.completed_at
FROM {weeks} rdw
LEFT JOIN {executions} we ON rdw.execution_id = we.id
WHERE rdw.collection_id = %(collection_id)s
ORDER BY rdw.week_start_date
"""

# The planner's statistics know the most common collection without a scan.
MOST_COMMON_SQL = """
SELECT (most_common_vals::text::uuid[])[1] AS collection_id, most_common_freqs[1] AS share
FROM pg_stats
WHERE schemaname = %s AND tablename = %s AND attname = 'collection_id'
  AND most_common_vals IS NOT NULL
"""

# No statistics to go by: count over a sample of pages (whole table when it is small).
SAMPLED_MOST_WEEKS_SQL = """
SELECT collection_id, count(*) AS weeks FROM {weeks} TABLESAMPLE SYSTEM (%(pct)s) REPEATABLE (7)
GROUP BY collection_id ORDER BY count(*) DESC, collection_id LIMIT 1
"""
# A view or foreign table takes no TABLESAMPLE: count over its first rows instead.
FIRST_ROWS_MOST_WEEKS_SQL = """
SELECT collection_id, count(*) AS weeks FROM (SELECT collection_id FROM {weeks} LIMIT %(rows)s) AS w
GROUP BY collection_id ORDER BY count(*) DESC, collection_id LIMIT 1
"""
# TABLESAMPLE applies to tables (with their partitions or children) and materialized views.
SAMPLEABLE = ("ordinary", "partitioned", "inheritance", "materialized view")

FALLBACK_SAMPLE_ROWS = 50_000


@dataclass(frozen=True)
class Plan:
    collection_id: str
    chosen_by: str
    document: dict
    relations: frozenset[str] = field(default_factory=frozenset)  # the table and its partitions

    @property
    def execution_ms(self) -> float:
        return float(self.document["Execution Time"])

    @property
    def planning_ms(self) -> float:
        return float(self.document["Planning Time"])


def plan_nodes(node: dict, depth: int = 0) -> Iterator[tuple[int, dict]]:
    yield depth, node
    for child in node.get("Plans", []):
        yield from plan_nodes(child, depth + 1)


def indexes_used(root: dict, tables: str | Collection[str]) -> list[str]:
    """Names of the indexes the plan reads on `tables` (index, index-only, bitmap scans):
    the table, and on a partitioned or inherited one each partition or child it scans."""
    tables = {tables} if isinstance(tables, str) else set(tables)
    names: list[str] = []
    for _, node in plan_nodes(root):
        if node.get("Relation Name") not in tables:
            continue
        if node["Node Type"] in ("Index Scan", "Index Only Scan"):
            names.append(node["Index Name"])
        elif node["Node Type"] == "Bitmap Heap Scan":
            names += [
                n["Index Name"]
                for _, n in plan_nodes(node)
                if n["Node Type"] == "Bitmap Index Scan"
            ]
    return list(dict.fromkeys(names))


def plan_text(root: dict) -> str:
    """The plan as indented lines, like EXPLAIN's text format."""
    lines = []
    for depth, node in plan_nodes(root):
        what = node["Node Type"]
        if "Relation Name" in node:
            what += f" on {node['Relation Name']} {node.get('Alias', '')}".rstrip()
        if "Index Name" in node:
            what += f" using {node['Index Name']}"
        timing = (
            f"(actual time={node.get('Actual Startup Time', 0):.3f}.."
            f"{node.get('Actual Total Time', 0):.3f} rows={node.get('Actual Rows', 0)} "
            f"loops={node.get('Actual Loops', 0)})"
        )
        buffers = (
            f"buffers: shared hit={node.get('Shared Hit Blocks', 0)} "
            f"read={node.get('Shared Read Blocks', 0)}"
        )
        prefix = "  " * depth + ("-> " if depth else "")
        lines.append(f"{prefix}{what}  {timing}  {buffers}")
        for key in ("Index Cond", "Recheck Cond", "Filter", "Hash Cond", "Sort Key"):
            if key in node:
                value = ", ".join(node[key]) if isinstance(node[key], list) else node[key]
                lines.append("  " * depth + f"     {key}: {value}")
    return "\n".join(lines)


def busiest_collection(
    cur: psycopg.Cursor, db: TargetDatabase, kind: str = "ordinary"
) -> tuple[str, str] | None:
    """(collection_id, how it was chosen) of the collection with the most weeks."""
    with cur.connection.cursor(row_factory=namedtuple_row) as by_name:
        row = by_name.execute(MOST_COMMON_SQL, [db.schema_name, db.weeks_table]).fetchone()
        if row and row.collection_id:
            share = f"{row.share:.4%} of rows"
            return str(row.collection_id), f"most common collection_id in pg_stats ({share})"
        if kind not in SAMPLEABLE:
            query = sql.SQL(FIRST_ROWS_MOST_WEEKS_SQL).format(weeks=db.weeks)
            row = by_name.execute(query, {"rows": FALLBACK_SAMPLE_ROWS}).fetchone()
            if row is None:
                return None
            return str(row.collection_id), f"most weeks ({row.weeks}) among the {kind}'s first rows"
        estimate = cur.execute(
            "SELECT reltuples FROM pg_class WHERE oid = %s::regclass", [db.weeks.as_string(cur)]
        ).fetchone()[0]
        pct = 100.0 if estimate <= FALLBACK_SAMPLE_ROWS else 100.0 * FALLBACK_SAMPLE_ROWS / estimate
        query = sql.SQL(SAMPLED_MOST_WEEKS_SQL).format(weeks=db.weeks)
        row = by_name.execute(query, {"pct": pct}).fetchone()
    if row is None:
        return None
    how = "whole table" if pct >= 100 else f"TABLESAMPLE SYSTEM ({pct:.3g}%)"
    return str(row.collection_id), f"most weeks ({row.weeks}) in a count over the {how}"


def explain_join(db: TargetDatabase, collection_id: str | None) -> Plan:
    weeks = db.qualified(db.weeks_table)
    with db.cursor() as cur:  # rolled back at the end, as EXPLAIN ANALYZE runs the query
        # The join runs on the table as users query it: a partitioned or inheritance
        # parent (the planner prunes and appends), or even a view.
        layout = table_layout(cur, db.schema_name, db.weeks_table)
        exists = {
            "weeks_table": layout is not None,
            "executions_table": catalog.table_exists(cur, db.schema_name, db.executions_table),
        }
        for name, found in exists.items():
            if not found:
                raise refuse(
                    f"table {db.qualified(getattr(db, name))} does not exist: the join cannot "
                    f"be planned; check target_db.schema_name and target_db.{name}"
                )
        if collection_id:
            chosen_by = "configured"
        else:
            collection_id, chosen_by = busiest_collection(cur, db, layout.kind) or (
                str(uuid.UUID(int=0)),
                f"{weeks} has no rows: planned for a collection_id that matches none",
            )
        cur.execute(
            sql.SQL(JOIN_SQL).format(weeks=db.weeks, executions=db.executions),
            {"collection_id": uuid.UUID(collection_id)},
        )
        (document,) = cur.fetchone()[0]
    relations = frozenset(m.name for m in layout.members)
    return Plan(collection_id, chosen_by, document, relations)


def uses_index_check(plan: Plan, db: TargetDatabase) -> dg.AssetCheckResult:
    weeks = db.qualified(db.weeks_table)
    names = indexes_used(plan.document["Plan"], plan.relations or {db.weeks_table})
    if names:
        description = f"the join reads {weeks} through {', '.join(names)}"
    else:
        description = (
            f"the join reads {weeks} without an index (sequential scan) for collection "
            f"{plan.collection_id}; an index on {weeks}(collection_id) serves it (the "
            "partial execution_id indexes cannot, as the join keeps rows without an id)"
        )
    return dg.AssetCheckResult(
        check_name=USES_INDEX_CHECK,
        passed=bool(names),
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={"uses_index": bool(names), "index_names": ", ".join(names)},
    )


@dg.asset(
    key=JOIN_PLAN,
    group_name=GROUP,
    deps=[report_data_weeks, workflow_executions, "execution_id_schema"],
    kinds={"postgres"},
    retry_policy=READ_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            USES_INDEX_CHECK,
            asset=JOIN_PLAN,
            description="The join reads report_data_weeks through an index (WARN).",
        )
    ],
)
def execution_id_join_plan(
    config: JoinPlanConfig, target_db: TargetDatabase
) -> dg.MaterializeResult:
    """The spec's performance query under `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`.

    `report_data_weeks LEFT JOIN workflow_executions ... WHERE collection_id = $1 ORDER
    BY week_start_date`, for the configured collection or else the one with the most
    weeks (from the planner's statistics, no scan). EXPLAIN ANALYZE really runs the
    query, so it runs in a transaction that is rolled back. Records execution and
    planning time, which indexes the plan uses on `report_data_weeks`, and the plan
    itself; the check warns when no index is used.
    """
    plan = explain_join(target_db, config.collection_id)
    root = plan.document["Plan"]
    names = indexes_used(root, plan.relations or {target_db.weeks_table})
    return dg.MaterializeResult(
        metadata={
            "execution_ms": plan.execution_ms,
            "planning_ms": plan.planning_ms,
            "uses_index": bool(names),
            "index_names": ", ".join(names),
            "collection_id": plan.collection_id,
            "collection_chosen_by": plan.chosen_by,
            "rows": int(root.get("Actual Rows", 0)),
            "shared_hit_blocks": int(root.get("Shared Hit Blocks", 0)),
            "shared_read_blocks": int(root.get("Shared Read Blocks", 0)),
            "plan": dg.MetadataValue.md(f"```\n{plan_text(root)}\n```"),
            "plan_json": dg.MetadataValue.json(plan.document),
        },
        check_results=[uses_index_check(plan, target_db)],
    )


# -- execution_id_storage -----------------------------------------------------------------


class StorageConfig(dg.Config):
    """Run config of `execution_id_storage` (`ops.execution_id_storage.config`)."""

    sample_above_bytes: int = Field(
        default=256 * 1024 * 1024,
        description="Above this heap size, execution_id_bytes is estimated from a sample.",
    )
    sample_bytes: int = Field(
        default=32 * 1024 * 1024,
        description="About how much of the heap the sample reads (whole pages).",
    )

    @field_validator("sample_above_bytes", "sample_bytes")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if not 8192 <= value <= MAX_BYTES:
            raise refuse(
                f"{info.field_name} must be between 8192 bytes (one page) and {MAX_BYTES} "
                f"(PostgreSQL's largest bigint), got {value}"
            )
        return value


@dataclass(frozen=True)
class MemberSize:
    """One table of the layout (the table itself, a partition or a child) on disk."""

    label: str
    kind: str
    level: int
    bound: str | None
    holds_rows: bool
    heap_bytes: int
    table_bytes: int
    index_bytes: int
    total_bytes: int
    row_estimate: int | None  # None: never analyzed


class IndexSize(NamedTuple):
    """An index of the table, its bytes summed over the partitions attached to it."""

    name: str
    size: int
    definition: str


@dataclass(frozen=True)
class Storage:
    heap_bytes: int
    table_bytes: int
    total_bytes: int
    index_bytes: int
    indexes: list[IndexSize]
    row_estimate: int | None
    execution_id_bytes: int | None  # None: not measurable here (a view, a foreign table)
    sample_pct: float | None  # None: every row was measured
    sample_rows: int
    layout: Layout | None = None
    members: list[MemberSize] = field(default_factory=list)
    index_partitions: dict[str, int] = field(default_factory=dict)  # name: how many pieces


# Each table of the layout on its own: a partitioned parent has no storage of its own
# (its sizes are 0), so the table's size is the sum over the tree.
SIZES_SQL = """
SELECT c.oid::bigint AS oid, pg_relation_size(c.oid) AS heap_bytes,
       pg_table_size(c.oid) AS table_bytes, pg_indexes_size(c.oid) AS index_bytes,
       pg_total_relation_size(c.oid) AS total_bytes, c.reltuples::bigint AS reltuples
FROM pg_class c WHERE c.oid = ANY(%s::oid[])
"""

# Every index on the tree; a partition's index counts toward the partitioned index it
# is attached to (pg_partition_root), an index of its own stands alone.
INDEXES_SQL = """
SELECT i.oid::bigint AS oid, coalesce(pg_partition_root(i.oid), i.oid)::bigint AS root,
       i.relname AS name, pg_relation_size(i.oid) AS size, pg_get_indexdef(i.oid) AS definition
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
WHERE x.indrelid = ANY(%s::oid[])
"""

COLUMN_SQL = "SELECT count(*), coalesce(sum(pg_column_size(execution_id)), 0) FROM {weeks}"
SAMPLED_COLUMN_SQL = COLUMN_SQL + " TABLESAMPLE SYSTEM (%(pct)s) REPEATABLE (7)"


def member_sizes(cur: psycopg.Cursor, layout: Layout) -> list[MemberSize]:
    with cur.connection.cursor(row_factory=namedtuple_row) as by_name:
        rows = by_name.execute(SIZES_SQL, [[m.oid for m in layout.members]]).fetchall()
    by_oid = {row.oid: row for row in rows}
    sizes = []
    for m in layout.members:
        row = by_oid.get(m.oid)
        sizes.append(
            MemberSize(
                label=m.label,
                kind=KINDS.get(m.relkind, m.relkind),
                level=m.level,
                bound=m.bound,
                holds_rows=m.holds_rows,
                heap_bytes=row.heap_bytes if row else 0,
                table_bytes=row.table_bytes if row else 0,
                index_bytes=row.index_bytes if row else 0,
                total_bytes=row.total_bytes if row else 0,
                row_estimate=row.reltuples if row and row.reltuples >= 0 else None,
            )
        )
    return sizes


def tree_indexes(cur: psycopg.Cursor, layout: Layout) -> tuple[list[IndexSize], dict[str, int]]:
    """(each index with its bytes over all its partitions, {index: partitions})."""
    with cur.connection.cursor(row_factory=namedtuple_row) as by_name:
        rows = by_name.execute(INDEXES_SQL, [[m.oid for m in layout.members]]).fetchall()
    named = {row.oid: row for row in rows}
    total: dict[int, int] = {}
    pieces: dict[int, int] = {}
    for row in rows:
        # attached to an index above our table: it stands alone
        top = row.root if row.root in named else row.oid
        total[top] = total.get(top, 0) + row.size
        pieces[top] = pieces.get(top, 0) + (row.oid != top)
    indexes = sorted(
        (IndexSize(named[top].name, size, named[top].definition) for top, size in total.items()),
        key=lambda index: (-index.size, index.name),
    )
    return indexes, {named[top].name: count for top, count in pieces.items() if count}


def measure_storage(db: TargetDatabase, config: StorageConfig) -> Storage:
    with db.cursor() as cur:
        layout = table_layout(cur, db.schema_name, db.weeks_table)
        if layout is None:
            raise refuse(
                f"table {db.qualified(db.weeks_table)} does not exist; "
                "check target_db.schema_name and weeks_table"
            )
        members = member_sizes(cur, layout)
        indexes, index_partitions = tree_indexes(cur, layout)
        heap, table, index, total = (
            sum(m.heap_bytes for m in members),
            sum(m.table_bytes for m in members),
            sum(m.index_bytes for m in members),
            sum(m.total_bytes for m in members),
        )
        counted = [m for m in members if m.holds_rows or m.kind == "materialized view"]
        row_estimate = (
            sum(m.row_estimate for m in counted)
            if counted and all(m.row_estimate is not None for m in counted)
            else None  # -1: never analyzed
        )
        shape = {"layout": layout, "members": members, "index_partitions": index_partitions}
        sizes = (heap, table, total, index, indexes)
        if layout.kind not in SAMPLEABLE:  # a view's rows live elsewhere, a foreign table's
            return Storage(*sizes, row_estimate, None, None, 0, **shape)  # on another server
        if heap > config.sample_above_bytes:
            # TABLESAMPLE on the parent samples every partition or child alike.
            pct = min(100.0, 100.0 * config.sample_bytes / heap)
            cur.execute(sql.SQL(SAMPLED_COLUMN_SQL).format(weeks=db.weeks), {"pct": pct})
            rows, column_bytes = cur.fetchone()
            if row_estimate is None:
                row_estimate = round(rows * 100.0 / pct)
            scale = row_estimate / rows if rows else 0.0
            return Storage(*sizes, row_estimate, round(column_bytes * scale), pct, rows, **shape)
        rows, column_bytes = cur.execute(sql.SQL(COLUMN_SQL).format(weeks=db.weeks)).fetchone()
    return Storage(*sizes, rows, column_bytes, None, rows, **shape)


def members_table(members: list[MemberSize]) -> dg.TableMetadataValue:
    columns = {
        "table": "string", "kind": "string", "level": "int", "bound": "string",
        "row_estimate": "int", "heap_bytes": "int", "table_bytes": "int",
        "index_bytes": "int", "total_bytes": "int",
    }  # fmt: skip
    return metadata_table(
        columns,
        (
            {
                "table": m.label,
                "kind": m.kind,
                "level": m.level,
                "bound": m.bound or "",
                "row_estimate": m.row_estimate if m.row_estimate is not None else -1,
                "heap_bytes": m.heap_bytes,
                "table_bytes": m.table_bytes,
                "index_bytes": m.index_bytes,
                "total_bytes": m.total_bytes,
            }
            for m in members
        ),
    )


def storage_metadata(storage: Storage) -> dict:
    layout = storage.layout
    if storage.execution_id_bytes is None:
        method = (
            f"not measured: {layout.label} is a {layout.kind}, whose rows are not stored "
            "in this database's tables of that name"
        )
    elif storage.sample_pct is None:
        method = f"exact: pg_column_size over all {storage.sample_rows} rows"
    else:
        method = (
            f"estimated: pg_column_size over a TABLESAMPLE SYSTEM ({storage.sample_pct:.3g}%) "
            f"sample of {storage.sample_rows} rows, scaled to the row estimate"
        )
    metadata = {
        "table_bytes": storage.table_bytes,
        "heap_bytes": storage.heap_bytes,
        "total_bytes": storage.total_bytes,
        "index_bytes": storage.index_bytes,
        "execution_id_bytes": storage.execution_id_bytes,
        "execution_id_sampled": storage.sample_pct is not None,
        "execution_id_method": method,
        "execution_id_share_pct": (
            round(100.0 * storage.execution_id_bytes / storage.table_bytes, 2)
            if storage.table_bytes and storage.execution_id_bytes is not None
            else None
        ),
        "row_estimate": storage.row_estimate,
        "indexes": metadata_table(
            {"index": "string", "bytes": "int", "partitions": "int", "definition": "string"},
            (
                {
                    "index": index.name,
                    "bytes": index.size,
                    "partitions": storage.index_partitions.get(index.name, 0),
                    "definition": index.definition,
                }
                for index in storage.indexes
            ),
        ),
    }
    if layout is not None:
        metadata["layout"] = layout.kind
        if layout.partitions:
            metadata["partitions"] = len(layout.partitions)
            metadata["partition_sizes"] = members_table(storage.members)
    for index in storage.indexes:
        metadata[f"index_bytes.{index.name}"] = index.size
    return metadata


@dg.asset(
    key=STORAGE,
    group_name=GROUP,
    deps=[report_data_weeks, "execution_id_schema"],
    kinds={"postgres"},
    retry_policy=READ_RETRY,
)
def execution_id_storage(config: StorageConfig, target_db: TargetDatabase) -> dg.MaterializeResult:
    """What `report_data_weeks` and `execution_id` take on disk.

    Table (heap with TOAST), total and index sizes, each index on its own, and the
    column's share: `pg_column_size(execution_id)` summed over every row, or over a
    `TABLESAMPLE SYSTEM` sample scaled to the planner's row estimate when the heap is
    larger than `sample_above_bytes` (metadata says which). NULLs take no column space.

    A partitioned table has no storage of its own: every size is the sum over its
    partitions (an inheritance parent: over itself and its children), each index's over
    its partitions, and `partition_sizes` lists each table of the tree. A view or foreign
    table in that name is reported with what this database stores for it.
    """
    return dg.MaterializeResult(metadata=storage_metadata(measure_storage(target_db, config)))


performance_assets = [execution_id_join_plan, execution_id_storage]
