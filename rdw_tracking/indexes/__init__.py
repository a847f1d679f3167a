"""The spec's "Index Considerations" as plain functions over a `TargetDatabase`: the two
partial indexes on `execution_id`, built online on a table that keeps taking writes.

- **CONCURRENTLY.** A plain `CREATE INDEX` holds a SHARE lock for the whole build, so
  every insert and update waits until it ends. `CREATE INDEX CONCURRENTLY` takes only
  SHARE UPDATE EXCLUSIVE: writers keep going, and only other DDL, VACUUM and ANALYZE of
  the table wait. PostgreSQL refuses it on a partitioned table, so there the parent's
  index is created `ON ONLY` (catalog only) and each partition's is built concurrently
  and attached; an inheritance tree shares no index, so each table gets its own.
- **Lock waits.** Each statement waits for locks at most `lock_timeout_ms`, is not
  started while an idle transaction would stall it, and is retried with back-off; when
  it gives up it names the session in the way.
- **INVALID leftovers.** A failed or cancelled concurrent build leaves an INVALID index
  that PostgreSQL still maintains on every write but never reads. A leftover of the very
  index is dropped (`DROP INDEX CONCURRENTLY`, after checking by OID that it is still
  that index and no session is building it) and rebuilt; an index of the same name and
  another definition is the user's to resolve, and is never touched.

The modules, bottom first:

- `specs`: what an index should be (`IndexSpec`), the spec's two, the opt-in ones.
- `existing`: what an index is: the catalog lookup, and matching it to a spec.
- `connections`: the autocommit connections DDL runs on.
- `sessions`: who holds the lock: stuck and blocking sessions, `LockWait`.
- `watch`: one statement run while watched (progress, blockers), and lock retries.
- `table`: one index on one physical table.
- `partitioned`: a partitioned table's index, and an inheritance tree's.
- `online`: `build_index`, which picks the route for the table's layout.
- `preflight`: what is refused before anything is built.
- `problems`: how the indexes fall short, for the check.

The Dagster face (run config, the asset and its check) is `rdw_tracking.assets.indexes`.
"""
