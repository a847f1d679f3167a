"""The rollback itself: a dry run that counts the matched set, or a real run that clears
it in batches (walk, then sweep) and can be continued after any stop."""

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from rdw_tracking import catalog
from rdw_tracking.errors import refuse
from rdw_tracking.layout import Layout
from rdw_tracking.resources import TargetDatabase, long_statements
from rdw_tracking.rollback import RESTORE_JOB, ROLLBACK_APPLICATION_NAME, ROLLBACK_JOB
from rdw_tracking.rollback.backup import BackupTables, analyze_backup
from rdw_tracking.rollback.batches import batch_connection, refuse_if_lost
from rdw_tracking.rollback.matched import Survey, estimate_seconds, fixed_bound, survey
from rdw_tracking.rollback.pace import DEFAULT_MAX_REPLICA_LAG_S, FIRST_BATCH_ROWS
from rdw_tracking.rollback.preflight import check_rollback, update_triggers
from rdw_tracking.rollback.progress import Log
from rdw_tracking.rollback.state import (
    RollbackState,
    finish_rollback,
    set_phase,
    start_rollback,
    unfinished_rollbacks,
)
from rdw_tracking.rollback.sweep import Swept, sweep
from rdw_tracking.rollback.walk import Walker


@dataclass(frozen=True)
class RollbackRequest:
    """What one rollback run is asked to do (the asset's RollbackConfig, validated)."""

    cutoff: dt.date
    tables: BackupTables
    batch_size: int
    dry_run: bool = True
    expected_rows: int | None = None
    lock_timeout_ms: int = 1_000
    visible_rows_only: bool = False
    max_replica_lag_s: float = DEFAULT_MAX_REPLICA_LAG_S


@dataclass(frozen=True)
class Cleared:
    """What the batches of one real run did."""

    rows: int
    batches: int
    longest_batch_ms: float
    swept_rows: int
    leaves_walked: int
    leaves_left_alone: list[str]
    rows_left: int = 0
    replica_paused_s: float = 0.0


@dataclass
class RollbackReport:
    dry_run: bool
    cutoff: dt.date
    matched_rows: int
    cleared_rows: int = 0
    batches: int = 0
    rollback_id: str | None = None
    upper_bound: dt.datetime | None = None
    longest_batch_ms: float = 0.0
    wal_bytes: int | None = None
    cleared_this_run: int = 0
    swept_rows: int = 0
    resumed: bool = False
    days: list[tuple[dt.date, int]] = field(default_factory=list)
    estimated_seconds: float | None = None
    seconds: float = 0.0
    backup_table: str = ""
    layout: str = ""
    leaves_walked: int = 0
    leaves_left_alone: list[str] = field(default_factory=list)
    rows_left: int = 0
    replica_paused_s: float = 0.0
    updated_since_start_rows: int = 0
    future_updated_at_rows: int = 0
    update_triggers: list[str] = field(default_factory=list)

    def add(self, state: RollbackState, cleared: Cleared) -> None:
        """Count what this run cleared on top of what the rollback had before it."""
        self.cleared_rows = state.cleared_rows + cleared.rows
        self.cleared_this_run = cleared.rows
        self.batches = state.batches + cleared.batches
        self.longest_batch_ms = cleared.longest_batch_ms
        self.swept_rows = cleared.swept_rows
        self.leaves_walked = cleared.leaves_walked
        self.leaves_left_alone = cleared.leaves_left_alone
        self.rows_left = cleared.rows_left
        self.replica_paused_s = cleared.replica_paused_s

    def metadata(self) -> dict[str, Any]:
        """The report as materialization metadata, but for the per-day table."""
        return {
            "dry_run": self.dry_run,
            "matched_rows": self.matched_rows,
            "cleared_rows": self.cleared_rows,
            "batches": self.batches,
            "rollback_id": self.rollback_id,
            "longest_batch_ms": round(self.longest_batch_ms, 1),
            "wal_bytes": self.wal_bytes,
            "cutoff_date": self.cutoff.isoformat(),
            "upper_bound": self.upper_bound.isoformat() if self.upper_bound else None,
            "resumed": self.resumed,
            "cleared_this_run": self.cleared_this_run,
            "swept_rows": self.swept_rows,
            "estimated_seconds": self.estimated_seconds,
            "seconds": round(self.seconds, 2),
            "backup_table": self.backup_table,
            "layout": self.layout,
            "leaves_walked": self.leaves_walked,
            "leaves_left_alone": ", ".join(self.leaves_left_alone),
            "rows_left": self.rows_left,
            "replica_paused_s": round(self.replica_paused_s, 1),
            "updated_since_start_rows": self.updated_since_start_rows,
            "future_updated_at_rows": self.future_updated_at_rows,
            "update_triggers": ", ".join(self.update_triggers),
        }


