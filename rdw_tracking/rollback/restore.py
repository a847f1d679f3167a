"""Restore: put back the `execution_id` values a rollback cleared, from its backup.

Only rows whose `execution_id` is still NULL get their value back: a value written since
the rollback is never overwritten. `updated_at` goes back to its backed-up value where it
still holds the value the rollback wrote (kept as `cleared_at` in the backup), so
rollback + restore gives back the table exactly; a row written since keeps its newer
`updated_at`. Batched like the rollback, in backup order, one short transaction each.
"""

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row

from rdw_tracking import catalog
from rdw_tracking.errors import refuse
from rdw_tracking.resources import TargetDatabase, long_statements
from rdw_tracking.rollback import RESTORE_APPLICATION_NAME, RESTORE_JOB
from rdw_tracking.rollback.backup import BackupTables, analyze_backup
from rdw_tracking.rollback.batches import batch_connection, in_one_transaction, refuse_if_lost
from rdw_tracking.rollback.pace import (
    DEFAULT_MAX_REPLICA_LAG_S,
    FIRST_BATCH_ROWS,
    WAL_BUDGET_SHARE,
    LastBatch,
    ReplicaLag,
    batch_rows,
    wait_for_wal_room,
    wal_buffers_bytes,
)
from rdw_tracking.rollback.preflight import check_restore, update_triggers
from rdw_tracking.rollback.progress import Log, Progress
from rdw_tracking.rollback.state import RollbackState, find_rollback, set_phase


@dataclass(frozen=True)
class RestoreRequest:
    """What one restore run is asked to do (the asset's RestoreConfig, validated)."""

    tables: BackupTables
    rollback_id: str | None
    batch_size: int
    dry_run: bool = True
    visible_rows_only: bool = False
    max_replica_lag_s: float = DEFAULT_MAX_REPLICA_LAG_S


# Where a backed-up row lives now. It is the row with the backed-up id in the physical
# table (partition, child) it was cleared in; failing that, the one row with that id
# anywhere in the tree: a partition manager moves rows between partitions (delete and
# insert, same id) and they are still the same rows. Ids need not be unique across an
# inherited table, so an id found in several other tables and not in its own is left
# alone (ambiguous), never guessed. The counting subqueries see the table as it was
# before the statement: rows already holding the backed-up value were restored by an
# earlier (interrupted) restore; any other non-NULL value was written since.
# A batch's ids, spelled out, keep the lookup on each table's primary key index; the
# dry run over the whole backup joins instead.
BY_BATCH_IDS = "WHERE w.id = ANY(ARRAY(SELECT id FROM batch))"
FOUND = """
found AS MATERIALIZED (
    SELECT b.seq, w.tableoid AS leaf, w.execution_id AS current,
           w.tableoid = b.relid AS home, count(*) OVER (PARTITION BY b.seq) AS copies
    FROM batch b JOIN {{weeks}} w ON w.id = b.id
    {by_ids}
), chosen AS MATERIALIZED (
    SELECT DISTINCT ON (seq) seq, leaf, current, home FROM found
    WHERE home IS TRUE OR copies = 1
    ORDER BY seq, home IS TRUE DESC
)"""
RESTORE_BATCH = f"""
WITH batch AS MATERIALIZED (
    SELECT seq, id, relid, execution_id, updated_at, cleared_at FROM {{backup}}
    WHERE rollback_id = %(rid)s AND seq > %(after)s
    ORDER BY seq LIMIT %(limit)s
), {FOUND.format(by_ids=BY_BATCH_IDS)}, restored AS (
    UPDATE {{weeks}} w
    SET execution_id = b.execution_id,
        updated_at = CASE WHEN w.updated_at IS NOT DISTINCT FROM b.cleared_at
                          THEN b.updated_at ELSE w.updated_at END
    FROM chosen c JOIN batch b ON b.seq = c.seq
    WHERE w.id = ANY(ARRAY(SELECT b.id FROM batch b JOIN chosen c ON c.seq = b.seq))
      AND w.id = b.id AND w.tableoid = c.leaf AND w.execution_id IS NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM batch) AS size,
       (SELECT count(*) FROM restored) AS restored,
       (SELECT count(*) FROM chosen) AS found,
       (SELECT count(*) FROM chosen c JOIN batch b ON b.seq = c.seq
        WHERE c.current = b.execution_id) AS already,
       (SELECT count(DISTINCT seq) FROM found) - (SELECT count(*) FROM chosen) AS ambiguous,
       (SELECT count(*) FROM chosen WHERE NOT home) AS moved,
       (SELECT max(seq) FROM batch) AS last_seq
"""
RESTORE_PREVIEW = f"""
WITH batch AS MATERIALIZED (
    SELECT seq, id, relid, execution_id FROM {{backup}} WHERE rollback_id = %(rid)s
), {FOUND.format(by_ids="")}
SELECT (SELECT count(*) FROM batch) AS total,
       (SELECT count(*) FROM chosen) AS found,
       (SELECT count(*) FROM chosen WHERE current IS NULL) AS nulls,
       (SELECT count(*) FROM chosen c JOIN batch b ON b.seq = c.seq
        WHERE c.current = b.execution_id) AS already,
       (SELECT count(DISTINCT seq) FROM found) - (SELECT count(*) FROM chosen) AS ambiguous,
       (SELECT count(*) FROM chosen WHERE NOT home) AS moved
"""
RECORD_RESTORED = (
    "UPDATE {state} SET restored_rows = restored_rows + %s, restored_at = now() "
    "WHERE rollback_id = %s"
)


