"""What an index is: the catalog's indexes on a table (or on each member of its tree),
and whether one matches an `IndexSpec`."""

import re
from dataclasses import dataclass

import psycopg

from rdw_tracking.indexes.specs import IndexSpec
from rdw_tracking.layout import Layout
from rdw_tracking.resources import TargetDatabase


@dataclass(frozen=True)
class ExistingIndex:
    name: str
    table: str
    definition: str
    valid: bool
    ready: bool
    unique: bool
    method: str
    columns: tuple[str | None, ...]  # key columns; None for an expression, "x DESC" if descending
    include_columns: int
    predicate: str | None
    bytes: int
    oid: int = 0
    table_oid: int = 0
    schema: str = ""
    attached_to: int | None = None  # the partitioned index this one is a partition of
    partitioned: bool = False  # a partitioned table's index (relkind 'I')


# The spec's `pg_indexes` query, with what `pg_indexes` leaves out: validity, readiness,
# key columns, predicate, size, and which partitioned index an index is attached to.
_INDEXES = """
    SELECT i.relname, t.relname, pg_get_indexdef(i.oid), x.indisvalid, x.indisready,
           x.indisunique, am.amname,
           ARRAY(SELECT CASE WHEN k.attnum = 0 THEN NULL
                             ELSE a.attname || CASE WHEN x.indoption[k.n - 1] & 1 = 1
                                                    THEN ' DESC' ELSE '' END END
                 FROM unnest(x.indkey[0:x.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, n)
                 LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
                 ORDER BY k.n),
           x.indnatts - x.indnkeyatts,
           pg_get_expr(x.indpred, x.indrelid),
           pg_relation_size(i.oid),
           i.oid::bigint, t.oid::bigint, n.nspname,
           (SELECT h.inhparent::bigint FROM pg_inherits h WHERE h.inhrelid = i.oid),
           i.relkind = 'I'
    FROM pg_index x
    JOIN pg_class i ON i.oid = x.indexrelid
    JOIN pg_class t ON t.oid = x.indrelid
    JOIN pg_namespace n ON n.oid = t.relnamespace
    JOIN pg_am am ON am.oid = i.relam
"""


def _existing(rows) -> list[ExistingIndex]:
    return [
        ExistingIndex(
            name,
            table,
            definition,
            valid,
            ready,
            unique,
            method,
            tuple(cols),
            include,
            pred,
            size,
            int(oid),
            int(table_oid),
            schema,
            None if parent is None else int(parent),
            partitioned,
        )
        for (
            name,
            table,
            definition,
            valid,
            ready,
            unique,
            method,
            cols,
            include,
            pred,
            size,
            oid,
            table_oid,
            schema,
            parent,
            partitioned,
        ) in rows
    ]


def table_indexes(
    cur: psycopg.Cursor, schema: str, tables: list[str], names: list[str] = ()
) -> list[ExistingIndex]:
    """Every index on `schema.tables`, plus any index of `schema` named in `names`."""
    cur.execute(
        _INDEXES
        + """
        WHERE n.nspname = %s AND (t.relname = ANY(%s) OR i.relname = ANY(%s))
        ORDER BY t.relname, i.relname
        """,
        [schema, list(tables), list(names)],
    )
    return _existing(cur.fetchall())


def member_indexes(cur: psycopg.Cursor, layout: Layout) -> dict[int, list[ExistingIndex]]:
    """Every index on each member of `layout` (the table, its partitions or children),
    by the member's oid."""
    cur.execute(
        _INDEXES + " WHERE t.oid = ANY(%s::oid[]) ORDER BY t.relname, i.relname",
        [[m.oid for m in layout.members]],
    )
    found: dict[int, list[ExistingIndex]] = {m.oid: [] for m in layout.members}
    for index in _existing(cur.fetchall()):
        found.setdefault(index.table_oid, []).append(index)
    return found


def normalize_predicate(predicate: str | None) -> str | None:
    """`(execution_id IS NOT NULL)` and `execution_id is not null` compare equal."""
    if predicate is None:
        return None
    return " ".join(re.sub(r'[()"]', " ", predicate).lower().split())


def matches(spec: IndexSpec, index: ExistingIndex) -> bool:
    """Whether `index` has the definition of `spec` (whatever its name)."""
    return (
        index.table == spec.table
        and index.method == "btree"
        and not index.unique
        and index.columns == spec.columns
        and index.include_columns == 0
        and normalize_predicate(index.predicate) == normalize_predicate(spec.predicate)
    )


def equivalent_of(spec: IndexSpec, indexes: list[ExistingIndex]) -> ExistingIndex | None:
    """A valid index of `spec`'s definition under another name, if there is one."""
    return next(
        (i for i in indexes if i.name != spec.name and i.valid and i.ready and matches(spec, i)),
        None,
    )


def lookup(
    db: TargetDatabase, spec: IndexSpec, conn: psycopg.Connection | None = None
) -> tuple[ExistingIndex | None, list[ExistingIndex]]:
    """(the index named `spec.name`, every index on `spec.table`)."""
    if conn is not None:
        found = table_indexes(conn.cursor(), spec.schema_of(db), [spec.table], [spec.name])
    else:
        with db.cursor() as cur:
            found = table_indexes(cur, spec.schema_of(db), [spec.table], [spec.name])
    named = next((i for i in found if i.name == spec.name), None)
    return named, [i for i in found if i.table == spec.table]
