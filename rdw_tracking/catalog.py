"""Catalog lookups shared by the assets: one query per question, always schema-qualified.

The spec's own `information_schema` queries do not filter by schema and would pick up a
same-named table in another schema; these read `pg_catalog` for the configured schema only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import psycopg
from psycopg.rows import class_row


@dataclass(frozen=True)
class Column:
    name: str
    data_type: str
    is_nullable: bool
    column_default: str | None


@dataclass(frozen=True)
class ForeignKey:
    name: str
    validated: bool
    definition: str
    on_delete: str


def table_exists(cur: psycopg.Cursor, schema: str, table: str) -> bool:
    cur.execute(
        """
        SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
        """,
        [schema, table],
    )
    return cur.fetchone() is not None


def columns(
    cur: psycopg.Cursor, schema: str, table: str, kinds: tuple[str, ...] = ("r", "p")
) -> list[Column]:
    """Every live column of `schema.table` in order; empty when the table is missing.

    `kinds`: the relkinds that count (a view's columns, say, with `("v",)`)."""
    statement = """
        SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS data_type,
               NOT a.attnotnull AS is_nullable, pg_get_expr(d.adbin, d.adrelid) AS column_default
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = %s AND c.relname = %s AND c.relkind::text = ANY(%s)
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """
    with cur.connection.cursor(row_factory=class_row(Column)) as by_name:
        return by_name.execute(statement, [schema, table, list(kinds)]).fetchall()


def execution_id_foreign_keys(
    cur: psycopg.Cursor, schema: str, weeks_table: str, executions_table: str
) -> list[ForeignKey]:
    """FKs from `weeks_table(execution_id)` alone to `executions_table(id)`, same schema."""
    statement = """
        SELECT con.conname AS name, con.convalidated AS validated,
               pg_get_constraintdef(con.oid) AS definition,
               CASE con.confdeltype WHEN 'a' THEN 'NO ACTION' WHEN 'r' THEN 'RESTRICT'
                    WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL'
                    WHEN 'd' THEN 'SET DEFAULT' END AS on_delete
        FROM pg_constraint con
        JOIN pg_class src ON src.oid = con.conrelid
        JOIN pg_namespace sn ON sn.oid = src.relnamespace
        JOIN pg_class dst ON dst.oid = con.confrelid
        JOIN pg_namespace dn ON dn.oid = dst.relnamespace
        JOIN pg_attribute sa ON sa.attrelid = con.conrelid AND sa.attnum = con.conkey[1]
        JOIN pg_attribute da ON da.attrelid = con.confrelid AND da.attnum = con.confkey[1]
        WHERE con.contype = 'f' AND sn.nspname = %s AND src.relname = %s
          AND dn.nspname = %s AND dst.relname = %s
          AND cardinality(con.conkey) = 1 AND sa.attname = 'execution_id' AND da.attname = 'id'
        ORDER BY con.convalidated DESC, con.conname
        """
    with cur.connection.cursor(row_factory=class_row(ForeignKey)) as by_name:
        return by_name.execute(
            statement, [schema, weeks_table, schema, executions_table]
        ).fetchall()


@dataclass(frozen=True)
class TableAccess:
    """What the connected role may do with one table, from one catalog row."""

    role: str
    owner: str
    usage: bool  # USAGE on the table's schema: without it no other right is any use
    owns: bool  # the owner, or a member of the owning role: may ALTER, CREATE INDEX
    select: bool
    insert: bool
    update: bool  # on the whole table, or on every column asked about
    references: bool
    schema_create: bool  # CREATE in the table's schema: CREATE INDEX needs it besides ownership


def table_access(
    cur: psycopg.Cursor, schema: str, table: str, update_columns: tuple[str, ...] = ()
) -> TableAccess | None:
    """The current role's rights on `schema.table`; None when there is no such table.

    With `update_columns`, UPDATE granted on just those columns counts as UPDATE.
    """
    statement = """
        SELECT current_user AS role, pg_get_userbyid(c.relowner) AS owner,
               has_schema_privilege(n.oid, 'USAGE') AS usage,
               pg_has_role(c.relowner, 'USAGE') AS owns,
               has_table_privilege(c.oid, 'SELECT') AS "select",
               has_table_privilege(c.oid, 'INSERT') AS "insert",
               CASE WHEN cardinality(%(columns)s::text[]) = 0
                    THEN has_table_privilege(c.oid, 'UPDATE')
                    ELSE coalesce((SELECT bool_and(has_column_privilege(c.oid, a.attnum, 'UPDATE'))
                                   FROM pg_attribute a
                                   WHERE a.attrelid = c.oid AND a.attname = ANY(%(columns)s::text[])
                                     AND NOT a.attisdropped), false) END AS "update",
               has_table_privilege(c.oid, 'REFERENCES') AS "references",
               has_schema_privilege(n.oid, 'CREATE') AS schema_create
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %(schema)s AND c.relname = %(table)s AND c.relkind IN ('r', 'p')
        """
    params = {"schema": schema, "table": table, "columns": list(update_columns)}
    with cur.connection.cursor(row_factory=class_row(TableAccess)) as by_name:
        return by_name.execute(statement, params).fetchone()


class SchemaAccess(NamedTuple):
    role: str  # the connected role
    create: bool  # whether it may CREATE in the schema (with USAGE)


def schema_access(cur: psycopg.Cursor, schema: str) -> SchemaAccess | None:
    """What the current role may do in `schema`; None when there is no such schema."""
    statement = """
        SELECT current_user AS role,
               has_schema_privilege(oid, 'CREATE') AND has_schema_privilege(oid, 'USAGE') AS "create"
        FROM pg_namespace WHERE nspname = %s
        """
    with cur.connection.cursor(row_factory=class_row(SchemaAccess)) as by_name:
        return by_name.execute(statement, [schema]).fetchone()


def indexes_leading_with(cur: psycopg.Cursor, schema: str, table: str, column: str) -> list[str]:
    """Valid, ready btree indexes of `schema.table` whose first key column is `column`.

    Partial indexes count: a range condition on `column` lets the planner use one with
    `WHERE column IS NOT NULL`. An INVALID index (a failed CONCURRENTLY build) does not.
    """
    cur.execute(
        """
        SELECT i.relname
        FROM pg_index x
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_am am ON am.oid = i.relam
        JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = x.indkey[0]
        WHERE n.nspname = %s AND t.relname = %s AND a.attname = %s
          AND am.amname = 'btree' AND x.indisvalid AND x.indisready
        ORDER BY i.relname
        """,
        [schema, table, column],
    )
    return [row[0] for row in cur.fetchall()]


def wal_lsn(cur: psycopg.Cursor | psycopg.Connection) -> str | None:
    """Where the server inserts WAL now; None where it can't say (a standby)."""
    try:
        return cur.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
    except psycopg.Error:
        return None


def wal_unflushed(cur: psycopg.Cursor | psycopg.Connection) -> int:
    """Bytes of WAL inserted but not yet flushed to disk."""
    return int(
        cur.execute("SELECT pg_current_wal_insert_lsn() - pg_current_wal_flush_lsn()").fetchone()[0]
    )


def wal_bytes(start: str | None, end: str | None) -> int | None:
    """Bytes of WAL from LSN `start` to LSN `end` (None when either is unknown)."""
    if start is None or end is None:
        return None

    def position(lsn: str) -> int:
        high, low = lsn.split("/")
        return (int(high, 16) << 32) + int(low, 16)

    return position(end) - position(start)


# A valid, ready, non-partial B-tree led by `column`, on each of the given physical tables.
_LEADING_INDEX = """
SELECT t.oid FROM unnest(%(tables)s::oid[]) AS t(oid)
WHERE NOT EXISTS (
    SELECT 1 FROM pg_index i
    JOIN pg_class ic ON ic.oid = i.indexrelid
    JOIN pg_am am ON am.oid = ic.relam AND am.amname = 'btree'
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = t.oid AND i.indisvalid AND i.indisready AND i.indpred IS NULL
      AND a.attname = %(column)s)
"""


def without_leading_index(cur: psycopg.Cursor, tables: list[int], column: str) -> list[int]:
    """Which of `tables` (oids of physical tables) have no usable B-tree led by `column`."""
    cur.execute(_LEADING_INDEX, {"tables": tables, "column": column})
    return [row[0] for row in cur.fetchall()]


@dataclass(frozen=True)
class RowSecurity:
    """Row-level security in force on one table for the connected role, and the policies
    that apply to it (name and command, e.g. `hide_failed FOR SELECT`)."""

    oid: int
    table: str  # schema.name
    role: str
    policies: list[str]


def row_security(cur: psycopg.Cursor, oids: list[int]) -> list[RowSecurity]:
    """The tables of `oids` whose rows the connected role sees or changes only through
    row-level security policies (enabled and the role neither owner nor BYPASSRLS, or
    FORCE ROW LEVEL SECURITY): `row_security_active` asks the server itself."""
    statement = """
        SELECT c.oid::bigint AS oid, n.nspname || '.' || c.relname AS table,
               current_user AS role,
               ARRAY(SELECT p.polname || ' FOR '
                            || CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT'
                                             WHEN 'w' THEN 'UPDATE' WHEN 'd' THEN 'DELETE'
                                             ELSE 'ALL' END
                            || CASE WHEN p.polwithcheck IS NOT NULL THEN ' WITH CHECK' ELSE '' END
                     FROM pg_policy p
                     WHERE p.polrelid = c.oid
                       AND (0::oid = ANY(p.polroles) OR EXISTS (
                            SELECT 1 FROM unnest(p.polroles) AS r(oid)
                            WHERE pg_has_role(current_user, r.oid, 'USAGE')))
                     ORDER BY p.polname) AS policies
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = ANY(%s::oid[]) AND row_security_active(c.oid::regclass)
        ORDER BY n.nspname, c.relname
        """
    with cur.connection.cursor(row_factory=class_row(RowSecurity)) as by_name:
        return by_name.execute(statement, [oids]).fetchall()


@dataclass(frozen=True)
class UpdateTrigger:
    """A user trigger that fires on UPDATE of a row, before or instead of it: it may
    change the row the statement writes (an `updated_at = now()` trigger)."""

    table: str  # schema.name
    name: str
    columns: list[str]  # UPDATE OF these columns only; empty: any UPDATE


def before_update_triggers(cur: psycopg.Cursor, oids: list[int]) -> list[UpdateTrigger]:
    """Enabled, row-level BEFORE UPDATE triggers on the tables of `oids` (a partitioned
    table's own triggers are cloned onto its partitions, so the leaves carry them)."""
    statement = """
        SELECT n.nspname || '.' || c.relname AS table, t.tgname::text AS name,
               ARRAY(SELECT a.attname::text FROM unnest(t.tgattr::int2[]) AS k(attnum)
                     JOIN pg_attribute a ON a.attrelid = t.tgrelid AND a.attnum = k.attnum
                     ORDER BY a.attname) AS columns
        FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE t.tgrelid = ANY(%s::oid[]) AND NOT t.tgisinternal AND t.tgenabled <> 'D'
          AND t.tgtype & 1 = 1       -- FOR EACH ROW
          AND t.tgtype & 2 = 2       -- BEFORE
          AND t.tgtype & 16 = 16     -- UPDATE
        ORDER BY 1, 2
        """
    with cur.connection.cursor(row_factory=class_row(UpdateTrigger)) as by_name:
        return by_name.execute(statement, [oids]).fetchall()
