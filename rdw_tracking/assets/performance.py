"""Performance and storage impact of `execution_id`: the spec's join under EXPLAIN
ANALYZE, and what the table, its indexes and the column take on disk."""

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg
import psycopg
from psycopg import sql
from pydantic import Field, field_validator

from rdw_tracking import catalog
from rdw_tracking.assets import GROUP, READ_RETRY, refuse
from rdw_tracking.assets.tables import report_data_weeks, workflow_executions
from rdw_tracking.resources import TargetDatabase

JOIN_PLAN = "execution_id_join_plan"
USES_INDEX_CHECK = "execution_id_join_uses_index"
STORAGE = "execution_id_storage"

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
SELECT (most_common_vals::text::uuid[])[1], most_common_freqs[1]
FROM pg_stats
WHERE schemaname = %s AND tablename = %s AND attname = 'collection_id'
  AND most_common_vals IS NOT NULL
"""

# No statistics to go by: count over a sample of pages (whole table when it is small).
SAMPLED_MOST_WEEKS_SQL = """
SELECT collection_id, count(*) FROM {weeks} TABLESAMPLE SYSTEM (%(pct)s) REPEATABLE (7)
GROUP BY collection_id ORDER BY count(*) DESC, collection_id LIMIT 1
"""

FALLBACK_SAMPLE_ROWS = 50_000


@dataclass(frozen=True)
class Plan:
    collection_id: str
    chosen_by: str
    document: dict

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


def indexes_used(root: dict, table: str) -> list[str]:
    """Names of the indexes the plan reads on `table` (index, index-only, bitmap scans)."""
    names: list[str] = []
    for _, node in plan_nodes(root):
        if node.get("Relation Name") != table:
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


def busiest_collection(cur: psycopg.Cursor, db: TargetDatabase) -> tuple[str, str] | None:
    """(collection_id, how it was chosen) of the collection with the most weeks."""
    cur.execute(MOST_COMMON_SQL, [db.schema_name, db.weeks_table])
    row = cur.fetchone()
    if row and row[0]:
        return str(row[0]), f"most common collection_id in pg_stats ({row[1]:.4%} of rows)"
    cur.execute(
        "SELECT reltuples FROM pg_class WHERE oid = %s::regclass",
        [db.weeks.as_string(cur)],
    )
    estimate = cur.fetchone()[0]
    pct = 100.0 if estimate <= FALLBACK_SAMPLE_ROWS else 100.0 * FALLBACK_SAMPLE_ROWS / estimate
    cur.execute(sql.SQL(SAMPLED_MOST_WEEKS_SQL).format(weeks=db.weeks), {"pct": pct})
    row = cur.fetchone()
    if row is None:
        return None
    how = "whole table" if pct >= 100 else f"TABLESAMPLE SYSTEM ({pct:.3g}%)"
    return str(row[0]), f"most weeks ({row[1]}) in a count over the {how}"


def explain_join(db: TargetDatabase, collection_id: str | None) -> Plan:
    weeks = db.qualified(db.weeks_table)
    with db.cursor() as cur:  # rolled back at the end, as EXPLAIN ANALYZE runs the query
        for table in (db.weeks_table, db.executions_table):
            if not catalog.table_exists(cur, db.schema_name, table):
                raise refuse(
                    f"table {db.qualified(table)} does not exist: the join cannot be planned; "
                    "check target_db.schema_name and the table names"
                )
        if collection_id:
            chosen_by = "configured"
        else:
            collection_id, chosen_by = busiest_collection(cur, db) or (
                str(uuid.UUID(int=0)),
                f"{weeks} has no rows: planned for a collection_id that matches none",
            )
        cur.execute(
            sql.SQL(JOIN_SQL).format(weeks=db.weeks, executions=db.executions),
            {"collection_id": uuid.UUID(collection_id)},
        )
        (document,) = cur.fetchone()[0]
    return Plan(collection_id, chosen_by, document)


def uses_index_check(plan: Plan, db: TargetDatabase) -> dg.AssetCheckResult:
    weeks = db.qualified(db.weeks_table)
    names = indexes_used(plan.document["Plan"], db.weeks_table)
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
    names = indexes_used(root, target_db.weeks_table)
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
        if value < 8192:
            raise refuse(f"{info.field_name} must be at least 8192 bytes (one page), got {value}")
        return value


@dataclass(frozen=True)
class Storage:
    heap_bytes: int
    table_bytes: int
    total_bytes: int
    index_bytes: int
    indexes: list[tuple[str, int, str]]  # (name, bytes, definition)
    row_estimate: int | None
    execution_id_bytes: int
    sample_pct: float | None  # None: every row was measured
    sample_rows: int


SIZES_SQL = """
SELECT pg_relation_size(c.oid), pg_table_size(c.oid), pg_total_relation_size(c.oid),
       pg_indexes_size(c.oid), c.reltuples::bigint
