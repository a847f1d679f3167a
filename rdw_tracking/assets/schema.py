"""Schema verification: `execution_id` exists, is `uuid`, nullable, default NULL, how the
table is laid out, and whether a validated foreign key ties it to `workflow_executions(id)`."""

from __future__ import annotations

import dagster as dg
from psycopg import sql

from rdw_tracking import catalog
from rdw_tracking.assets import GROUP, READ_RETRY
from rdw_tracking.assets.metadata import metadata_table
from rdw_tracking.assets.tables import report_data_weeks, workflow_executions
from rdw_tracking.contract import (
    SchemaReport,
    column_contract_violations,
    foreign_key_ddl,
    foreign_key_status,
    inspect_schema,
    partitioned_foreign_key_ddl,
    validate_ddl,
)
from rdw_tracking.errors import refuse
from rdw_tracking.layout import KINDS, Layout
from rdw_tracking.resources import TargetDatabase


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


def layout_metadata(layout: Layout) -> dict:
    """What the table is: its kind, partitioning and the tables below it."""
    metadata: dict = {
        "layout": layout.kind,
        "layout_summary": layout.describe(),
        "partition_strategy": layout.strategy,
        "partition_key": layout.key,
        "partitions": len(layout.partitions),
        "leaf_tables": len(layout.leaves),
    }
    if layout.kind == "inheritance":
        metadata["children"] = ", ".join(m.label for m in layout.partitions)
    if layout.partitions:
        labels = {m.oid: m.label for m in layout.members}
        metadata["layout_members"] = metadata_table(
            {
                "table": "string",
                "kind": "string",
                "level": "int",
                "parent": "string",
                "bound": "string",
                "holds_rows": "bool",
            },  # fmt: skip
            (
                {
                    "table": m.label,
                    "kind": KINDS.get(m.relkind, m.relkind),
                    "level": m.level,
                    "parent": labels.get(m.parent_oid, ""),
                    "bound": m.bound or "",
                    "holds_rows": m.holds_rows,
                }
                for m in layout.members
            ),
        )
    return metadata


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
    It also reports the layout: an ordinary table, a partitioned one (strategy, key,
    every partition with its bound) or an inheritance parent (its children); a view or
    foreign table in that name is reported as such.
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
            **layout_metadata(report.layout),
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


def safe_steps(report: SchemaReport, db: TargetDatabase) -> list[sql.Composed]:
    """The statements that would make the foreign key check pass, each its own transaction."""
    layout, fk = report.layout, report.foreign_key
    if not report.executions_exists or layout is None:
        return []
    if layout.kind == "inheritance":  # one constraint per table: none is inherited
        return [
            step
            for member in report.without_validated_foreign_key()
            for step in foreign_key_ddl(db, table=member.ident)
        ]
    if layout.kind == "partitioned":
        if fk is not None:  # NOT VALID (PostgreSQL 18+): VALIDATE scans every partition
            return [validate_ddl(db.weeks, fk.name)]
        return partitioned_foreign_key_ddl(db, layout)
    if layout.kind != "ordinary":
        return []
    if fk is not None:  # a NOT VALID FK needs only VALIDATE
        return [validate_ddl(db.weeks, fk.name)]
    return foreign_key_ddl(db)


@dg.asset_check(
    asset="execution_id_schema", name="execution_id_foreign_key", retry_policy=READ_RETRY
)
def execution_id_foreign_key(target_db: TargetDatabase) -> dg.AssetCheckResult:
    """A validated FK from `execution_id` to `workflow_executions(id)`; if not, the safe DDL.

    Add it with the `add_execution_id_foreign_key` job, or by hand: `ADD CONSTRAINT ...
    NOT VALID` takes only a brief lock, then `VALIDATE CONSTRAINT` in its own transaction
    scans the table without blocking writers. On a partitioned table the parent's
    constraint counts (PostgreSQL gives every partition its copy). On an inheritance
    parent every table holding rows needs its own, as foreign keys are not inherited.
    """
    report = inspect_schema(target_db)
    passed, description = foreign_key_status(report, target_db)
    metadata: dict = {
        "workflow_executions_exists": report.executions_exists,
        "fk_constraint": report.foreign_key.name if report.foreign_key else None,
        "fk_validated": bool(report.foreign_key and report.foreign_key.validated),
    }
    steps = safe_steps(report, target_db) if not passed else []
    if steps:
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
SCHEMA_CHANGE_CHECK = "column_schema_change"


def schema_change(previous: dg.TableSchema, latest: dg.TableSchema) -> list[str]:
    """Columns added, removed or retyped between two `dagster/column_schema` values."""
    before = {c.name: c.type for c in previous.columns}
    after = {c.name: c.type for c in latest.columns}
    changes = [f"added {name} ({after[name]})" for name in after if name not in before]
    changes += [f"removed {name}" for name in before if name not in after]
    changes += [
        f"{name}: {before[name]} -> {after[name]}"
        for name in after
        if name in before and before[name] != after[name]
    ]
    return changes


@dg.asset_check(
    asset="execution_id_schema",
    name=SCHEMA_CHANGE_CHECK,
    retry_policy=READ_RETRY,
    description=(
        "No column of report_data_weeks added, removed or retyped since the previous "
        "materialization of execution_id_schema (WARN)."
    ),
)
# `context` unannotated: under postponed annotations Dagster cannot resolve the type.
def column_schema_change(context) -> dg.AssetCheckResult:
    """The `dagster/column_schema` of the two latest materializations, compared.

    What Dagster's `build_column_schema_change_checks` does, with the project's
    `READ_RETRY` (the factory's check takes no retry policy, and every step of
    `verify_execution_tracking` rides out a restart of PostgreSQL, which holds Dagster's
    event log too) and the changes listed in metadata.
    """
    records = context.instance.fetch_materializations(
        dg.AssetKey("execution_id_schema"), limit=2
    ).records
    schemas = [
        getattr(r.asset_materialization.metadata.get("dagster/column_schema"), "value", None)
        for r in records
    ]
    if len(schemas) < 2 or None in schemas:
        return dg.AssetCheckResult(
            passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            description="fewer than two materializations with a column schema: nothing to compare",
        )
    latest, previous = schemas
    changes = schema_change(previous, latest)
    return dg.AssetCheckResult(
        passed=not changes,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            "columns of report_data_weeks changed since the previous materialization: "
            + "; ".join(changes)
            if changes
            else "no column added, removed or retyped since the previous materialization"
        ),
        metadata={"changes": changes, "change_count": len(changes)},
    )


schema_checks = [execution_id_column_contract, execution_id_foreign_key, column_schema_change]
