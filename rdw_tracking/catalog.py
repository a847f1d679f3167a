"""Catalog lookups shared by the assets: one query per question, always schema-qualified.

The spec's own `information_schema` queries do not filter by schema and would pick up a
same-named table in another schema; these read `pg_catalog` for the configured schema only.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg


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


def columns(cur: psycopg.Cursor, schema: str, table: str) -> list[Column]:
    """Every live column of `schema.table` in order; empty when the table is missing."""
    cur.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        [schema, table],
    )
    return [Column(*row) for row in cur.fetchall()]


def execution_id_foreign_keys(
    cur: psycopg.Cursor, schema: str, weeks_table: str, executions_table: str
) -> list[ForeignKey]:
    """FKs from `weeks_table(execution_id)` alone to `executions_table(id)`, same schema."""
    cur.execute(
        """
        SELECT con.conname, con.convalidated, pg_get_constraintdef(con.oid),
               CASE con.confdeltype WHEN 'a' THEN 'NO ACTION' WHEN 'r' THEN 'RESTRICT'
                    WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL'
                    WHEN 'd' THEN 'SET DEFAULT' END
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
        """,
        [schema, weeks_table, schema, executions_table],
    )
    return [ForeignKey(*row) for row in cur.fetchall()]


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