@dataclass
class RestoreReport:
    dry_run: bool
    rollback_id: str
    cutoff: dt.date
    backed_up_rows: int = 0
    restored_rows: int = 0
    skipped_rows: int = 0
    already_restored_rows: int = 0
    missing_rows: int = 0
    moved_rows: int = 0
    ambiguous_rows: int = 0
    update_triggers: list[str] = field(default_factory=list)
    replica_paused_s: float = 0.0
    batches: int = 0
    longest_batch_ms: float = 0.0
    seconds: float = 0.0

    def count(
        self, size: int, restored: int, found: int, already: int, ambiguous: int, moved: int
    ) -> None:
        self.restored_rows += restored
        self.already_restored_rows += already
        self.missing_rows += size - found - ambiguous
        self.ambiguous_rows += ambiguous
        self.moved_rows += moved
        self.skipped_rows += found - restored - already

    def metadata(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "rollback_id": self.rollback_id,
            "cutoff_date": self.cutoff.isoformat(),
            "backed_up_rows": self.backed_up_rows,
            "restored_rows": self.restored_rows,
            "skipped_rows": self.skipped_rows,
            "already_restored_rows": self.already_restored_rows,
            "missing_rows": self.missing_rows,
            "moved_rows": self.moved_rows,
            "ambiguous_rows": self.ambiguous_rows,
            "update_triggers": ", ".join(self.update_triggers),
            "replica_paused_s": round(self.replica_paused_s, 1),
            "batches": self.batches,
            "longest_batch_ms": round(self.longest_batch_ms, 1),
            "seconds": round(self.seconds, 2),
        }


def restore(db: TargetDatabase, request: RestoreRequest, log: Log) -> RestoreReport:
    """Dry run or real run of the restore; the asset's whole job, callable without Dagster."""
    started = time.monotonic()
    tables = request.tables
    # Before the first change; a dry run needs only to read.
    layout = check_restore(db, tables, request.dry_run, log, request.visible_rows_only)
    triggers = update_triggers(db, layout, RESTORE_JOB, log)
    with batch_connection(db, RESTORE_APPLICATION_NAME, db.lock_timeout_ms, RESTORE_JOB) as conn:
        state = rollback_to_restore(conn, db, tables, request.rollback_id)
        report = RestoreReport(request.dry_run, state.rollback_id, state.cutoff)
        report.update_triggers = triggers
        if request.dry_run:
            preview(conn, db, tables, report)
            report.seconds = time.monotonic() - started
            return report
        with long_statements(conn, db.statement_timeout_ms):
            report.backed_up_rows = begin(conn, tables, state, log)
            analyze_backup(conn, tables, log)
        lost = (
            f"the connection to {db.describe()} was lost while restoring rollback "
            f"{state.rollback_id} of {db.qualified(db.weeks_table)}; every finished batch "
            f"is committed: run {RESTORE_JOB} again with rollback_id {state.rollback_id} to "
            "continue"
        )
        with refuse_if_lost(conn, lost):
            put_back(conn, db, request, state, report, log)
    report.seconds = time.monotonic() - started
    log.info(
        f"restored execution_id on {report.restored_rows:,} of {report.backed_up_rows:,} rows "
        f"of {db.qualified(db.weeks_table)} from rollback {state.rollback_id}; skipped "
        f"{report.skipped_rows:,} written since, {report.already_restored_rows:,} already "
        f"restored, {report.missing_rows:,} gone"
        + (f", {report.moved_rows:,} found in another partition" if report.moved_rows else "")
    )
    if report.ambiguous_rows:
        log.warning(
            f"{report.ambiguous_rows:,} backed-up rows of rollback {state.rollback_id} are no "
            f"longer in the table they were cleared in and their id is in several tables "
            f"of {db.qualified(db.weeks_table)}; they were left as they are: restore them "
            f"by hand from {tables.label(tables.backup_name)}"
        )
    return report


