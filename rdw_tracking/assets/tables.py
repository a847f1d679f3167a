"""The spec's tables, written by the collection system: external assets in the graph."""

import dagster as dg

from rdw_tracking.assets import GROUP

report_data_weeks = dg.AssetSpec(
    "report_data_weeks",
    group_name=GROUP,
    kinds={"postgres"},
    description=(
        "One row per collection week, written by the reporting system. Its nullable "
        "`execution_id` says which `workflow_executions` row produced it."
    ),
)
workflow_executions = dg.AssetSpec(
    "workflow_executions",
    group_name=GROUP,
    kinds={"postgres"},
    description="One row per workflow (collection) run: status, created_at, completed_at.",
)
report_data_collections = dg.AssetSpec(
    "report_data_collections",
    group_name=GROUP,
    kinds={"postgres"},
    description="The report data collections; each owns many `report_data_weeks` rows.",
)

external_tables = [report_data_weeks, workflow_executions, report_data_collections]
