"""`make demo`: the pipeline end to end on the embedded database, with a summary table.

Runs go through the Dagster instance of DAGSTER_HOME, so everything the demo does is
visible afterwards in `make ui`.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from rdw_tracking import demo
from rdw_tracking.resources import TargetDatabase

# Figures worth a glance per asset, in the order they are printed.
KEY_FIGURES = {
    "execution_id_schema": ["data_type", "is_nullable", "column_default", "fk_constraint"],
    "execution_id_indexes": ["created", "rebuilt", "unchanged", "index_bytes"],
    "execution_id_population": [
        "total_rows",
        "population_pct",
        "recent_total_rows",
        "recent_population_pct",
    ],
    "execution_id_join_plan": ["execution_ms", "uses_index", "index_names"],
    "execution_id_storage": ["total_bytes", "index_bytes", "execution_id_bytes"],
    "execution_id_rollback": ["dry_run", "matched_rows", "cleared_rows", "rollback_id"],
}


def ensure_demo_data(rows: int, rebuild: bool = False) -> None:
    db = TargetDatabase()
    with db.connect() as conn:
        present = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", [f"{db.schema_name}.{db.weeks_table}"]
        ).fetchone()[0]
    if rebuild or not present:
        summary = demo.build(db.resolved_url(), demo.DemoShape(rows=rows))
        print(
            f"demo data: {summary['rows']:,} report_data_weeks rows "
            f"({summary['with_execution_id']:,} with execution_id), "
            f"{summary['workflow_executions']:,} workflow_executions, "
            f"{summary['collections']:,} collections in {summary['seconds']} s"
        )


def _value(entry: Any) -> Any:
    return getattr(entry, "value", entry)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def summarize(result: dg.ExecuteInProcessResult) -> list[str]:
    """Lines of the summary table for one job run: figures per asset, then each check."""
    lines = []
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        name = materialization.asset_key.to_user_string()
        figures = [
            f"{key}={_short(_value(materialization.metadata[key]))}"
            for key in KEY_FIGURES.get(name, [])
            if key in materialization.metadata
        ]
        lines.append(f"  {name:<28} {', '.join(figures)}")
    for evaluation in result.get_asset_check_evaluations():
        verdict = "PASS" if evaluation.passed else f"FAIL ({evaluation.severity.value})"
        lines.append(
            f"  check {evaluation.check_name:<38} {verdict:<13} {evaluation.description or ''}"
        )
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            error = event.event_specific_data.error
            lines.append(
                f"  step {event.step_key} failed: {error.message.strip() if error else ''}"
            )
    return lines


def run_job(
    instance: dg.DagsterInstance, name: str, run_config: dict | None = None
) -> dg.ExecuteInProcessResult:
    from rdw_tracking.definitions import defs

    job = defs.resolve_job_def(name)
    # Dagster's step-by-step DEBUG lines would drown the summary; the UI has them all.
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    result = job.execute_in_process(
        instance=instance, run_config={**quiet, **(run_config or {})}, raise_on_error=False
    )
    print(f"\n{name}: {'succeeded' if result.success else 'FAILED'} (run {result.run_id[:8]})")
    print("\n".join(summarize(result)))
    return result


def run(rows: int = 20_000) -> int:
    ensure_demo_data(rows, rebuild=True)
    instance = (
        dg.DagsterInstance.get()
        if os.environ.get("DAGSTER_HOME")
        else dg.DagsterInstance.ephemeral()
    )
    results = [run_job(instance, "create_execution_id_indexes")]
    results.append(run_job(instance, "verify_execution_tracking"))
    results.append(run_job(instance, "post_collection_validation"))
    failed = [r.dagster_run.job_name for r in results if not r.success]
    if failed:
        print(f"\nfailed jobs: {', '.join(failed)}")
        return 1
    print("\nEverything above is in the Dagster UI: make ui")
    return 0