def rollback(db: TargetDatabase, request: RollbackRequest, log: Log) -> RollbackReport:
    """Dry run or real run of the rollback; the asset's whole job, callable without Dagster."""
    started = time.monotonic()
    tables = request.tables
    layout = check_rollback(db, tables, request.dry_run, log, request.visible_rows_only)
    triggers = update_triggers(db, layout, ROLLBACK_JOB, log)
    with batch_connection(db, ROLLBACK_APPLICATION_NAME, request.lock_timeout_ms) as conn:
        resume = resumable(conn, db, request, log)
        bound = fixed_bound(conn, tables, resume, request.dry_run, log)
        # Cleared rows no longer match, so a resumed run's scan finds just what is left.
        found = survey(conn, db, request.cutoff, bound)
        report = survey_report(request, layout, resume, bound, found)
        log.info(matched_line(db, request, resume, bound, found))
        if found.updated_in_future:
            log.warning(future_line(db, found))
        report.update_triggers = triggers
        check_expected_rows(db, request, report.matched_rows)
        if request.dry_run or (report.matched_rows == 0 and not resume):
            report.seconds = time.monotonic() - started
            return report
        if not resume:
            resume = start_rollback(conn, db, tables, request.cutoff, bound, found.matched_rows)
            report.rollback_id = resume.rollback_id
            log.info(f"rollback {resume.rollback_id}: backing up into {report.backup_table}")
        wal_start = catalog.wal_lsn(conn)
        lost = (
            f"the connection to {db.describe()} was lost during rollback "
            f"{resume.rollback_id} of {db.qualified(db.weeks_table)}; every finished batch "
            f"is committed with its backup: run {ROLLBACK_JOB} again with cutoff_date "
            f"{request.cutoff} to continue"
        )
        with refuse_if_lost(conn, lost):
            report.add(resume, clear(conn, db, request, resume, found, log, layout))
        report.wal_bytes = catalog.wal_bytes(wal_start, catalog.wal_lsn(conn))
    report.seconds = time.monotonic() - started
    log.info(
        f"rollback {report.rollback_id} finished: cleared {report.cleared_rows:,} of "
        f"{report.matched_rows:,} rows of {db.qualified(db.weeks_table)} in "
        f"{report.batches:,} batches (longest {report.longest_batch_ms:,.0f} ms), "
        f"backup in {report.backup_table}"
    )
    return report


def resumable(
    conn: psycopg.Connection, db: TargetDatabase, request: RollbackRequest, log: Log
) -> RollbackState | None:
    """The stopped rollback with this cutoff_date, which this run continues; a stopped one
    with another cutoff_date refuses a real run (and warns a dry run)."""
    unfinished = unfinished_rollbacks(conn, db, request.tables)
    resume = next((r for r in unfinished if r.cutoff == request.cutoff), None)
    other = next((r for r in unfinished if r.cutoff != request.cutoff), None)
    if other and not resume:
        message = (
            f"rollback {other.rollback_id} of {db.qualified(db.weeks_table)} with cutoff_date "
            f"{other.cutoff} stopped after {other.cleared_rows:,} of {other.matched_rows:,} "
            f"rows; run {ROLLBACK_JOB} with cutoff_date {other.cutoff} to finish it (or "
            f"{RESTORE_JOB} with its rollback_id to undo it) before another"
        )
        if not request.dry_run:
            raise refuse(message)
        log.warning(message)
    return resume


def survey_report(
    request: RollbackRequest,
    layout: Layout,
    resume: RollbackState | None,
    bound: dt.datetime,
    found: Survey,
) -> RollbackReport:
    """The report as the scan leaves it: what a dry run says, a real run's starting point."""
    return RollbackReport(
        dry_run=request.dry_run,
        cutoff=request.cutoff,
        matched_rows=resume.matched_rows if resume else found.matched_rows,
        cleared_rows=resume.cleared_rows if resume else 0,
        batches=resume.batches if resume else 0,
        rollback_id=resume.rollback_id if resume else None,
        upper_bound=bound,
        resumed=resume is not None,
        days=found.days,
        estimated_seconds=estimate_seconds(found.matched_rows, found.seconds),
        backup_table=request.tables.label(request.tables.backup_name),
        layout=layout.describe(),
        updated_since_start_rows=found.updated_later,
        future_updated_at_rows=found.updated_in_future,
    )


