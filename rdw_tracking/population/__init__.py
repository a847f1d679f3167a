"""The population snapshot of `report_data_weeks.execution_id`, as plain functions over a
`TargetDatabase` (no Dagster here).

The spec's data-quality queries (population count, the 7-day breakdown, the orphan
anti-join, a sample of the latest rows) become one snapshot: the overall and window
figures and the per-day table come from a single pass over the table, or, once the table
has its created_at index and a tally, from the tally plus the rows since it was taken.
The checks then judge that same snapshot instead of scanning again.

The modules:

- `model`: what a snapshot is made of (counts, days, orphans).
- `one_pass`: the snapshot from one scan of the table.
- `from_tally`: the snapshot from the per-day tally (`rdw_tracking.tally`).
- `samples`: the latest rows, found without sorting the table.
- `orphans`: execution_ids that name no workflow_executions row.

The asset, its run config and its checks are `rdw_tracking.assets.population`.
"""
