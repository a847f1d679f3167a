"""The spec's tables, written by the collection system: external assets in the graph."""

import warnings

import dagster as dg
from psycopg import sql

from rdw_tracking.assets import GROUP
from rdw_tracking.resources import TargetDatabase


def table_metadata(name: str) -> dict:
    # The default target_db schema; an observation records the configured one.
    return {"dagster/table_name": f"public.{name}"}


report_data_weeks = dg.AssetSpec(
    "report_data_weeks",
    group_name=GROUP,
    kinds={"postgres"},
    metadata=table_metadata("report_data_weeks"),
    description=(
        "One row per collection week, written by the reporting system. Its nullable "
        "`execution_id` says which `workflow_executions` row produced it."
    ),
)
workflow_executions = dg.AssetSpec(
    "workflow_executions",
    group_name=GROUP,
    kinds={"postgres"},
    metadata=table_metadata("workflow_executions"),
    description="One row per workflow (collection) run: status, created_at, completed_at.",
)
report_data_collections = dg.AssetSpec(
    "report_data_collections",
    group_name=GROUP,
    kinds={"postgres"},
    metadata=table_metadata("report_data_collections"),
    description="The report data collections; each owns many `report_data_weeks` rows.",
)


def observe_tables(target_db: TargetDatabase):
    """One `count(*)` per table (a full scan: run it when that is cheap, e.g. weekly);
    records `dagster/row_count` and the configured `dagster/table_name` on each."""
    names = {
        "report_data_weeks": target_db.weeks_table,
        "workflow_executions": target_db.executions_table,
        "report_data_collections": target_db.collections_table,
    }
    database = target_db.endpoint().database
    for key, table in names.items():
        (rows,) = target_db.fetch_one(
            sql.SQL("SELECT count(*) FROM {}").format(target_db.table(table))
        )
        yield dg.ObserveResult(
            asset_key=key,
            metadata={
                "dagster/row_count": int(rows),
                "dagster/table_name": f"{database}.{target_db.qualified(table)}",
            },
        )


with warnings.catch_warnings():
    # Beta in Dagster 1.13 and chosen knowingly: not a warning on every load of the code.
    warnings.simplefilter("ignore", dg.BetaWarning)
    observe_tables = dg.multi_observable_source_asset(
        specs=[report_data_weeks, workflow_executions, report_data_collections],
        name="observe_tables",
        description="Counts the rows of the three tables: `dagster/row_count` on each.",
    )(observe_tables)

external_tables = [observe_tables]
