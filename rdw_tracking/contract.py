"""The spec's contract for `execution_id`, as the catalog has it: the column, the
table's layout, the foreign keys to `workflow_executions(id)`, and the DDL that adds one
online (`NOT VALID`, then `VALIDATE`).

Plain functions over a `TargetDatabase`: the schema assets and checks judge the report,
the foreign key job (`rdw_tracking.foreign_key`) plans its steps from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from rdw_tracking import catalog
from rdw_tracking.layout import Layout, Member, table_layout
from rdw_tracking.resources import TargetDatabase

FK_NAME = "fk_report_data_weeks_execution_id"
ON_DELETE_ACTIONS = ("NO ACTION", "RESTRICT", "CASCADE", "SET NULL")


@dataclass(frozen=True)
class MemberForeignKey:
    """A foreign key from `execution_id` alone to `workflow_executions(id)` on one table of
    the layout (the table itself, a partition or a child)."""

    table_oid: int
    name: str
    validated: bool
    inherited: bool  # a partition's copy of its parent's constraint (conparentid set)
    on_delete: str


@dataclass(frozen=True)
class SchemaReport:
    weeks_exists: bool  # any relation of that name: a table, or a view the jobs refuse
    columns: list[catalog.Column]
    executions_exists: bool
    foreign_keys: list[catalog.ForeignKey]
    layout: Layout | None = None
    member_foreign_keys: tuple[MemberForeignKey, ...] = ()

    @property
    def execution_id(self) -> catalog.Column | None:
        return next((c for c in self.columns if c.name == "execution_id"), None)

    @property
    def foreign_key(self) -> catalog.ForeignKey | None:
        return self.foreign_keys[0] if self.foreign_keys else None

    def foreign_keys_of(self, oid: int) -> list[MemberForeignKey]:
        return [fk for fk in self.member_foreign_keys if fk.table_oid == oid]

    def without_validated_foreign_key(self) -> list[Member]:
        """The tables of the layout holding rows that no validated foreign key checks."""
        if self.layout is None:
            return []
        return [
            m
            for m in self.layout.leaves
            if not any(fk.validated for fk in self.foreign_keys_of(m.oid))
        ]


# Every FK from execution_id alone to the executions table, on any table of the layout
# (partitions may live in other schemas, so by oid).
MEMBER_FOREIGN_KEYS_SQL = """
SELECT con.conrelid::bigint AS table_oid, con.conname AS name, con.convalidated AS validated,
       con.conparentid <> 0 AS inherited,
       CASE con.confdeltype WHEN 'a' THEN 'NO ACTION' WHEN 'r' THEN 'RESTRICT'
            WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL' WHEN 'd' THEN 'SET DEFAULT' END
         AS on_delete
FROM pg_constraint con
JOIN pg_attribute sa ON sa.attrelid = con.conrelid AND sa.attnum = con.conkey[1]
JOIN pg_attribute da ON da.attrelid = con.confrelid AND da.attnum = con.confkey[1]
WHERE con.contype = 'f' AND con.conrelid = ANY(%(members)s::oid[])
  AND con.confrelid = to_regclass(%(executions)s) AND cardinality(con.conkey) = 1
  AND sa.attname = 'execution_id' AND da.attname = 'id'
