"""The restore as Dagster runs it: its run config and the `execution_id_restore` asset.

The restore itself is `rdw_tracking.rollback.restore`, callable without Dagster.
"""

import logging
import uuid
from contextlib import nullcontext
from typing import Any

import dagster as dg
from pydantic import Field, field_validator

from rdw_tracking.assets import GROUP, WRITE_POOL
from rdw_tracking.assets.rollback import BackupConfig
from rdw_tracking.assets.tables import report_data_weeks
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.rollback import RESTORE_JOB
from rdw_tracking.rollback import restore as engine
from rdw_tracking.rollback.restore import RestoreReport, RestoreRequest
from rdw_tracking.writes import exclusive_write


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

    def request(self, db: TargetDatabase) -> RestoreRequest:
        return RestoreRequest(
            self.tables(db),
            self.rollback_id,
            self.batch_size,
            self.dry_run,
            visible_rows_only=self.visible_rows_only,
            max_replica_lag_s=self.max_replica_lag_s,
        )


def restore(db: TargetDatabase, config: RestoreConfig, log: logging.Logger | Any) -> RestoreReport:
    """The restore `config` asks for (`rdw_tracking.rollback.restore`), without Dagster."""
    return engine.restore(db, config.request(db), log)


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
    was; a row written since keeps its newer `updated_at` (and a `BEFORE UPDATE` trigger's
    columns keep what it writes: see `update_triggers`). A row moved to another partition
    since is found by its id. Batches are paced like the rollback's, standbys included.
    """
    # A real run holds the write lock; a dry run changes nothing and needs none.
    with nullcontext() if config.dry_run else exclusive_write(target_db, RESTORE_JOB):
        report = restore(target_db, config, context.log)
    return dg.MaterializeResult(metadata=report.metadata())


restore_assets = [execution_id_restore]
