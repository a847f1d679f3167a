"""The verdict per collection run: did this execution stamp every row it wrote?

For each execution being validated (the triggering run's `rdw/execution_id` tag, the
polling sensor's new executions, or run config `execution_ids`): its
`workflow_executions` row and status, the rows stamped with its id, and the rows created
while it ran (between its `created_at` and `completed_at`, or now while it runs) that
carry no `execution_id`. Each question reads only the rows it is about: the stamped rows
through the `execution_id` index, the run's time span through an index led by
`created_at` (without one, each execution costs a scan of the table, and the check says
so).
"""

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import NamedTuple

import dagster as dg
import psycopg
from psycopg import sql
from psycopg.rows import class_row

from rdw_tracking import catalog
from rdw_tracking.assets.metadata import metadata_table
from rdw_tracking.resources import TargetDatabase

CHECK = "execution_id_run_stamped"
EXECUTION_TAG = "rdw/execution_id"
SAMPLE_SIZE = 10
MAX_EXECUTIONS = 1000  # one run judges at most this many (the polling sensor's tick limit)

EXECUTIONS_SQL = """
SELECT id::text AS id, status, created_at, completed_at, now() AS now FROM {executions}
WHERE id = ANY(%(ids)s::uuid[])
"""
STAMPED_SQL = """
SELECT execution_id::text, count(*) FROM {weeks}
WHERE execution_id = ANY(%(ids)s::uuid[]) GROUP BY 1
"""
UNSTAMPED_SQL = """
SELECT count(*) FROM {weeks}
WHERE created_at >= %(start)s AND created_at <= %(end)s AND execution_id IS NULL
"""
UNSTAMPED_SAMPLE_SQL = """
SELECT id::text AS id, created_at FROM {weeks}
WHERE created_at >= %(start)s AND created_at <= %(end)s AND execution_id IS NULL
ORDER BY created_at LIMIT %(limit)s
"""


@dataclass(frozen=True)
class Execution:
    """An execution's workflow_executions row, as EXECUTIONS_SQL reads it."""

    id: str
    status: str | None
    created_at: dt.datetime | None
    completed_at: dt.datetime | None
    now: dt.datetime


class Unstamped(NamedTuple):
    """A row created while the execution ran that carries no execution_id."""

    id: str
    created_at: dt.datetime


@dataclass(frozen=True)
class Judged:
    execution_id: str
    found: bool
    status: str | None = None
    created_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    stamped: int = 0
    unstamped: int = 0
    sample: tuple[Unstamped, ...] = ()

    @property
    def passed(self) -> bool:
        return self.found and self.unstamped == 0

    def days(self) -> set[dt.date]:
        """The UTC days its rows may have been created on."""
        if self.created_at is None:
            return set()
        first = self.created_at.astimezone(dt.timezone.utc).date()
        end = self.completed_at or dt.datetime.now(dt.timezone.utc)
        last = end.astimezone(dt.timezone.utc).date()
        return {first + dt.timedelta(days=k) for k in range((last - first).days + 1)}


def valid_ids(values: list[str]) -> list[str]:
    """Canonical UUID strings, in order, without repeats; ValueError naming a bad one."""
    ids = []
    for value in values:
        try:
            ids.append(str(uuid.UUID(str(value).strip())))
        except ValueError:
            raise ValueError(f"{value!r} is not a UUID") from None
    return list(dict.fromkeys(ids))


def requested(context: dg.AssetExecutionContext, configured: list[str]) -> list[str]:
    """The executions this run validates: run config `execution_ids`, plus the
    `rdw/execution_id` tag a collection run's sensor sets."""
    tagged = context.run.tags.get(EXECUTION_TAG)
    ids = list(configured) + ([tagged] if tagged else [])
    try:
        return valid_ids(ids)[:MAX_EXECUTIONS]
    except ValueError as err:
        context.log.warning(f"tag {EXECUTION_TAG}: {err}; ignored")
        return valid_ids(configured)[:MAX_EXECUTIONS]


def judge(cur: psycopg.Cursor, db: TargetDatabase, ids: list[str]) -> list[Judged]:
    """Each execution's verdict, in the order asked."""
    if not ids:
        return []
    if not catalog.table_exists(cur, db.schema_name, db.executions_table):
        return [Judged(i, found=False) for i in ids]
    with cur.connection.cursor(row_factory=class_row(Execution)) as by_name:
        by_name.execute(sql.SQL(EXECUTIONS_SQL).format(executions=db.executions), {"ids": ids})
        rows = {row.id: row for row in by_name}
    stamped = dict(
        cur.execute(sql.SQL(STAMPED_SQL).format(weeks=db.weeks), {"ids": ids}).fetchall()
    )
    return [_judge_one(cur, db, i, rows.get(i), stamped.get(i, 0)) for i in ids]