ORDER BY con.conrelid, con.convalidated DESC, con.conname
"""


def member_foreign_keys(
    cur: psycopg.Cursor, layout: Layout, db: TargetDatabase
) -> tuple[MemberForeignKey, ...]:
    params = {
        "members": [m.oid for m in layout.members],
        "executions": db.executions.as_string(cur),
    }
    with cur.connection.cursor(row_factory=class_row(MemberForeignKey)) as by_name:
        return tuple(by_name.execute(MEMBER_FOREIGN_KEYS_SQL, params).fetchall())


def inspect_schema(db: TargetDatabase) -> SchemaReport:
    with db.cursor() as cur:
        layout = table_layout(cur, db.schema_name, db.weeks_table)
        # A view's (or foreign table's) columns are still worth reporting.
        kinds = (layout.root.relkind,) if layout else ("r", "p")
        weeks_columns = catalog.columns(cur, db.schema_name, db.weeks_table, kinds)
        executions_exists = catalog.table_exists(cur, db.schema_name, db.executions_table)
        fks = catalog.execution_id_foreign_keys(
            cur, db.schema_name, db.weeks_table, db.executions_table
        )
        member_fks = member_foreign_keys(cur, layout, db) if layout and executions_exists else ()
    return SchemaReport(
        layout is not None, weeks_columns, executions_exists, fks, layout, member_fks
    )


def is_null_default(default: str | None) -> bool:
    return default is None or re.fullmatch(r"NULL(::[\w .\"]+)?", default.strip(), re.I) is not None


def column_contract_violations(column: catalog.Column | None, where: str) -> list[str]:
    """Each way `execution_id` differs from the contract, as a sentence naming it."""
    if column is None:
        return [f"{where} is missing; add it with ALTER TABLE ... ADD COLUMN execution_id uuid"]
    violations = []
    if column.data_type != "uuid":
        violations.append(f"{where} is {column.data_type}, expected uuid")
    if not column.is_nullable:
        violations.append(f"{where} is NOT NULL, expected nullable (legacy rows have no id)")
    if not is_null_default(column.column_default):
        violations.append(f"{where} has default {column.column_default}, expected NULL")
    return violations


def add_constraint_ddl(
    db: TargetDatabase,
    table: sql.Composable,
    on_delete: str = "NO ACTION",
    name: str = FK_NAME,
    not_valid: bool = True,
) -> sql.Composed:
    """`ALTER TABLE table ADD CONSTRAINT name FOREIGN KEY (execution_id) ...`."""
    if on_delete not in ON_DELETE_ACTIONS:
        raise ValueError(f"on_delete must be one of {', '.join(ON_DELETE_ACTIONS)}")
    return sql.SQL(
        "ALTER TABLE {table} ADD CONSTRAINT {fk} FOREIGN KEY (execution_id) "
        "REFERENCES {executions} (id) ON DELETE {action}{not_valid}"
    ).format(
        table=table,
        fk=sql.Identifier(name),
        executions=db.executions,
        action=sql.SQL(on_delete),
        not_valid=sql.SQL(" NOT VALID" if not_valid else ""),
    )


def validate_ddl(table: sql.Composable, name: str = FK_NAME) -> sql.Composed:
    return sql.SQL("ALTER TABLE {table} VALIDATE CONSTRAINT {fk}").format(
        table=table, fk=sql.Identifier(name)
    )


def foreign_key_ddl(
    db: TargetDatabase,
    on_delete: str = "NO ACTION",
    name: str = FK_NAME,
    table: sql.Composable | None = None,
) -> list[sql.Composed]:
    """The safe way to add the FK: `NOT VALID` (brief lock), then `VALIDATE` on its own."""
    table = table if table is not None else db.weeks
    return [add_constraint_ddl(db, table, on_delete, name), validate_ddl(table, name)]


def partitioned_foreign_key_ddl(
    db: TargetDatabase, layout: Layout, on_delete: str = "NO ACTION", name: str = FK_NAME
) -> list[sql.Composed]:
    """The safe way on a partitioned table, on every PostgreSQL version (before 18 a
    partitioned table takes no `NOT VALID` foreign key): each partition holding rows gets
    the constraint `NOT VALID` and validates it; the parent's own `ADD CONSTRAINT` then
    finds those validated equivalents and takes them over without scanning again."""
    steps: list[sql.Composed] = []
    for leaf in layout.leaves:
        steps += foreign_key_ddl(db, on_delete, name, leaf.ident)
    return [*steps, add_constraint_ddl(db, db.weeks, on_delete, name, not_valid=False)]


def foreign_key_status(report: SchemaReport, db: TargetDatabase) -> tuple[bool, str]:
    """(passed, one sentence saying which case it is)."""
    weeks = db.qualified(db.weeks_table, "execution_id")
    executions = db.qualified(db.executions_table)
    if not report.executions_exists:
        return False, f"FK constraint not possible: table {executions} does not exist"
    layout = report.layout
    if layout is not None and layout.kind not in ("ordinary", "partitioned", "inheritance"):
        return False, (
            f"{layout.label} is a {layout.kind}: it cannot carry a foreign key; add it to "
            "the table that holds the rows and point target_db.weeks_table at that table"
        )
    if layout is not None and layout.kind == "inheritance":
        lacking = report.without_validated_foreign_key()
        if not lacking:
            return True, (
                f"validated foreign key from execution_id to {executions}(id) on each of the "
                f"{len(layout.leaves)} tables of inheritance parent {layout.label}"
            )
        return False, (
            f"foreign keys are not inherited by child tables, and {len(lacking)} table(s) of "
            f"inheritance parent {layout.label} have no validated foreign key from "
            f"execution_id to {executions}(id): {', '.join(m.label for m in lacking)}; "
            "add one to each (the DDL in metadata)"
        )
    fk = report.foreign_key
    if fk is None:
        return (
            False,
            f"no foreign key from {weeks} to {executions}(id); add one with the DDL in metadata",
        )
    if not fk.validated:
        return False, (
            f"foreign key {fk.name} from {weeks} to {executions}(id) is NOT VALID; "
            "run the VALIDATE CONSTRAINT statement in metadata"
        )
    return True, f"validated foreign key {fk.name} from {weeks} to {executions}(id)"
