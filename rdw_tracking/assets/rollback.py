"""The rollback as Dagster runs it: its run config and the `execution_id_rollback` asset.

The rollback itself (matched set, block walk, sweep, backup, resume) is the package
`rdw_tracking.rollback`, callable without Dagster; this module validates what the user
asked for and turns the report into the asset's metadata.
"""

import datetime as dt
import logging
import re
from contextlib import nullcontext
from typing import Any

import dagster as dg
from pydantic import Field, field_validator

from rdw_tracking.assets import GROUP, WRITE_POOL
from rdw_tracking.assets.tables import report_data_weeks
from rdw_tracking.resources import TargetDatabase, _check_identifier
from rdw_tracking.rollback import ROLLBACK_JOB
from rdw_tracking.rollback import run as engine
from rdw_tracking.rollback.backup import DEFAULT_BACKUP_TABLE, DEFAULT_STATE_TABLE, BackupTables
from rdw_tracking.rollback.pace import DEFAULT_MAX_REPLICA_LAG_S
from rdw_tracking.rollback.run import RollbackReport, RollbackRequest
from rdw_tracking.writes import exclusive_write

MIN_BATCH, MAX_BATCH, DEFAULT_BATCH = 100, 50_000, 5_000
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_cutoff(value: str, today: dt.date) -> dt.date:
    """`value` as an ISO date (YYYY-MM-DD) no later than `today`; ValueError otherwise."""
    try:
        if not _ISO_DATE.fullmatch(value.strip()):
            raise ValueError
        cutoff = dt.date.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"cutoff_date {value!r} is not an ISO date; write it as YYYY-MM-DD, e.g. 2025-03-01"
        ) from None
    if cutoff > today:
        raise ValueError(
            f"cutoff_date {cutoff} is in the future (today is {today} UTC); a rollback "
            "clears rows created since a past date"
        )
    return cutoff


def today_utc() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


class BackupConfig(dg.Config):
    backup_schema: str | None = Field(
        default=None, description="Schema of the backup and state tables; default: target_db's."
    )
    backup_table: str = Field(
        default=DEFAULT_BACKUP_TABLE,
        description="Table keeping (rollback_id, id, execution_id, updated_at) of every cleared row; created if missing.",
    )
    state_table: str = Field(
        default=DEFAULT_STATE_TABLE,
        description="Table keeping each rollback's cutoff, fixed upper bound and progress; created if missing.",
    )
    batch_size: int = Field(
        default=DEFAULT_BATCH,
        description=f"Rows per transaction, {MIN_BATCH:,} to {MAX_BATCH:,}.",
    )
    dry_run: bool = Field(default=True, description="Only report what a real run would do.")
    visible_rows_only: bool = Field(
        default=False,
        description=(
            "Under row-level security that applies to the running role, change only the "
            "rows its policies let it see and update (default: refuse before any change)."
        ),
    )

    max_replica_lag_s: float = Field(
        default=DEFAULT_MAX_REPLICA_LAG_S,
        description=(
            "Between batches, pause while any standby (pg_stat_replication) replays more "
            "than this many seconds behind; 0 = never pause."
        ),
    )

    @field_validator("max_replica_lag_s")
    @classmethod
    def _replica_lag(cls, value: float) -> float:
        if not 0 <= value <= 86_400:
            raise ValueError(
                f"max_replica_lag_s must be between 0 (off) and 86400 seconds, got {value}"
            )
        return value

    @field_validator("backup_schema", "backup_table", "state_table")
    @classmethod
    def _names(cls, value: str | None, info) -> str | None:
        value = value if value is None else _check_identifier(value, info.field_name)
        if info.field_name != "backup_schema" and not _PLAIN_NAME.fullmatch(value):
            # The rollback creates these tables: no name that only quoting makes legal.
            raise ValueError(
                f"{info.field_name} {value!r} is not a plain table name; the rollback "
                "creates it, so use letters, digits and _ only (starting with a letter or _)"
            )
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int) -> int:
        if not MIN_BATCH <= value <= MAX_BATCH:
            raise ValueError(
                f"batch_size must be between {MIN_BATCH:,} and {MAX_BATCH:,} rows, got {value:,}; "
                f"{DEFAULT_BATCH:,} keeps each transaction short"
            )
        return value

    def tables(self, db: TargetDatabase) -> BackupTables:
        return BackupTables(
            self.backup_schema or db.schema_name, self.backup_table, self.state_table
        )


