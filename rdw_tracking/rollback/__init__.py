"""The rollback and its undo, as plain functions over a `TargetDatabase` (no Dagster here).

The spec's rollback is one `UPDATE ... SET execution_id = NULL, updated_at = NOW() WHERE
created_at >= cutoff`. On a busy table that statement holds row locks on every matched row
until it commits, so writers touching those rows stall for the whole run, and nothing
records what it overwrote. Here the same change is made safe, visible and undoable:

- **Fixed row set.** A run matches `execution_id IS NOT NULL AND created_at >= cutoff_date
  AND created_at < <run start>` (and `updated_at < <run start>`: a row a writer touched
  during the run is left alone). Rows written while it runs are never touched.
- **Batches.** Rows are cleared in short transactions of about `batch_size` rows, walked in
  physical (`ctid`) block ranges planned from one scan at the start — measured 1.6x faster
  than keyset batches over a random UUID key. Each batch runs under `lock_timeout` and is
  retried after a lock timeout or deadlock.
- **Backup.** In the same transaction, each row's `(id, execution_id, updated_at)` goes to
  a backup table tagged with the run's `rollback_id`; a row is cleared only once its backup
  row is written.
- **Resume.** The run's identity, its fixed upper bound and its position are kept in a
  small state table next to the backup and advanced in the batch's own transaction.
  Killed at any point, the next run with the same `cutoff_date` continues with the same
  `rollback_id` and bound, and ends with the same table and backup as an uninterrupted one.
- **Restore.** `restore_execution_id` puts the backed-up values back where `execution_id`
  is still NULL, never over a value written since.

The modules, in the order a run meets them:

- `preflight`: the table's layout and the rights a run needs, checked before any change.
- `backup`: the backup and state tables: their columns, creating them, trusting them.
- `state`: one rollback's row in the state table: identity, fixed bound, progress.
- `matched`: the matched set, its fixed bound, and the one scan that counts and plans it.
- `batches`: one short transaction per batch, retried after a lock timeout or deadlock.
- `pace`: each batch's size and start: the time aim, the WAL budget, the wait for WAL room.
- `walk`: the per-leaf block walk; `sweep`: the final sweep of rows the walk missed.
- `progress`: the counts a run logs every few seconds.
- `run`: the rollback itself, dry or real; `restore`: its undo.

The Dagster face (run config, assets) is `rdw_tracking.assets.rollback` and `.restore`.
"""

# The jobs, as the messages name them (rdw_tracking.jobs defines them).
ROLLBACK_JOB = "rollback_execution_id"
RESTORE_JOB = "restore_execution_id"
# The batch connections' application_name: find (or terminate) them in pg_stat_activity.
ROLLBACK_APPLICATION_NAME = "rdw_tracking:rollback_batches"
RESTORE_APPLICATION_NAME = "rdw_tracking:restore_batches"