def _judge_one(
    cur: psycopg.Cursor, db: TargetDatabase, execution_id: str, row: Execution | None, stamped: int
) -> Judged:
    if row is None:
        return Judged(execution_id, found=False, stamped=stamped)
    status, created_at, completed_at = row.status, row.created_at, row.completed_at
    if created_at is None:
        return Judged(execution_id, True, status, None, completed_at, stamped)
    span = {"start": created_at, "end": completed_at or row.now}
    unstamped = cur.execute(sql.SQL(UNSTAMPED_SQL).format(weeks=db.weeks), span).fetchone()[0]
    sample = ()
    if unstamped:
        with cur.connection.cursor(row_factory=class_row(Unstamped)) as by_name:
            by_name.execute(
                sql.SQL(UNSTAMPED_SAMPLE_SQL).format(weeks=db.weeks), span | {"limit": SAMPLE_SIZE}
            )
            sample = tuple(by_name.fetchall())
    return Judged(execution_id, True, status, created_at, completed_at, stamped, unstamped, sample)


PER_EXECUTION_COLUMNS = {
    "execution_id": "uuid", "status": "string", "created_at": "timestamptz",
    "completed_at": "timestamptz", "stamped_rows": "int", "unstamped_rows": "int",
    "passed": "bool",
}  # fmt: skip


def per_execution_table(judged: list[Judged]) -> dg.TableMetadataValue:
    return metadata_table(
        PER_EXECUTION_COLUMNS,
        (
            {
                "execution_id": j.execution_id,
                "status": j.status if j.found else "(no workflow_executions row)",
                "created_at": j.created_at.isoformat() if j.created_at else None,
                "completed_at": j.completed_at.isoformat() if j.completed_at else None,
                "stamped_rows": j.stamped,
                "unstamped_rows": j.unstamped,
                "passed": j.passed,
            }
            for j in judged
        ),
    )


def sample_table(judged: list[Judged]) -> dg.TableMetadataValue:
    records = [
        {"execution_id": j.execution_id, "id": row.id, "created_at": row.created_at.isoformat()}
        for j in judged
        for row in j.sample
    ]
    return metadata_table(
        {"execution_id": "uuid", "id": "uuid", "created_at": "timestamptz"},
        records[: SAMPLE_SIZE * 3],
    )


def verdict_check(db: TargetDatabase, judged: list[Judged], index_note: str) -> dg.AssetCheckResult:
    weeks = db.qualified(db.weeks_table)
    metadata = {
        "executions": len(judged),
        "stamped_rows": sum(j.stamped for j in judged),
        "unstamped_rows": sum(j.unstamped for j in judged),
        "unstamped_sample": sample_table(judged),
        "per_execution": per_execution_table(judged),
        "created_at_index": "missing" if index_note else "present",
    }
    if not judged:
        description = (
            "no execution to judge in this run: a collection run's sensor or the polling "
            "sensor names them, or set ops.execution_id_population.config.execution_ids"
        )
        return dg.AssetCheckResult(
            check_name=CHECK, passed=True, description=description, metadata=metadata
        )
    missing = [j for j in judged if not j.found]
    leaky = [j for j in judged if j.found and j.unstamped]
    problems = []
    if leaky:
        first = leaky[0]
        ids = ", ".join(row.id for row in first.sample[:3])
        problems.append(
            f"{len(leaky)} execution(s) left rows without an execution_id in {weeks}: "
            f"{first.execution_id} ({first.status}) has {first.unstamped} rows created while it "
            f"ran with execution_id NULL (e.g. {ids}); the collection path that wrote them "
            "does not stamp execution_id"
        )
    if missing:
        problems.append(
            f"{len(missing)} execution(s) have no {db.qualified(db.executions_table)} row "
            f"({', '.join(j.execution_id for j in missing[:3])}); check the ids requested"
        )
    if problems:
        description = "; ".join(problems)
    else:
        description = (
            f"every one of {len(judged)} execution(s) stamped all rows created while it ran "
            f"({metadata['stamped_rows']} stamped rows)"
        )
    if index_note:
        description += f". Note: {index_note}"
    return dg.AssetCheckResult(
        check_name=CHECK,
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata=metadata,
    )
