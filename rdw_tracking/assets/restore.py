"""Restore: put back the `execution_id` values a rollback cleared, from its backup.

Only rows whose `execution_id` is still NULL get their value back: a value written since
the rollback is never overwritten. `updated_at` goes back to its backed-up value where it
still holds the value the rollback wrote (kept as `cleared_at` in the backup), so
rollback + restore gives back the table exactly; a row written since keeps its newer
`updated_at`. Batched like the rollback, in backup order, one short transaction each.
"""

import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import dagster as dg
import psycopg
from psycopg import sql
from pydantic import Field, field_validator

from rdw_tracking.assets import GROUP, WRITE_POOL, refuse
from rdw_tracking.assets.rollback import (
    CLEARED_COLUMNS,
    RESTORE_JOB,
    BackupConfig,
    BackupTables,
    Progress,
    RollbackState,
    batch_connection,
    find_rollback,
    in_one_transaction,
    layout_or_refuse,
)
from rdw_tracking.assets.tables import report_data_weeks
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.writes import exclusive_write, refuse_without_grants, weeks_need

RESTORE_APPLICATION_NAME = "rdw_tracking:restore_batches"


class RestoreConfig(BackupConfig):
    rollback_id: str | None = Field(
        default=None, description="The rollback to undo; default: the latest one."
    )

    @field_validator("rollback_id")
    @classmethod
    def _rollback_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(uuid.UUID(value.strip()))
        except ValueError:
            raise ValueError(
                f"rollback_id {value!r} is not a UUID; copy it from the rollback's metadata"
            ) from None


def restore_needs(db: TargetDatabase, tables: BackupTables) -> list:
    """A real restore's rights: change the table back, read the backup, mark the state."""
    return [
        weeks_need(db, "SELECT", "UPDATE", update_columns=CLEARED_COLUMNS),
        *tables.needs(("SELECT",), ("SELECT", "UPDATE"), create=False),
    ]


# One batch of backup rows in backup order. A row is the one with the backed-up id in the
# physical table (partition, child) it was cleared in: ids need not be unique across a
# partitioned or inherited table. The counting subqueries see the table as it was before
# this statement: rows already holding the backed-up value were restored by an earlier
# (interrupted) restore; any other non-NULL value was written since.
SAME_ROW = "w.id = b.id AND (b.relid IS NULL OR w.tableoid = b.relid)"
RESTORE_BATCH = f"""
WITH batch AS MATERIALIZED (
    SELECT seq, id, relid, execution_id, updated_at, cleared_at FROM {{backup}}
    WHERE rollback_id = %(rid)s AND seq > %(after)s
    ORDER BY seq LIMIT %(limit)s
), restored AS (
    UPDATE {{weeks}} w
    SET execution_id = b.execution_id,
        updated_at = CASE WHEN w.updated_at IS NOT DISTINCT FROM b.cleared_at
                          THEN b.updated_at ELSE w.updated_at END
    FROM batch b
    WHERE w.id = ANY(ARRAY(SELECT id FROM batch)) AND {SAME_ROW} AND w.execution_id IS NULL
    RETURNING w.id
)
SELECT (SELECT count(*) FROM batch),
       (SELECT count(*) FROM restored),
       (SELECT count(*) FROM {{weeks}} w JOIN batch b ON {SAME_ROW}
        WHERE w.id = ANY(ARRAY(SELECT id FROM batch))),
       (SELECT count(*) FROM {{weeks}} w JOIN batch b ON {SAME_ROW}
        WHERE w.id = ANY(ARRAY(SELECT id FROM batch)) AND w.execution_id = b.execution_id),
       (SELECT max(seq) FROM batch)
"""
RESTORE_PREVIEW = f"""
SELECT count(*), count(w.id), count(*) FILTER (WHERE w.id IS NOT NULL AND w.execution_id IS NULL),
       count(*) FILTER (WHERE w.execution_id = b.execution_id)
FROM {{backup}} b LEFT JOIN {{weeks}} w ON {SAME_ROW}
WHERE b.rollback_id = %s
"""
SET_PHASE = "UPDATE {state} SET phase = %s WHERE rollback_id = %s"


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
    batches: int = 0
    longest_batch_ms: float = 0.0
    seconds: float = 0.0

    def count(self, size: int, restored: int, found: int, already: int) -> None:
        self.restored_rows += restored
        self.already_restored_rows += already
        self.missing_rows += size - found
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
            "batches": self.batches,
            "longest_batch_ms": round(self.longest_batch_ms, 1),
            "seconds": round(self.seconds, 2),
        }


