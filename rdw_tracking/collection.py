"""Collection runs under execution tracking: the fix itself.

A collection run used to write its `report_data_weeks` rows without saying which run
wrote them. Application code now wraps the run in `tracked_execution`, which records a
`workflow_executions` row for it and hands over the id to stamp on every row:

    from rdw_tracking.collection import tracked_execution, write_collection_weeks

    with tracked_execution(db, "weekly_collection") as execution:
        write_collection_weeks(db, execution.id, collection_ids)
        # ... any other writes carry execution_id = execution.id

The execution is `running` while the block runs, becomes `completed` (with
`completed_at`) when it ends normally and `failed` (with `completed_at`) when it
raises; the exception is re-raised unchanged. Status changes commit on their own short
connections, so other sessions (and `workflow_executions_sensor`) see them at once.
"""

# No `from __future__ import annotations`: Dagster reads the op's annotations at runtime.

import datetime as dt
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import dagster as dg
import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row
from pydantic import Field

from rdw_tracking import catalog
from rdw_tracking.assets import WRITE_POOL
from rdw_tracking.errors import TargetDatabaseError, refuse
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.writes import Need, exclusive_write, refuse_without_grants, weeks_need

RUNNING, COMPLETED, FAILED = "running", "completed", "failed"
WORKFLOW_NAME = "weekly_collection"


@dataclass(frozen=True)
class Execution:
    """One tracked collection run: stamp `id` on every row it writes."""

    id: uuid.UUID
    workflow_name: str | None
    created_at: dt.datetime


def _start(db: TargetDatabase, workflow_name: str | None) -> Execution:
    with db.connect(autocommit=True) as conn:
        with conn.cursor() as cur:
            columns = {c.name for c in catalog.columns(cur, db.schema_name, db.executions_table)}
        if not columns:
            raise TargetDatabaseError(
                f"table {db.qualified(db.executions_table)} does not exist; create it "
                "(see the contract's DDL) or set target_db.executions_table"
            )
        # The spec's table has no workflow_name; write it only where the column exists.
        names = ["status"] + (
            ["workflow_name"] if workflow_name and "workflow_name" in columns else []
        )
        values = [RUNNING] + ([workflow_name] if len(names) == 2 else [])
        statement = sql.SQL(
            "INSERT INTO {table} ({columns}) VALUES ({values}) RETURNING id, created_at"
        ).format(
            table=db.executions,
            columns=sql.SQL(", ").join(map(sql.Identifier, names)),
            values=sql.SQL(", ").join(sql.Placeholder() * len(names)),
        )
        with conn.cursor(row_factory=namedtuple_row) as by_name:
            row = by_name.execute(statement, values).fetchone()
    return Execution(id=row.id, workflow_name=workflow_name, created_at=row.created_at)


def _finish(db: TargetDatabase, execution_id: uuid.UUID, status: str) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute(
            sql.SQL("UPDATE {table} SET status = %s, completed_at = now() WHERE id = %s").format(
                table=db.executions
            ),
            [status, execution_id],
        )


@contextmanager
def tracked_execution(db: TargetDatabase, workflow_name: str | None = None) -> Iterator[Execution]:
    """Run a block as one `workflow_executions` row: running, then completed or failed.

    `workflow_name` is stored when the table has a `workflow_name` column (the demo's
    does; the spec's minimal table does not). If the block raises, the execution is
    marked failed and the exception propagates; if marking it fails too (database gone),
    the block's own exception still wins and the row stays `running` with no
    `completed_at` for an operator to see.
    """
    execution = _start(db, workflow_name)
    try:
        yield execution
    except BaseException as block_error:
        try:
            _finish(db, execution.id, FAILED)
        except (TargetDatabaseError, psycopg.Error) as mark_error:
            if hasattr(block_error, "add_note"):  # Python 3.11+
                block_error.add_note(
                    f"execution {execution.id} could not be marked failed: {mark_error}"
                )
        raise
    _finish(db, execution.id, COMPLETED)


