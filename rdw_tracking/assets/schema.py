"""Schema verification: `execution_id` exists, is `uuid`, nullable, default NULL, and
whether a validated foreign key ties it to `workflow_executions(id)`."""

from __future__ import annotations

import re
from dataclasses import dataclass

import dagster as dg
from psycopg import sql

from rdw_tracking import catalog
from rdw_tracking.assets import GROUP, READ_RETRY, refuse
from rdw_tracking.assets.tables import report_data_weeks, workflow_executions
from rdw_tracking.resources import TargetDatabase

FK_NAME = "fk_report_data_weeks_execution_id"
ON_DELETE_ACTIONS = ("NO ACTION", "RESTRICT", "CASCADE", "SET NULL")


@dataclass(frozen=True)
class SchemaReport:
    weeks_exists: bool
    columns: list[catalog.Column]
    executions_exists: bool
    foreign_keys: list[catalog.ForeignKey]

    @property
    def execution_id(self) -> catalog.Column | None:
        return next((c for c in self.columns if c.name == "execution_id"), None)

    @property
    def foreign_key(self) -> catalog.ForeignKey | None:
        return self.foreign_keys[0] if self.foreign_keys else None


def inspect_schema(db: TargetDatabase) -> SchemaReport:
    with db.cursor() as cur:
        weeks_columns = catalog.columns(cur, db.schema_name, db.weeks_table)
        executions_exists = catalog.table_exists(cur, db.schema_name, db.executions_table)
        fks = catalog.execution_id_foreign_keys(
            cur, db.schema_name, db.weeks_table, db.executions_table
        )
        weeks_exists = bool(weeks_columns) or catalog.table_exists(
            cur, db.schema_name, db.weeks_table
        )
    return SchemaReport(weeks_exists, weeks_columns, executions_exists, fks)


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


def foreign_key_ddl(
    db: TargetDatabase, on_delete: str = "NO ACTION", name: str = FK_NAME
) -> list[sql.Composed]:
    """The safe way to add the FK: `NOT VALID` (brief lock), then `VALIDATE` on its own."""
    if on_delete not in ON_DELETE_ACTIONS:
        raise ValueError(f"on_delete must be one of {', '.join(ON_DELETE_ACTIONS)}")
    add = sql.SQL(
        "ALTER TABLE {weeks} ADD CONSTRAINT {fk} FOREIGN KEY (execution_id) "
        "REFERENCES {executions} (id) ON DELETE {action} NOT VALID"
    ).format(
        weeks=db.weeks,
        fk=sql.Identifier(name),
        executions=db.executions,
        action=sql.SQL(on_delete),
    )
    validate = sql.SQL("ALTER TABLE {weeks} VALIDATE CONSTRAINT {fk}").format(
        weeks=db.weeks, fk=sql.Identifier(name)
    )
    return [add, validate]


def foreign_key_status(report: SchemaReport, db: TargetDatabase) -> tuple[bool, str]:
    """(passed, one sentence saying which case it is)."""
    weeks = db.qualified(db.weeks_table, "execution_id")
    executions = db.qualified(db.executions_table)
    if not report.executions_exists:
        return False, f"FK constraint not possible: table {executions} does not exist"
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


def column_schema(columns: list[catalog.Column]) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=c.name,
                type=c.data_type,
                constraints=dg.TableColumnConstraints(
                    nullable=c.is_nullable,
                    other=[f"default {c.column_default}"] if c.column_default else [],
                ),
            )
            for c in columns
        ]
    )


@dg.asset(
    key="execution_id_schema",
    group_name=GROUP,
    deps=[report_data_weeks, workflow_executions],
    kinds={"postgres"},
    retry_policy=READ_RETRY,
)
def execution_id_schema(target_db: TargetDatabase) -> dg.MaterializeResult:
    """Schema verification of `report_data_weeks.execution_id`.

    Reads the catalog of the configured schema only (a same-named table elsewhere is
    ignored) and records the column's type, nullability and default, whether
    `workflow_executions` exists, and whether a validated foreign key links the two.
    The checks below judge the result: the column contract blocks everything
    downstream; a missing foreign key is a warning with the safe DDL to add one.
    """
    report = inspect_schema(target_db)
    weeks = target_db.qualified(target_db.weeks_table)
    if not report.weeks_exists:
        raise refuse(f"table {weeks} does not exist; check target_db.schema_name and weeks_table")
    column = report.execution_id
    if column is None:
        raise refuse(
            f"{weeks}.execution_id does not exist; add it with "
            f"ALTER TABLE {weeks} ADD COLUMN execution_id uuid"
        )
    fk = report.foreign_key
    return dg.MaterializeResult(
        metadata={
            "data_type": column.data_type,
            "is_nullable": column.is_nullable,
            "column_default": column.column_default,
            "fk_constraint": fk.name if fk else None,
            "fk_validated": bool(fk and fk.validated),
            "workflow_executions_exists": report.executions_exists,
            "dagster/column_schema": column_schema(report.columns),
            "dagster/table_name": f"{target_db.endpoint().database}.{weeks}",
        }
    )


@dg.asset_check(
    asset="execution_id_schema",
    name="execution_id_column_contract",
    blocking=True,
    retry_policy=READ_RETRY,
)
def execution_id_column_contract(target_db: TargetDatabase) -> dg.AssetCheckResult:
    """`execution_id` is `uuid`, nullable and defaults to NULL; anything else blocks downstream."""
    column = inspect_schema(target_db).execution_id
    where = target_db.qualified(target_db.weeks_table, "execution_id")
    violations = column_contract_violations(column, where)
    return dg.AssetCheckResult(
        passed=not violations,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(violations) or f"{where} is uuid, nullable, default NULL",
        metadata={
            "violations": violations,
            "violation_count": len(violations),
            "data_type": column.data_type if column else None,
            "is_nullable": column.is_nullable if column else None,
            "column_default": column.column_default if column else None,
        },
    )


@dg.asset_check(
    asset="execution_id_schema", name="execution_id_foreign_key", retry_policy=READ_RETRY
)
def execution_id_foreign_key(target_db: TargetDatabase) -> dg.AssetCheckResult:
    """A validated FK from `execution_id` to `workflow_executions(id)`; if not, the safe DDL.

    Add it with the `add_execution_id_foreign_key` job, or by hand: `ADD CONSTRAINT ...
    NOT VALID` takes only a brief lock, then `VALIDATE CONSTRAINT` in its own transaction
    scans the table without blocking writers.
    """
    report = inspect_schema(target_db)
    passed, description = foreign_key_status(report, target_db)
    metadata: dict = {
        "workflow_executions_exists": report.executions_exists,
        "fk_constraint": report.foreign_key.name if report.foreign_key else None,
        "fk_validated": bool(report.foreign_key and report.foreign_key.validated),
    }
    if not passed and report.executions_exists:
        fk = report.foreign_key
        add, validate = foreign_key_ddl(target_db, name=fk.name if fk else FK_NAME)
        steps = [validate] if fk else [add, validate]  # a NOT VALID FK needs only VALIDATE
        ddl = [step.as_string(None) + ";" for step in steps]
        metadata["safe_ddl"] = dg.MetadataValue.md(
            "Run each statement in its own transaction:\n\n```sql\n" + "\n".join(ddl) + "\n```"
        )
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata=metadata,
    )


schema_assets = [execution_id_schema]
schema_checks = [execution_id_column_contract, execution_id_foreign_key]