def restore(db: TargetDatabase, config: RestoreConfig, log: logging.Logger | Any) -> RestoreReport:
    """Dry run or real run of the restore; the asset's whole job, callable without Dagster."""
    started = time.monotonic()
    tables = BackupTables.of(db, config)
    weeks = db.qualified(db.weeks_table)
    # Before the first change; a dry run needs only to read.
    reads = [weeks_need(db, "SELECT"), *tables.needs(("SELECT",), ("SELECT",), create=False)]
    refuse_without_grants(db, RESTORE_JOB, reads if config.dry_run else restore_needs(db, tables))
    layout_or_refuse(db, RESTORE_JOB)
    with batch_connection(db, RESTORE_APPLICATION_NAME, db.lock_timeout_ms, RESTORE_JOB) as conn:
        state = find_rollback(conn, db, tables, config.rollback_id)
        if state is None:
            which = (
                f"rollback {config.rollback_id} is not" if config.rollback_id else "no rollback is"
            )
            raise refuse(
                f"{which} recorded for {weeks} in {tables.label(tables.state_name)}; "
                "check rollback_id (it is in the rollback's metadata) and backup_schema, "
                "backup_table and state_table"
            )
        report = RestoreReport(config.dry_run, state.rollback_id, state.cutoff)
        if config.dry_run:
            total, found, nulls, already = conn.execute(
                sql.SQL(RESTORE_PREVIEW).format(backup=tables.backup, weeks=db.weeks),
                [state.rollback_id],
            ).fetchone()
            report.backed_up_rows = total
            report.count(total, nulls, found, already)
            report.seconds = time.monotonic() - started
            return report
        if state.phase in ("walking", "sweeping"):
            log.warning(
                f"rollback {state.rollback_id} stopped before finishing; restoring what it "
                "cleared closes it, and the next rollback run starts afresh"
            )
        # Out of the resumable phases first, so no rollback run continues it meanwhile.
        conn.execute(
            sql.SQL(SET_PHASE).format(state=tables.state), ["restoring", state.rollback_id]
        )
        report.backed_up_rows = conn.execute(
            sql.SQL("SELECT count(*) FROM {backup} WHERE rollback_id = %s").format(
                backup=tables.backup
            ),
            [state.rollback_id],
        ).fetchone()[0]
        try:
            put_back(conn, db, tables, config, state, report, log)
        except psycopg.OperationalError:
            if not conn.broken:  # a cancelled statement, not a lost connection
                raise
            raise refuse(
                f"the connection to {db.describe()} was lost while restoring rollback "
                f"{state.rollback_id} of {weeks}; every finished batch is committed: run "
                f"{RESTORE_JOB} again with rollback_id {state.rollback_id} to continue"
            ) from None
    report.seconds = time.monotonic() - started
    log.info(
        f"restored execution_id on {report.restored_rows:,} of {report.backed_up_rows:,} rows "
        f"of {weeks} from rollback {state.rollback_id}; skipped {report.skipped_rows:,} written "
        f"since, {report.already_restored_rows:,} already restored, {report.missing_rows:,} gone"
    )
    return report


def put_back(
    conn: psycopg.Connection,
    db: TargetDatabase,
    tables: BackupTables,
    config: RestoreConfig,
    state: RollbackState,
    report: RestoreReport,
    log,
) -> None:
    statement = sql.SQL(RESTORE_BATCH).format(backup=tables.backup, weeks=db.weeks)
    record = sql.SQL(
        "UPDATE {state} SET restored_rows = restored_rows + %s, restored_at = now() "
        "WHERE rollback_id = %s"
    ).format(state=tables.state)
    progress = Progress(total=report.backed_up_rows)
    after = 0
    while True:

        def work(c: psycopg.Connection, after: int = after) -> tuple:
            row = c.execute(
                statement, {"rid": state.rollback_id, "after": after, "limit": config.batch_size}
            ).fetchone()
            c.execute(record, [row[1], state.rollback_id])
            return row

        (size, restored, found, already, last), ms = in_one_transaction(
            conn, work, f"restore of rollback {state.rollback_id}", [db.weeks, tables.backup]
        )
        if size == 0:
            break
        after = last
        report.count(size, restored, found, already)
        progress.add(size, ms)
        if progress.due():
            log.info(progress.line("went through"))
    conn.execute(sql.SQL(SET_PHASE).format(state=tables.state), ["restored", state.rollback_id])
    report.batches = progress.batches
    report.longest_batch_ms = progress.longest_ms


@dg.asset(
    key="execution_id_restore",
    group_name=GROUP,
    pool=WRITE_POOL,  # one database write at a time, however it is launched
    deps=[report_data_weeks],
    kinds={"postgres"},
)
def execution_id_restore(
    context: dg.AssetExecutionContext, config: RestoreConfig, target_db: TargetDatabase
) -> dg.MaterializeResult:
    """Restore: put back the `execution_id` values a rollback cleared, from its backup.

    Takes `rollback_id` (default: the latest rollback of the table). Dry run by default:
    counts what it would restore. A real run restores in batches and only where
    `execution_id` is still NULL; a value written since the rollback is never overwritten
    (counted in `skipped_rows`). `updated_at` goes back to its backed-up value where the
    row is untouched since the rollback, so rollback + restore gives back the table as it
    was; a row written since keeps its newer `updated_at`.
    """
    if config.dry_run:
        report = restore(target_db, config, context.log)
    else:
        with exclusive_write(target_db, RESTORE_JOB):
            report = restore(target_db, config, context.log)
    return dg.MaterializeResult(metadata=report.metadata())


restore_assets = [execution_id_restore]
