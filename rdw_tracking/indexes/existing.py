"""What an index is: the catalog's indexes on a table (or on each member of its tree),
and whether one matches an `IndexSpec`."""

import re
from dataclasses import dataclass
from typing import NamedTuple

import psycopg
from psycopg.rows import class_row

from rdw_tracking.indexes.specs import IndexSpec
from rdw_tracking.layout import Layout
from rdw_tracking.resources import TargetDatabase


@dataclass(frozen=True)
class ExistingIndex:
    """One index as the catalog has it; a row of `_INDEXES`, read by column name."""

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

    def __post_init__(self) -> None:
        # a PostgreSQL array arrives as a list; a spec's columns are a tuple
        object.__setattr__(self, "columns", tuple(self.columns))


# The spec's `pg_indexes` query, with what `pg_indexes` leaves out: validity, readiness,
# key columns, predicate, size, and which partitioned index an index is attached to.
_INDEXES = """
    SELECT i.relname AS name, t.relname AS "table", pg_get_indexdef(i.oid) AS definition,
           x.indisvalid AS valid, x.indisready AS ready, x.indisunique AS "unique",
           am.amname AS method,
           ARRAY(SELECT CASE WHEN k.attnum = 0 THEN NULL
                             ELSE a.attname || CASE WHEN x.indoption[k.n - 1] & 1 = 1
                                                    THEN ' DESC' ELSE '' END END
                 FROM unnest(x.indkey[0:x.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, n)
                 LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
                 ORDER BY k.n) AS columns,
           x.indnatts - x.indnkeyatts AS include_columns,
           pg_get_expr(x.indpred, x.indrelid) AS predicate,
           pg_relation_size(i.oid) AS bytes,
           i.oid::bigint AS oid, t.oid::bigint AS table_oid, n.nspname AS schema,
           (SELECT h.inhparent::bigint FROM pg_inherits h WHERE h.inhrelid = i.oid)
               AS attached_to,
           i.relkind = 'I' AS partitioned
    FROM pg_index x
    JOIN pg_class i ON i.oid = x.indexrelid
    JOIN pg_class t ON t.oid = x.indrelid
    JOIN pg_namespace n ON n.oid = t.relnamespace
    JOIN pg_am am ON am.oid = i.relam
"""


def _indexes(cur: psycopg.Cursor, where: str, params: list) -> list[ExistingIndex]:
    """`_INDEXES` filtered by `where`, on `cur`'s connection and transaction."""
    with cur.connection.cursor(row_factory=class_row(ExistingIndex)) as named:
        return named.execute(_INDEXES + where, params).fetchall()


def table_indexes(
    cur: psycopg.Cursor, schema: str, tables: list[str], names: list[str] = ()
) -> list[ExistingIndex]:
    """Every index on `schema.tables`, plus any index of `schema` named in `names`."""
    return _indexes(
        cur,
        """
        WHERE n.nspname = %s AND (t.relname = ANY(%s) OR i.relname = ANY(%s))
        ORDER BY t.relname, i.relname
        """,
        [schema, list(tables), list(names)],
    )


def member_indexes(cur: psycopg.Cursor, layout: Layout) -> dict[int, list[ExistingIndex]]:
    """Every index on each member of `layout` (the table, its partitions or children),
    by the member's oid."""
    on_members = _indexes(
        cur,
        " WHERE t.oid = ANY(%s::oid[]) ORDER BY t.relname, i.relname",
        [[m.oid for m in layout.members]],
    )
    found: dict[int, list[ExistingIndex]] = {m.oid: [] for m in layout.members}
    for index in on_members:
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


class Lookup(NamedTuple):
    named: ExistingIndex | None  # the index named `spec.name`
    on_table: list[ExistingIndex]  # every index on `spec.table`


def lookup(db: TargetDatabase, spec: IndexSpec, conn: psycopg.Connection | None = None) -> Lookup:
    """The index named `spec.name` and every index on `spec.table`."""
    if conn is not None:
        found = table_indexes(conn.cursor(), spec.schema_of(db), [spec.table], [spec.name])
    else:
        with db.cursor() as cur:
            found = table_indexes(cur, spec.schema_of(db), [spec.table], [spec.name])
    named = next((i for i in found if i.name == spec.name), None)
    return Lookup(named, [i for i in found if i.table == spec.table])