# The current ISO week (Monday to Sunday, UTC) for each collection, written in one
# statement; ids that name no collection are simply not found.
WRITE_WEEKS = """
INSERT INTO {weeks} (collection_id, week_start_date, week_end_date, status, execution_id, data)
SELECT c.id, date_trunc('week', CURRENT_DATE)::date, date_trunc('week', CURRENT_DATE)::date + 6,
       'completed', %(execution_id)s,
       jsonb_build_object('source', 'weekly_collection', 'collection', c.id,
                          'metrics', jsonb_build_object('impressions', 0, 'clicks', 0))
FROM {collections} AS c
WHERE c.id = ANY(%(collection_ids)s)
"""


def write_collection_weeks(
    db: TargetDatabase, execution_id: uuid.UUID, collection_ids: Sequence[uuid.UUID | str]
) -> int:
    """Write this week's `report_data_weeks` row of each collection, stamped with `execution_id`.

    One transaction; returns the number of rows written. Ids naming no collection are
    refused up front, naming them, so a typo never passes as a smaller collection.
    """
    ids = [uuid.UUID(str(i)) for i in collection_ids]
    with db.connect() as conn:
        found = {
            row[0]
            for row in conn.execute(
                sql.SQL("SELECT id FROM {} WHERE id = ANY(%s)").format(db.collections), [ids]
            )
        }
        missing = [str(i) for i in ids if i not in found]
        if missing:
            raise TargetDatabaseError(
                f"{len(missing)} collection id(s) not in {db.qualified(db.collections_table)}: "
                f"{', '.join(missing[:5])}; pass ids of existing collections"
            )
        written = conn.execute(
            sql.SQL(WRITE_WEEKS).format(weeks=db.weeks, collections=db.collections),
            {"execution_id": execution_id, "collection_ids": ids},
        ).rowcount
        conn.commit()
    return written


def first_collections(db: TargetDatabase, count: int) -> list[uuid.UUID]:
    """The first `count` collections by id: the demo's "set of collections"."""
    rows = db.fetch_all(
        sql.SQL("SELECT id FROM {} ORDER BY id LIMIT %s").format(db.collections), [count]
    )
    return [row[0] for row in rows]


class CollectionConfig(dg.Config):
    collections: int = Field(
        default=50,
        ge=1,
        le=1_000_000,
        description="How many collections (the first by id) this run collects.",
    )


def collection_needs(db: TargetDatabase) -> list[Need]:
    """The tables a collection run reads and writes: existing, and granted."""
    return [
        Need(
            db.schema_name, db.collections_table, ("SELECT",), field="target_db.collections_table"
        ),
        Need(
            db.schema_name,
            db.executions_table,
            ("SELECT", "INSERT", "UPDATE"),
            field="target_db.executions_table",
        ),
        weeks_need(db, "INSERT"),
    ]


@dg.op(name="collect_weeks", tags={"kind": "postgres"}, pool=WRITE_POOL)
def collect_weeks(
    context: dg.OpExecutionContext, config: CollectionConfig, target_db: TargetDatabase
) -> dg.Output[int]:
    """Writes this week's row of each collection inside a tracked execution, every row stamped."""
    refuse_without_grants(target_db, WORKFLOW_NAME, collection_needs(target_db))
    try:
        with exclusive_write(target_db, WORKFLOW_NAME):
            ids = first_collections(target_db, config.collections)
            with tracked_execution(target_db, WORKFLOW_NAME) as execution:
                context.log.info(f"execution {execution.id}: collecting {len(ids)} collections")
                written = write_collection_weeks(target_db, execution.id, ids)
    except TargetDatabaseError as err:
        raise refuse(f"weekly_collection failed: {err}") from None
    metadata = {"execution_id": str(execution.id), "rows_written": written, "collections": len(ids)}
    # The run wrote the external table: its page in the UI lists each collection run
    # with the execution id it stamped.
    context.log_event(
        dg.AssetMaterialization(
            asset_key="report_data_weeks",
            description=f"weekly_collection wrote {written} rows stamped {execution.id}",
            metadata=metadata,
        )
    )
    return dg.Output(written, metadata=metadata)