def rollback_to_restore(
    conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables, rollback_id: str | None
) -> RollbackState:
    """The rollback `rollback_id` (default: the latest); refuses when none is recorded."""
    state = find_rollback(conn, db, tables, rollback_id)
    if state is None:
        which = f"rollback {rollback_id} is not" if rollback_id else "no rollback is"
        raise refuse(
            f"{which} recorded for {db.qualified(db.weeks_table)} in "
            f"{tables.label(tables.state_name)}; check rollback_id (it is in the rollback's "
            "metadata) and backup_schema, backup_table and state_table"
        )
    return state


def preview(
    conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables, report: RestoreReport
) -> None:
    """The dry run: count what a real restore would do, changing nothing."""
    with (
        long_statements(conn, db.statement_timeout_ms),
        conn.cursor(row_factory=namedtuple_row) as by_name,
    ):
        counts = by_name.execute(
            sql.SQL(RESTORE_PREVIEW).format(backup=tables.backup, weeks=db.weeks),
            {"rid": report.rollback_id},
        ).fetchone()
    report.backed_up_rows = counts.total
    report.count(
        counts.total, counts.nulls, counts.found, counts.already, counts.ambiguous, counts.moved
    )


def begin(conn: psycopg.Connection, tables: BackupTables, state: RollbackState, log: Log) -> int:
    """Take the rollback out of the resumable phases; the number of rows backed up."""
    if state.phase in ("walking", "sweeping"):
        log.warning(
            f"rollback {state.rollback_id} stopped before finishing; restoring what it "
            "cleared closes it, and the next rollback run starts afresh"
        )
    # Out of the resumable phases first, so no rollback run continues it meanwhile.
    set_phase(conn, tables, state.rollback_id, "restoring")
    return conn.execute(
        sql.SQL("SELECT count(*) FROM {backup} WHERE rollback_id = %s").format(
            backup=tables.backup
        ),
        [state.rollback_id],
    ).fetchone()[0]


def put_back(
    conn: psycopg.Connection,
    db: TargetDatabase,
    request: RestoreRequest,
    state: RollbackState,
    report: RestoreReport,
    log: Log,
) -> None:
    """The backup of rollback `state`, batch by batch in backup order, put back into the
    table; counted in `report`, and the rollback marked restored.

    Paced like the rollback's walk: each batch aims at BATCH_TARGET_MS and the WAL
    budget, starts once the server has WAL room for it and no standby lags more than
    max_replica_lag_s. Its plan stays the one made for its own values: psycopg would
    prepare the statement after a few runs, and PostgreSQL then switch to a generic plan
    (a nested loop discarding ~25M rows per 5,000-row batch, 3.5-5.8 s instead of
    139 ms), so the statement is never prepared and the session forces custom plans."""
    tables = request.tables
    statement = sql.SQL(RESTORE_BATCH).format(backup=tables.backup, weeks=db.weeks)
    record = sql.SQL(RECORD_RESTORED).format(state=tables.state)
    what = f"restore of rollback {state.rollback_id}"
    progress = Progress(total=report.backed_up_rows)
    replicas = ReplicaLag(request.max_replica_lag_s, log, what)
    wal_buffers = wal_buffers_bytes(conn)
    wal_budget = int(wal_buffers * WAL_BUDGET_SHARE) if wal_buffers else None
    conn.prepare_threshold = None
    conn.execute("SELECT set_config('plan_cache_mode', 'force_custom_plan', false)")
    size = min(request.batch_size, FIRST_BATCH_ROWS)
    mark = catalog.wal_lsn(conn)
    after = 0
    while True:

        def work(c: psycopg.Connection, after: int = after, size: int = size) -> Any:
            with c.cursor(row_factory=namedtuple_row) as cur:
                batch = cur.execute(
                    statement, {"rid": state.rollback_id, "after": after, "limit": size}
                ).fetchone()
            c.execute(record, [batch.restored, state.rollback_id])
            return batch

        replicas.wait(conn, mark)
        if wal_budget:
            wait_for_wal_room(conn, wal_buffers - wal_budget)
        batch, ms = in_one_transaction(conn, work, what, [db.weeks, tables.backup])
        if batch.size == 0:
            break
        start, mark = mark, catalog.wal_lsn(conn)
        size = batch_rows(
            size,
            LastBatch(batch.size, ms, catalog.wal_bytes(start, mark)),
            request.batch_size,
            wal_budget,
        )
        after = batch.last_seq
        report.count(
            batch.size, batch.restored, batch.found, batch.already, batch.ambiguous, batch.moved
        )
        progress.add(batch.size, ms)
        if progress.due():
            log.info(progress.line("went through"))
    set_phase(conn, tables, state.rollback_id, "restored")
    report.batches = progress.batches
    report.longest_batch_ms = progress.longest_ms
    report.replica_paused_s = replicas.paused_s