FROM pg_class c WHERE c.oid = %s::regclass
"""

INDEXES_SQL = """
SELECT i.relname, pg_relation_size(i.oid), pg_get_indexdef(i.oid)
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
WHERE x.indrelid = %s::regclass
ORDER BY pg_relation_size(i.oid) DESC, i.relname
"""

COLUMN_SQL = "SELECT count(*), coalesce(sum(pg_column_size(execution_id)), 0) FROM {weeks}"
SAMPLED_COLUMN_SQL = COLUMN_SQL + " TABLESAMPLE SYSTEM (%(pct)s) REPEATABLE (7)"


def measure_storage(db: TargetDatabase, config: StorageConfig) -> Storage:
    with db.cursor() as cur:
        if not catalog.table_exists(cur, db.schema_name, db.weeks_table):
            raise refuse(
                f"table {db.qualified(db.weeks_table)} does not exist; "
                "check target_db.schema_name and weeks_table"
            )
        regclass = db.weeks.as_string(cur)
        heap, table, total, index, reltuples = cur.execute(SIZES_SQL, [regclass]).fetchone()
        indexes = cur.execute(INDEXES_SQL, [regclass]).fetchall()
        row_estimate = reltuples if reltuples >= 0 else None  # -1: never analyzed
        if heap > config.sample_above_bytes:
            pct = min(100.0, 100.0 * config.sample_bytes / heap)
            cur.execute(sql.SQL(SAMPLED_COLUMN_SQL).format(weeks=db.weeks), {"pct": pct})
            rows, column_bytes = cur.fetchone()
            if row_estimate is None:
                row_estimate = round(rows * 100.0 / pct)
            scale = row_estimate / rows if rows else 0.0
            return Storage(
                heap, table, total, index, indexes, row_estimate,
                round(column_bytes * scale), pct, rows,
            )  # fmt: skip
        rows, column_bytes = cur.execute(sql.SQL(COLUMN_SQL).format(weeks=db.weeks)).fetchone()
    return Storage(heap, table, total, index, indexes, rows, column_bytes, None, rows)


def storage_metadata(storage: Storage) -> dict:
    if storage.sample_pct is None:
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
            if storage.table_bytes
            else None
        ),
        "row_estimate": storage.row_estimate,
        "indexes": dg.MetadataValue.table(
            records=[
                dg.TableRecord({"index": name, "bytes": size, "definition": definition})
                for name, size, definition in storage.indexes
            ],
            schema=dg.TableSchema(
                columns=[
                    dg.TableColumn("index", "string"),
                    dg.TableColumn("bytes", "int"),
                    dg.TableColumn("definition", "string"),
                ]
            ),
        ),
    }
    for name, size, _ in storage.indexes:
        metadata[f"index_bytes.{name}"] = size
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
    """
    return dg.MaterializeResult(metadata=storage_metadata(measure_storage(target_db, config)))


performance_assets = [execution_id_join_plan, execution_id_storage]
