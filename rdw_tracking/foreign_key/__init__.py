"""Adding the foreign key `report_data_weeks.execution_id` → `workflow_executions(id)` online,
as plain functions over a `TargetDatabase` (no Dagster here).

A plain `ADD CONSTRAINT ... FOREIGN KEY` scans every row under a SHARE ROW EXCLUSIVE lock:
no insert, update or delete of the table gets through until the scan ends. So the
constraint is added in two steps, each its own transaction:

- **NOT VALID, then VALIDATE.** `ADD CONSTRAINT ... NOT VALID` takes that lock only
  briefly (no scan, capped by `lock_timeout_ms`) and from then on checks every new write;
  `VALIDATE CONSTRAINT` then scans the old rows under SHARE UPDATE EXCLUSIVE, which
  writers do not wait for.
- **The index first.** Without the single-column index on `execution_id`, every delete
  from `workflow_executions` would scan `report_data_weeks` to check the constraint; the
  job builds it (concurrently) before adding the constraint.
- **Orphans refused.** While any `execution_id` has no `workflow_executions` row, the
  `VALIDATE` could only fail: the job refuses before it changes anything.

Each layout is routed so that no statement scans rows under a lock that blocks writers:

- *Ordinary table*: NOT VALID, then VALIDATE.
- *Partitioned, PostgreSQL 18+*: the parent's `ADD CONSTRAINT ... NOT VALID` (brief SHARE
  ROW EXCLUSIVE on the parent, every partition and `workflow_executions`, no scan), then
  `VALIDATE CONSTRAINT` partition by partition, each its own transaction holding SHARE
  UPDATE EXCLUSIVE on that partition only, and last the parent's `VALIDATE` (catalog only).
- *Partitioned, before 18*: a partitioned table takes no `NOT VALID` foreign key. Each
  partition holding rows gets its own constraint `NOT VALID` and validates it, as a plain
  table; then the parent's plain `ADD CONSTRAINT` finds those validated equivalents and
  takes them over without scanning (brief SHARE ROW EXCLUSIVE on the whole tree, and
  ACCESS EXCLUSIVE on `workflow_executions` while it drops the partitions' now-redundant
  action triggers).
- *Inheritance parent*: refused: foreign keys are not inherited by child tables.

Either way an interrupted run resumes: the plan is read from the catalog, so the next run
skips what is already validated.

The modules, in the order a run meets them:

- `rdw_tracking.contract` (below this package): the schema report the plan is read from.
- `preflight`: what is refused before anything changes.
- `plan`: the route for the layout and the steps left on it.
- `apply`: running the steps to the end, failures told as refusals.
- `steps`: each step's statement, run with the index builds' lock waits and retries.

The Dagster face (run config, the `add_foreign_key` op) is `rdw_tracking.assets.foreign_key`.
"""

# The job, as the messages name it (rdw_tracking.jobs defines it).
FOREIGN_KEY_JOB = "add_execution_id_foreign_key"