def matched_line(
    db: TargetDatabase,
    request: RollbackRequest,
    resume: RollbackState | None,
    bound: dt.datetime,
    found: Survey,
) -> str:
    weeks = db.qualified(db.weeks_table)
    if resume:
        return (
            f"continuing rollback {resume.rollback_id} of {weeks} (cutoff_date "
            f"{resume.cutoff}, rows created before {bound.isoformat()}): "
            f"{resume.cleared_rows:,} of {resume.matched_rows:,} rows already cleared, "
            f"{found.matched_rows:,} left"
        )
    return (
        f"{found.matched_rows:,} rows of {weeks} have execution_id and were created "
        f"from {request.cutoff} to {bound.isoformat()} (scan {found.seconds:.1f} s)"
    )


def future_line(db: TargetDatabase, found: Survey) -> str:
    """Why rows dated in the future are not in matched_rows, and what that does later."""
    latest = found.latest_future.isoformat() if found.latest_future else "?"
    return (
        f"{found.updated_in_future:,} rows of {db.qualified(db.weeks_table)} created since "
        f"the cutoff have updated_at in the future (the latest {latest}; a writer's clock "
        "ahead of the server's?): a run leaves a row touched at or after its start alone, "
        "as written during the run, so they are not in matched_rows and are skipped; as "
        "the clock passes their updated_at they match, so a later dry run counts up to "
        f"{found.updated_in_future:,} more (set expected_rows from a fresh dry run)"
    )


def check_expected_rows(db: TargetDatabase, request: RollbackRequest, matched_rows: int) -> None:
    """Refuse a run whose matched set is not the number the dry run showed the user."""
    if request.expected_rows is not None and request.expected_rows != matched_rows:
        raise refuse(
            f"expected_rows is {request.expected_rows:,} but {matched_rows:,} rows of "
            f"{db.qualified(db.weeks_table)} match cutoff_date {request.cutoff}; nothing was "
            "changed. Check the dry run's matched_rows and run again with expected_rows set to it"
        )


def clear(
    conn: psycopg.Connection,
    db: TargetDatabase,
    request: RollbackRequest,
    state: RollbackState,
    found: Survey,
    log: Log,
    layout: Layout,
) -> Cleared:
    """Walk the planned block ranges leaf by leaf, then sweep up rows that moved; mark the
    run finished."""
    leaves = frozenset(m.oid for m in layout.leaves)
    tables, most = request.tables, request.batch_size
    walker = Walker(
        conn,
        db,
        tables,
        state,
        layout.root.oid,
        most,
        log,
        leaves,
        request.visible_rows_only,
        request.max_replica_lag_s,
    )
    size = min(most, FIRST_BATCH_ROWS)  # a probe, then sized by time and WAL
    if state.phase == "walking":
        size = walker.walk(found, size)
    swept = sweep(walker, size)
    if swept.joined:
        unfinished(conn, db, request, walker, swept)
    finish_rollback(conn, tables, state.rollback_id)
    with long_statements(conn, db.statement_timeout_ms):
        analyze_backup(conn, tables, log)  # the restore plans its batches over it
    if swept.rows:
        log.info(f"the final sweep cleared {swept.rows:,} rows that moved during the walk")
    if swept.left:
        log.warning(
            f"{swept.left:,} matched rows of {db.qualified(db.weeks_table)} were left as they "
            "are: row-level security keeps them from this role (visible_rows_only)"
        )
    if walker.wal_waited >= 1:
        log.info(
            f"between batches, the run waited {walker.wal_waited:,.1f} s in all for the "
            "server to write out WAL (its disk was busy); no row was locked while it waited"
        )
    progress = walker.progress
    return Cleared(
        progress.done,
        progress.batches,
        progress.longest_ms,
        swept.rows,
        len(found.leaves),
        walker.gone,
        swept.left,
        walker.replicas.paused_s,
    )


def unfinished(
    conn: psycopg.Connection,
    db: TargetDatabase,
    request: RollbackRequest,
    walker: Walker,
    swept: Swept,
) -> None:
    """End a run that left matched rows in leaves that joined the table while it went
    (a partition manager creating partitions and moving rows into them): failed, saying
    what is left where, the rollback kept resumable so the next run clears them."""
    set_phase(conn, request.tables, walker.state.rollback_id, "sweeping")
    left = sum(swept.joined.values())
    where = ", ".join(f"{label} ({n:,})" for label, n in swept.joined.items())
    raise refuse(
        f"{walker.what} is not finished: {left:,} matched rows are in {where}, which joined "
        "the table while the run went (a partition created or attached, or rows moved into "
        f"it), and were left as they are; run {ROLLBACK_JOB} again with cutoff_date "
        f"{request.cutoff} to clear them: it continues rollback {walker.state.rollback_id}",
        rollback_id=walker.state.rollback_id,
        cleared_rows=walker.state.cleared_rows + walker.progress.done,
        rows_left=left,
        leaves_joined=where,
    )