class RollbackConfig(BackupConfig):
    cutoff_date: str = Field(
        description="Clear execution_id on rows created on or after this UTC date (YYYY-MM-DD)."
    )
    expected_rows: int | None = Field(
        default=None,
        description="The dry run's matched_rows: a real run that matches another number changes nothing.",
    )
    lock_timeout_ms: int = Field(
        default=1_000, description="Longest a batch waits for a row lock before it retries (ms)."
    )

    @field_validator("cutoff_date")
    @classmethod
    def _cutoff(cls, value: str) -> str:
        return parse_cutoff(value, today_utc()).isoformat()

    @field_validator("expected_rows")
    @classmethod
    def _expected(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= 2**63 - 1:
            raise ValueError(
                f"expected_rows must be a row count from 0 to 2**63-1, got {value}; "
                "copy matched_rows from the dry run"
            )
        return value

    @field_validator("lock_timeout_ms")
    @classmethod
    def _lock_timeout(cls, value: int) -> int:
        if not 10 <= value <= 60_000:
            raise ValueError(f"lock_timeout_ms must be between 10 and 60000, got {value}")
        return value

    @property
    def cutoff(self) -> dt.date:
        return dt.date.fromisoformat(self.cutoff_date)

    def request(self, db: TargetDatabase) -> RollbackRequest:
        return RollbackRequest(
            cutoff=self.cutoff,
            tables=self.tables(db),
            batch_size=self.batch_size,
            dry_run=self.dry_run,
            expected_rows=self.expected_rows,
            lock_timeout_ms=self.lock_timeout_ms,
            visible_rows_only=self.visible_rows_only,
            max_replica_lag_s=self.max_replica_lag_s,
        )


def rollback(
    db: TargetDatabase, config: RollbackConfig, log: logging.Logger | Any
) -> RollbackReport:
    """The rollback `config` asks for (`rdw_tracking.rollback.run`), without Dagster."""
    return engine.rollback(db, config.request(db), log)


def rollback_metadata(report: RollbackReport) -> dict[str, Any]:
    """The report as the asset's metadata, its per-day counts as a table."""
    daily = dg.MetadataValue.table(
        records=[
            dg.TableRecord({"creation_date": day.isoformat(), "matched_rows": n})
            for day, n in report.days
        ],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("creation_date", "date"),
                dg.TableColumn("matched_rows", "int"),
            ]
        ),
    )
    return {**report.metadata(), "daily": daily}


@dg.asset(
    key="execution_id_rollback",
    group_name=GROUP,
    pool=WRITE_POOL,  # one database write at a time, however it is launched
    deps=[report_data_weeks],
    kinds={"postgres"},
)
def execution_id_rollback(
    context: dg.AssetExecutionContext, config: RollbackConfig, target_db: TargetDatabase
) -> dg.MaterializeResult:
    """Rollback cleanup: clear `execution_id` on rows created since `cutoff_date`.

    **Dry run by default**: reports `matched_rows`, their spread per creation day and an
    estimated duration, and changes nothing. Confirm the number with `expected_rows` and
    set `dry_run: false` to clear them: in short batches of `batch_size` rows, each
    backing its rows' `(id, execution_id, updated_at)` up into the backup table, tagged
    with `rollback_id`, in the same transaction. Only rows created before the run started
    are touched. Stopped at any point, the next real run with the same `cutoff_date`
    continues the same rollback. `restore_execution_id` undoes it. Between batches it
    pauses while a standby replays more than `max_replica_lag_s` behind. Refused under
    row-level security unless `visible_rows_only`. Details: docs/rollback-and-restore.md.
    """
    # A real run holds the write lock; a dry run changes nothing and needs none.
    with nullcontext() if config.dry_run else exclusive_write(target_db, ROLLBACK_JOB):
        report = rollback(target_db, config, context.log)
    return dg.MaterializeResult(metadata=rollback_metadata(report))


rollback_assets = [execution_id_rollback]
