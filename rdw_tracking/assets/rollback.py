"""Rollback cleanup: clear `execution_id` on rows created since a cutoff date, and undo it.

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
"""

import bisect
import datetime as dt
import logging
import re
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import psycopg
from psycopg import errors, sql
from pydantic import Field, field_validator

from rdw_tracking import catalog
from rdw_tracking.assets import GROUP, WRITE_POOL, refuse
from rdw_tracking.assets.indexes import Session, describe
from rdw_tracking.assets.tables import report_data_weeks
from rdw_tracking.layout import Layout, is_member, member_by_oid, table_layout
from rdw_tracking.resources import TargetDatabase, _check_identifier
from rdw_tracking.writes import (
    Need,
    check_write_lock,
    exclusive_write,
    missing_grants,
    refuse_without_grants,
    weeks_need,
)

ROLLBACK_JOB = "rollback_execution_id"
RESTORE_JOB = "restore_execution_id"
# The batch connection's application_name: find (or terminate) them in pg_stat_activity.
ROLLBACK_APPLICATION_NAME = "rdw_tracking:rollback_batches"

DEFAULT_BACKUP_TABLE = "execution_id_rollback_backup"
DEFAULT_STATE_TABLE = "execution_id_rollback_runs"
MIN_BATCH, MAX_BATCH, DEFAULT_BATCH = 100, 50_000, 5_000
LOCK_ATTEMPTS = 5
SWEEP_ROUNDS = 5
PROGRESS_EVERY_S = 5.0
# Wait at most this long, at a fresh run's start, for transactions begun before it.
IN_FLIGHT_WAIT_S = 30.0
# For the dry run's estimate: batched clearing rate measured by benchmarks/bench_rollback.py
# on 2 cores, plus the two full scans (plan and final sweep).
ESTIMATED_ROWS_PER_S = 20_000
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# -- run config -----------------------------------------------------------------------


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


# -- backup and state tables ------------------------------------------------------------


@dataclass(frozen=True)
class BackupTables:
    schema: str
    backup_name: str
    state_name: str

    @classmethod
    def of(cls, db: TargetDatabase, config: BackupConfig) -> "BackupTables":
        return cls(config.backup_schema or db.schema_name, config.backup_table, config.state_table)

    @property
    def backup(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.backup_name)

    @property
    def state(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.state_name)

    def label(self, name: str) -> str:
        return f"{self.schema}.{name}"

    def needs(self, backup_rights: tuple[str, ...], state_rights: tuple[str, ...], create: bool):
        """What a job needs on the backup and state tables (or, `create`: on their schema)."""
        field = (
            "backup_schema (create that schema first, or leave backup_schema unset)"
            if create
            else "backup_schema, backup_table and state_table: they name the rollback's "
            "backup, which a real rollback creates"
        )
        return [
            Need(
                self.schema, self.backup_name, backup_rights, create_if_missing=create, field=field
            ),
            Need(self.schema, self.state_name, state_rights, create_if_missing=create, field=field),
        ]


# UPDATE on just these columns is enough for the rollback and the restore.
CLEARED_COLUMNS = ("execution_id", "updated_at")


def leaf_needs(layout: Layout, *rights: str) -> list[Need]:
    """The batches change each partition or child directly (a ctid means something only
    inside its own table), and PostgreSQL checks a table's own grants when it is named:
    the rights granted on the parent must be granted on each of them too."""
    return [
        Need(
            leaf.schema,
            leaf.name,
            rights,
            CLEARED_COLUMNS if "UPDATE" in rights else (),
            field=f"the grants on {layout.label}'s partitions and child tables",
        )
        for leaf in layout.leaves
        if leaf.oid != layout.root.oid
    ]


def rollback_needs(db: TargetDatabase, tables: BackupTables, layout: Layout) -> list[Need]:
    """A real rollback's rights: change the table, write the backup (or create it)."""
    return [
        weeks_need(db, "SELECT", "UPDATE", update_columns=CLEARED_COLUMNS),
        *leaf_needs(layout, "SELECT", "UPDATE"),
        *tables.needs(("SELECT", "INSERT"), ("SELECT", "INSERT", "UPDATE"), create=True),
    ]


def layout_or_refuse(db: TargetDatabase, job: str) -> Layout:
    """The weeks table's layout; refuses a view, a foreign table or rules before any change."""
    with db.cursor() as cur:
        layout = table_layout(cur, db.schema_name, db.weeks_table)
    if layout is None:
        raise refuse(
            f"table {db.qualified(db.weeks_table)} does not exist; check "
            "target_db.schema_name and target_db.weeks_table"
        )
    refusal = layout.refusal(job)
    if refusal:
        raise refuse(refusal)
    return layout


# Each table's columns exactly as the rollback creates them: (type, NOT NULL, default,
# identity). A table found under the expected name is used only if it matches these,
# belongs to the running role (or the weeks table's owner) and carries nothing that runs
# code or hides rows: no trigger, rule, row-level security, child or parent table, and no
# write right for PUBLIC. Else a BEFORE INSERT trigger could drop the backup of rows the
# rollback clears, or a forged state or backup row steer the next run or the restore.
TIMESTAMPTZ = "timestamp with time zone"
BACKUP_COLUMNS = {
    "seq": ("bigint", True, None, "a"),
    "rollback_id": ("uuid", True, None, ""),
    "id": ("uuid", True, None, ""),
    "execution_id": ("uuid", True, None, ""),
    "updated_at": (TIMESTAMPTZ, False, None, ""),
    "cleared_at": (TIMESTAMPTZ, True, None, ""),
    # the physical table (partition, child) the row was cleared in; NULL in backups
    # written before rdw_tracking knew partitions
    "relid": ("oid", False, None, ""),
}
STATE_COLUMNS = {
    "rollback_id": ("uuid", True, None, ""),
    "schema_name": ("text", True, None, ""),
    "table_name": ("text", True, None, ""),
    "cutoff_date": ("date", True, None, ""),
    "upper_bound": (TIMESTAMPTZ, True, None, ""),
    "matched_rows": ("bigint", True, None, ""),
    "phase": ("text", True, None, ""),
    "next_block": ("bigint", True, "0", ""),
    "cleared_rows": ("bigint", True, "0", ""),
    "batches": ("integer", True, "0", ""),
    "started_at": (TIMESTAMPTZ, True, "now()", ""),
    "finished_at": (TIMESTAMPTZ, False, None, ""),
    "restored_at": (TIMESTAMPTZ, False, None, ""),
    "restored_rows": ("bigint", True, "0", ""),
}

# cleared_at is the updated_at the rollback wrote. The only index is on an ascending seq:
# cheap to append to, and the restore's walking order.
CREATE_BACKUP = """
CREATE TABLE IF NOT EXISTS {backup} (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rollback_id uuid NOT NULL,
    id uuid NOT NULL,
    execution_id uuid NOT NULL,
    updated_at timestamptz,
    cleared_at timestamptz NOT NULL,
    relid oid)
"""
CREATE_BACKUP_INDEX = "CREATE INDEX IF NOT EXISTS {name} ON {backup} (rollback_id, seq)"
# phase: walking (ctid batches, leaf by leaf) -> sweeping (rows the walk missed) ->
# finished; restored once restore_execution_id has put the values back.
CREATE_STATE = """
CREATE TABLE IF NOT EXISTS {state} (
    rollback_id uuid PRIMARY KEY,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    cutoff_date date NOT NULL,
    upper_bound timestamptz NOT NULL,
    matched_rows bigint NOT NULL,
    phase text NOT NULL,
    next_block bigint NOT NULL DEFAULT 0,
    cleared_rows bigint NOT NULL DEFAULT 0,
    batches integer NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    restored_at timestamptz,
    restored_rows bigint NOT NULL DEFAULT 0)
"""

_TRUST = """
SELECT c.relkind::text AS relkind, pg_get_userbyid(c.relowner) AS owner,
       c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)
         OR c.relowner = (SELECT relowner FROM pg_class WHERE oid = to_regclass(%(weeks)s))
         AS trusted_owner,
       c.relrowsecurity OR c.relforcerowsecurity AS rls,
       ARRAY(SELECT tgname::text FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal
             ORDER BY 1) AS triggers,
       ARRAY(SELECT rulename::text FROM pg_rewrite
             WHERE ev_class = c.oid AND rulename <> '_RETURN' ORDER BY 1) AS rules,
       EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = c.oid OR inhrelid = c.oid)
         AS inherits,
       ARRAY(SELECT p FROM unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) AS p
             WHERE has_table_privilege('public', c.oid, p)) AS public_writes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(name)s
"""


def _columns_of(conn: psycopg.Connection, schema: str, name: str) -> dict[str, tuple]:
    rows = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity::text
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
        """,
        [schema, name],
    ).fetchall()
    return {attname: tuple(rest) for attname, *rest in rows}


def trusted_table(
    conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables, name: str, expected: dict
) -> bool:
    """Whether `name` exists; refuses, naming what is wrong, a table not to be trusted."""
    row = conn.execute(
        _TRUST,
        {"schema": tables.schema, "name": name, "weeks": db.weeks.as_string(conn)},
    ).fetchone()
    if row is None:
        return False
    relkind, owner, trusted_owner, rls, triggers, rules, inherits, public_writes = row
    label = tables.label(name)
    found = _columns_of(conn, tables.schema, name)
    wrong = []
    if relkind != "r":
        wrong.append("it is not an ordinary table")
    if not trusted_owner:
        wrong.append(f"it belongs to {owner}, neither this role nor the weeks table's owner")
    if rls:
        wrong.append("it has row-level security")
    if triggers:
        wrong.append(f"it has triggers ({', '.join(triggers)})")
    if rules:
        wrong.append(f"it has rules ({', '.join(rules)})")
    if inherits:
        wrong.append("it has parent or child tables")
    if public_writes:
        wrong.append(f"PUBLIC may {', '.join(public_writes)} it")
    legacy = name == tables.backup_name and "relid" not in found
    want = {k: v for k, v in expected.items() if not (legacy and k == "relid")}
    if found != want:
        differing = sorted(set(found) ^ set(want) | {c for c in found if found[c] != want.get(c)})
        wrong.append(f"its columns differ from the rollback's ({', '.join(differing)})")
    if wrong:
        raise refuse(
            f"{label} exists but is not a table rdw_tracking can trust with a rollback's "
            f"backup: {'; '.join(wrong)}. Nothing was changed. Drop or rename it, or set "
            "backup_schema, backup_table or state_table to names of their own (in a schema "
            "where PUBLIC cannot create tables)"
        )
    if legacy:
        # A backup table from before partitions were known: give it the leaf column.
        try:
            conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN relid oid").format(tables.backup))
        except errors.InsufficientPrivilege:
            raise refuse(
                f"{label} predates partition support and needs a column relid oid; run "
                f"ALTER TABLE {label} ADD COLUMN relid oid as its owner {owner}"
            ) from None
    return True


def tables_present(conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables) -> bool:
    """Whether both tables exist; refuses when one exists but cannot be trusted."""
    backup = trusted_table(conn, db, tables, tables.backup_name, BACKUP_COLUMNS)
    state = trusted_table(conn, db, tables, tables.state_name, STATE_COLUMNS)
    return backup and state


def create_tables(conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables) -> None:
    # CREATE ... IF NOT EXISTS still needs CREATE on the schema: a role granted only
    # INSERT on tables its owner made must not get that far.
    if tables_present(conn, db, tables):
        return
    exists = conn.execute(
        "SELECT 1 FROM pg_namespace WHERE nspname = %s", [tables.schema]
    ).fetchone()
    try:
        if not exists:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(tables.schema)))
        conn.execute(sql.SQL(CREATE_BACKUP).format(backup=tables.backup))
        conn.execute(
            sql.SQL(CREATE_BACKUP_INDEX).format(
                name=sql.Identifier(f"{tables.backup_name[:50]}_rollback_seq"),
                backup=tables.backup,
            )
        )
        conn.execute(sql.SQL(CREATE_STATE).format(state=tables.state))
    except errors.InsufficientPrivilege:
        raise refuse(
            f"cannot create the backup tables {tables.label(tables.backup_name)} and "
            f"{tables.label(tables.state_name)}: permission denied; create them as their "
            "owner or set backup_schema to a schema this user may create tables in"
        ) from None


@dataclass
class RollbackState:
    """One row of the state table: a rollback's identity, fixed bound and progress."""

    rollback_id: str
    cutoff: dt.date
    upper_bound: dt.datetime
    matched_rows: int
    phase: str
    next_block: int
    cleared_rows: int
    batches: int
    started_at: dt.datetime | None = None


_STATE_SELECT = """
SELECT rollback_id::text, cutoff_date, upper_bound, matched_rows, phase, next_block,
       cleared_rows, batches, started_at
FROM {state}
WHERE schema_name = %(schema)s AND table_name = %(table)s
"""


def unfinished_rollbacks(
    conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables
) -> list[RollbackState]:
    """Rollbacks of this table that stopped before finishing (killed, or refused a batch)."""
    if not tables_present(conn, db, tables):
        return []
    rows = conn.execute(
        sql.SQL(_STATE_SELECT + " AND phase IN ('walking', 'sweeping') ORDER BY started_at").format(
            state=tables.state
        ),
        {"schema": db.schema_name, "table": db.weeks_table},
    ).fetchall()
    return [RollbackState(*row) for row in rows]


def find_rollback(
    conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables, rollback_id: str | None
) -> RollbackState | None:
    """The rollback `rollback_id` of this table, or its latest one when None."""
    if not tables_present(conn, db, tables):
        return None
    query = _STATE_SELECT + (
        " AND rollback_id = %(rid)s" if rollback_id else " ORDER BY started_at DESC LIMIT 1"
    )
    row = conn.execute(
        sql.SQL(query).format(state=tables.state),
        {"schema": db.schema_name, "table": db.weeks_table, "rid": rollback_id},
    ).fetchone()
    return RollbackState(*row) if row else None


# -- matching and planning ------------------------------------------------------------


# The run's row set; %(bound)s is the run's start, fixed for the run and all its resumptions.
def matched(alias: str | None = None) -> sql.Composed:
    """The run's predicate, its columns qualified by `alias` where given."""
    col = (lambda c: sql.Identifier(alias, c)) if alias else sql.Identifier
    return sql.SQL(
        "{e} IS NOT NULL AND {c} >= %(cutoff)s AND {c} < %(bound)s "
        "AND ({u} IS NULL OR {u} < %(bound)s)"
    ).format(e=col("execution_id"), c=col("created_at"), u=col("updated_at"))


MATCHED = matched()


def midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class Survey:
    """What one scan found: matched rows per heap block of each physical table (leaf) and
    per creation day. Blocks are per leaf: every partition or child has its own heap and
    repeats the others' ctids."""

    leaves: dict[int, list[tuple[int, int]]]  # leaf oid -> [(block, matched rows)]
    days: list[tuple[dt.date, int]]
    seconds: float

    @property
    def matched_rows(self) -> int:
        return sum(n for blocks in self.leaves.values() for _, n in blocks)

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """The blocks of a one-leaf table (an ordinary table)."""
        return [b for blocks in self.leaves.values() for b in blocks]


def survey(
    conn: psycopg.Connection, db: TargetDatabase, cutoff: dt.date, bound: dt.datetime
) -> Survey:
    """One scan of the table: matched rows per (leaf, block), for planning, and per day.

    On a table range-partitioned on created_at, the planner prunes every partition whose
    bounds lie wholly before the cutoff: they are never read."""
    started = time.monotonic()
    rows = conn.execute(
        sql.SQL(
            """
            SELECT GROUPING(leaf, block) = 0, leaf, block, day, count(*)
            FROM (SELECT tableoid::bigint AS leaf, (ctid::text::point)[0]::bigint AS block,
                         created_at::date AS day
                  FROM {weeks} WHERE {matched}) m
            GROUP BY GROUPING SETS ((leaf, block), (day))
            """
        ).format(weeks=db.weeks, matched=MATCHED),
        {"cutoff": midnight(cutoff), "bound": bound},
    ).fetchall()
    leaves: dict[int, list[tuple[int, int]]] = {}
    for _, leaf, block, _, n in sorted(r for r in rows if r[0]):
        leaves.setdefault(leaf, []).append((block, n))
    days = sorted((day, n) for by_block, _, _, day, n in rows if not by_block)
    return Survey(leaves, days, time.monotonic() - started)


class BlockWalk:
    """Contiguous block ranges `[start, end)` holding about `size` matched rows each, cut
    one at a time so that every batch can take a different size.

    `blocks` is (block, matched rows) in block order. The ranges tile everything from
    `from_block` to the last block that held a matched row. They stop there: the blocks
    after it fill with the new versions of the rows the walk clears, and walking them
    made the last batch the longest by far (seconds at 5M rows). A matched row that a
    writer moved past it is found by the final sweep.

    Each cut costs only the blocks it covers. Cutting the whole rest of the plan again
    after every resized batch cost up to 60 ms per batch at 5M rows (300k blocks), 10 s
    of a 36 s run.
    """

    def __init__(self, blocks: Sequence[tuple[int, int]], from_block: int = 0) -> None:
        self.blocks = blocks
        self.start = from_block
        self.i = bisect.bisect_left(blocks, (from_block,))

    @property
    def done(self) -> bool:
        return self.i >= len(self.blocks)

    def next(self, size: int) -> tuple[int, int]:
        """The next range, about `size` matched rows; a block fuller than that is a range
        of its own, never split."""
        lo, j, in_batch = self.start, self.i, 0
        while j < len(self.blocks):
            block, n = self.blocks[j]
            if in_batch and in_batch + n > size and block > lo:
                break
            in_batch += n
            j += 1
        hi = self.blocks[j][0] if j < len(self.blocks) else self.blocks[-1][0] + 1
        self.i, self.start = j, hi
        return lo, hi


# A batch holds its rows' locks until it commits: aim each at BATCH_TARGET_MS. After a
# batch much slower or faster than that, the next range is cut at a batch size scaled
# to match, between MIN_BATCH_ROWS and the configured batch_size.
#
# A batch must also write less WAL than the server's WAL buffers hold (wal_buffers: 4MB
# on a server with the stock 128MB shared_buffers, 16MB from 512MB up). A batch that
# overflows them writes WAL out itself, and waits for the WAL write lock while another
# session's commit is syncing: on a busy disk that turned ~100 ms batches into 300-770 ms
# ones (measured at 5M rows, benchmarks/RESULTS.md). So each batch is also capped at
# WAL_BUDGET_SHARE of wal_buffers, at the WAL per row the last batch wrote, and starts
# only once the buffers have room for it: while a sync holds the WAL write lock, the
# previous batches' WAL stays unwritten, and the batch that then ran out of buffers took
# the rest of the stall with its rows locked. Waiting before the batch, holding nothing,
# took the batches over 80 ms from 4-5 a run to 0-2 (5M rows, 4MB wal_buffers), for
# about 1 s of waits in a 33 s run.
BATCH_TARGET_MS = 100
MIN_BATCH_ROWS = 100
FIRST_BATCH_ROWS = 1_000
WAL_BUDGET_SHARE = 0.75


@dataclass(frozen=True)
class LastBatch:
    """What the previous batch of the walk took: rows, milliseconds, WAL bytes."""

    rows: int
    ms: float
    wal_bytes: int | None


def batch_rows(size: int, last: LastBatch, max_rows: int, wal_budget: int | None = None) -> int:
    """The batch size for the next batches, given what the last one took."""
    rows = size
    if last.ms > 0 and not BATCH_TARGET_MS / 2 <= last.ms <= BATCH_TARGET_MS:
        rows = int(size * BATCH_TARGET_MS / last.ms)
    if wal_budget and last.wal_bytes and last.rows:
        rows = min(rows, int(wal_budget * last.rows / last.wal_bytes))
    return max(MIN_BATCH_ROWS, min(max_rows, rows))


def estimate_seconds(matched_rows: int, scan_seconds: float) -> float:
    return round(2 * scan_seconds + matched_rows / ESTIMATED_ROWS_PER_S, 1)


# -- clearing ---------------------------------------------------------------------------

# One batch, one statement, on one leaf (a physical table: the table itself, a partition
# or an inheritance child; ONLY, so an inheritance parent's own rows): read the matched
# rows of the range, clear them by ctid and back up their old values. A ctid names a row
# only inside its own heap, so the statement never reaches past the leaf, and the backup
# records the leaf. The UPDATE re-checks the run's predicate on the row it changes. A row
# a writer updated after the read has a new ctid, so it is skipped here (never cleared
# without its latest values backed up) and found again by the final sweep. The
# ctid = ANY(...) keeps the UPDATE on a TID scan whatever the planner thinks of the
# batch's size.
CLEAR_BATCH = """
WITH old AS MATERIALIZED (
    SELECT ctid, execution_id, updated_at FROM ONLY {leaf} WHERE {where} AND {matched}
), cleared AS (
    UPDATE ONLY {leaf} w SET execution_id = NULL, updated_at = now()
    FROM old
    WHERE w.ctid = ANY(ARRAY(SELECT ctid FROM old)) AND w.ctid = old.ctid AND {matched_w}
    RETURNING w.id, old.execution_id, old.updated_at
"""
# ... and back the cleared rows up, tagged with the rollback and the leaf.
SAVE_CLEARED = """
), saved AS (
    INSERT INTO {backup} (rollback_id, relid, id, execution_id, updated_at, cleared_at)
    SELECT %(rid)s, %(leaf_oid)s::oid, id, execution_id, updated_at, now() FROM cleared
    RETURNING 1
)
SELECT count(*) FROM saved
"""
# From PostgreSQL 18, RETURNING old.* gives the values the UPDATE replaced: one scan of
# the range, no read-then-join. A row a writer updated meanwhile is re-checked (range and
# predicate) on its newest version, and old.* are that version's values.
CLEAR_BATCH_18 = """
WITH cleared AS (
    UPDATE ONLY {leaf} w SET execution_id = NULL, updated_at = now()
    WHERE {where} AND {matched_w}
    RETURNING w.id, old.execution_id, old.updated_at
"""
RETURNING_OLD = 180000
IN_BLOCKS = sql.SQL("ctid >= %(lo)s::tid AND (%(hi)s::tid IS NULL OR ctid < %(hi)s::tid)")
BY_CTID = sql.SQL("ctid = ANY(%(ctids)s::tid[])")
ADVANCE = """
UPDATE {state} SET phase = %(phase)s, next_block = %(next)s,
    cleared_rows = cleared_rows + %(cleared)s, batches = batches + 1
WHERE rollback_id = %(rid)s
"""


class LeafGone(Exception):
    """The leaf a batch was about to change is no longer part of the table (a partition
    detached, a child no longer inheriting, or renamed away): its rows are left alone."""


@dataclass(frozen=True)
class Leaf:
    """One physical table of the weeks table, by oid, under the name it has now."""

    oid: int
    ident: sql.Identifier
    label: str

    @classmethod
    def find(cls, conn: psycopg.Connection, oid: int) -> "Leaf | None":
        found = member_by_oid(conn, oid)
        if found is None:
            return None
        return cls(oid, sql.Identifier(*found), ".".join(found))


def still_a_leaf(conn: psycopg.Connection, root_oid: int, leaf: Leaf) -> bool:
    """Run inside a batch, after its UPDATE took the leaf's lock (so no DETACH can commit
    until the batch does): whether the name still names this leaf, in this table."""
    same = conn.execute(
        "SELECT to_regclass(%s)::oid = %s::oid", [leaf.ident.as_string(conn), leaf.oid]
    ).fetchone()[0]
    return bool(same) and is_member(conn, root_oid, leaf.oid)


# Sessions that can be in a batch's way: open transactions holding more than a read lock
# on one of the tables (a row lock comes with ROW SHARE, a write with ROW EXCLUSIVE). Row
# locks themselves are not in pg_locks, so this names every such session, oldest first.
_LOCK_HOLDERS = """
SELECT a.pid, a.application_name, a.query_start, a.state
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL
  AND EXISTS (SELECT 1 FROM pg_locks l
              WHERE l.pid = a.pid AND l.granted AND l.locktype = 'relation'
                AND l.mode <> 'AccessShareLock'
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.relation = ANY(ARRAY(SELECT to_regclass(t) FROM unnest(%s::text[]) AS t)))
ORDER BY a.xact_start, a.pid
"""


def lock_holders(conn: psycopg.Connection, tables: Sequence[sql.Identifier]) -> list[Session]:
    """Other sessions holding more than a read lock on `tables`, oldest transaction first."""
    names = [table.as_string(conn) for table in tables]
    return [Session(*row) for row in conn.execute(_LOCK_HOLDERS, [names]).fetchall()]


@contextmanager
def batch_connection(
    db: TargetDatabase, application_name: str, lock_timeout_ms: int, job: str = ROLLBACK_JOB
):
    """An autocommit connection named `application_name`; each batch is one explicit
    transaction on it. A lock wait outside the batches (another session holding the
    whole table) and a lost connection end `job` with a message saying who and what next."""
    weeks = db.qualified(db.weeks_table)
    with db.connect(autocommit=True) as conn:
        conn.execute("SELECT set_config('application_name', %s, false)", [application_name])
        conn.execute("SELECT set_config('lock_timeout', %s, false)", [f"{lock_timeout_ms}ms"])
        try:
            yield conn
        except errors.LockNotAvailable:
            holders = describe(lock_holders(conn, [db.weeks]))
            raise refuse(
                f"{job} gave up after waiting {lock_timeout_ms} ms for a lock on {weeks} held "
                f"by {holders}; run {job} again once that session has finished",
                blocking_sessions=holders,
            ) from None
        except psycopg.OperationalError:
            if not conn.broken:  # a cancelled statement, not a lost connection
                raise
            raise refuse(
                f"the connection to {db.describe()} was lost during {job} of {weeks}; every "
                f"finished batch is committed: run {job} again with the same config to "
                "continue where it stopped"
            ) from None


def in_one_transaction(
    conn: psycopg.Connection, work, what: str, tables: Sequence[sql.Identifier] = ()
) -> tuple[Any, float]:
    """`work(conn)` in a transaction, retried after a lock timeout or deadlock; (result, ms).

    Gives up after LOCK_ATTEMPTS, naming the sessions holding locks on `tables`.

    The transaction commits without waiting for its WAL to reach disk (synchronous_commit
    off, for it alone): a batch's commit then never queues behind a checkpoint's fsyncs,
    which made the longest batches. Nothing can be lost by it. A server crash can undo
    only whole batches (rows, their backup and the progress mark commit together), and
    the next run does them again; the callers end with a normal commit (the run marked
    finished), which flushes every batch before the job reports success.
    """
    for attempt in range(LOCK_ATTEMPTS):
        try:
            check_write_lock()  # a job whose write lock was lost must not write on
        except dg.Failure:
            # A server restart ends this session too: then say so (and how to continue).
            conn.execute("SELECT 1")
            raise
        started = time.monotonic()
        try:
            with conn.transaction():
                conn.execute("SET LOCAL synchronous_commit = off")
                result = work(conn)
            return result, (time.monotonic() - started) * 1000
        except (errors.LockNotAvailable, errors.DeadlockDetected):
            time.sleep(0.1 * 2**attempt)
    lock_timeout = conn.execute("SHOW lock_timeout").fetchone()[0]
    holders = describe(lock_holders(conn, tables))
    raise refuse(
        f"{what}: rows stayed locked by other transactions through {LOCK_ATTEMPTS} attempts "
        f"of up to {lock_timeout} each; held by {holders}. End that session or let it "
        "finish, then run the job again to continue",
        blocking_sessions=holders,
    )


@dataclass
class Progress:
    """Counts of one run, logged every few seconds: done of total, rate, time left."""

    total: int
    done: int = 0
    batches: int = 0
    longest_ms: float = 0.0
    started: float = field(default_factory=time.monotonic)
    logged: float = field(default_factory=time.monotonic)

    def add(self, rows: int, ms: float) -> None:
        self.done += rows
        self.batches += 1
        self.longest_ms = max(self.longest_ms, ms)

    def line(self, verb: str, done_before: int = 0) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        done = done_before + self.done
        left = (self.total - done) / rate if rate else float("nan")
        pct = 100 * done / self.total if self.total else 100.0
        return (
            f"{verb} {done:,} of {self.total:,} rows ({pct:.1f}%), "
            f"{rate:,.0f} rows/s, about {max(left, 0):,.0f} s left"
        )

    def due(self) -> bool:
        if time.monotonic() - self.logged >= PROGRESS_EVERY_S:
            self.logged = time.monotonic()
            return True
        return False


def wal_buffers_bytes(conn: psycopg.Connection) -> int | None:
    """The server's wal_buffers in bytes."""
    try:
        return int(
            conn.execute("SELECT pg_size_bytes(current_setting('wal_buffers'))").fetchone()[0]
        )
    except psycopg.Error:
        return None


def wait_for_wal_room(conn: psycopg.Connection, most_unflushed: int) -> float:
    """Between batches, holding no lock: when more than `most_unflushed` bytes of WAL
    are not yet on disk, flush them ourselves (one synchronous commit of an empty
    transaction); seconds it took.

    The batches commit without waiting for their WAL to reach disk. Left to the WAL
    writer (every wal_writer_delay, 200 ms), that WAL piles up: the next batch then ran
    out of WAL buffers inside its transaction, holding its rows' locks, and a writer's
    own commit had to flush all of it first. Polling for the WAL writer instead cost up
    to 200 ms per batch (9.5 s of a 17 s run, 1M rows, 4MB wal_buffers)."""
    started = time.monotonic()
    if catalog.wal_unflushed(conn) > most_unflushed:
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = on")
            conn.execute("SELECT pg_current_xact_id()")  # an xid: its commit flushes
    return time.monotonic() - started


def wait_for_older_transactions(conn: psycopg.Connection, bound: dt.datetime, log) -> None:
    """Let transactions begun before `bound` finish: rows they insert are dated before it,
    so the plan must see them committed."""
    deadline = time.monotonic() + IN_FLIGHT_WAIT_S
    while True:
        pids = [
            pid
            for (pid,) in conn.execute(
                """
                SELECT pid FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()
                  AND backend_type = 'client backend' AND xact_start < %s
                """,
                [bound],
            ).fetchall()
        ]
        if not pids:
            return
        if time.monotonic() > deadline:
            log.warning(
                f"transactions begun before the run's start are still open (pids {pids}); "
                "rows they insert later dated before it are cleared by the final sweep if seen"
            )
            return
        time.sleep(0.05)


# -- the rollback -----------------------------------------------------------------------


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

    def metadata(self) -> dict[str, Any]:
        daily = dg.MetadataValue.table(
            records=[
                dg.TableRecord({"creation_date": day.isoformat(), "matched_rows": n})
                for day, n in self.days
            ],
            schema=dg.TableSchema(
                columns=[
                    dg.TableColumn("creation_date", "date"),
                    dg.TableColumn("matched_rows", "int"),
                ]
            ),
        )
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
            "daily": daily,
        }


def rollback(
    db: TargetDatabase, config: RollbackConfig, log: logging.Logger | Any
) -> RollbackReport:
    """Dry run or real run of the rollback; the asset's whole job, callable without Dagster."""
    started = time.monotonic()
    tables = BackupTables.of(db, config)
    weeks = db.qualified(db.weeks_table)
    # Before anything else: a refusal for want of a grant must leave nothing half done.
    refuse_without_grants(db, ROLLBACK_JOB, [weeks_need(db, "SELECT")])
    layout = layout_or_refuse(db, ROLLBACK_JOB)
    needs = rollback_needs(db, tables, layout)
    if config.dry_run:
        role, missing = missing_grants(db, needs)
        if missing:
            log.warning(f"a real run as role {role} would be refused: " + "; ".join(missing))
    else:
        refuse_without_grants(db, ROLLBACK_JOB, needs)
    if layout.is_tree:
        log.info(f"{layout.describe()}: the run clears one physical table at a time")
    with batch_connection(db, ROLLBACK_APPLICATION_NAME, config.lock_timeout_ms) as conn:
        unfinished = unfinished_rollbacks(conn, db, tables)
        resume = next((r for r in unfinished if r.cutoff == config.cutoff), None)
        other = next((r for r in unfinished if r.cutoff != config.cutoff), None)
        if other and not resume:
            message = (
                f"rollback {other.rollback_id} of {weeks} with cutoff_date {other.cutoff} "
                f"stopped after {other.cleared_rows:,} of {other.matched_rows:,} rows; run "
                f"{ROLLBACK_JOB} with cutoff_date {other.cutoff} to finish it (or "
                f"{RESTORE_JOB} with its rollback_id to undo it) before another"
            )
            if not config.dry_run:
                raise refuse(message)
            log.warning(message)
        if resume:
            bound = resume.upper_bound
            if bound > conn.execute("SELECT now()").fetchone()[0]:
                raise refuse(
                    f"rollback {resume.rollback_id} in {tables.label(tables.state_name)} has "
                    f"its upper bound {bound.isoformat()} in the future, which no rollback "
                    "run writes; nothing was changed. Check who writes to that table, and "
                    "delete that row or set state_table to a table of its own"
                )
        else:
            bound = conn.execute("SELECT now()").fetchone()[0]
            if not config.dry_run:
                wait_for_older_transactions(conn, bound, log)
        # Cleared rows no longer match, so a resumed run's scan finds just what is left.
        found = survey(conn, db, config.cutoff, bound)
        report = RollbackReport(
            dry_run=config.dry_run,
            cutoff=config.cutoff,
            matched_rows=resume.matched_rows if resume else found.matched_rows,
            cleared_rows=resume.cleared_rows if resume else 0,
            batches=resume.batches if resume else 0,
            rollback_id=resume.rollback_id if resume else None,
            upper_bound=bound,
            resumed=resume is not None,
            days=found.days,
            estimated_seconds=estimate_seconds(found.matched_rows, found.seconds),
            backup_table=tables.label(tables.backup_name),
            layout=layout.describe(),
        )
        if resume:
            log.info(
                f"continuing rollback {resume.rollback_id} of {weeks} (cutoff_date "
                f"{resume.cutoff}, rows created before {bound.isoformat()}): "
                f"{resume.cleared_rows:,} of {resume.matched_rows:,} rows already cleared, "
                f"{found.matched_rows:,} left"
            )
        else:
            log.info(
                f"{found.matched_rows:,} rows of {weeks} have execution_id and were created "
                f"from {config.cutoff} to {bound.isoformat()} (scan {found.seconds:.1f} s)"
            )
        if config.expected_rows is not None and config.expected_rows != report.matched_rows:
            raise refuse(
                f"expected_rows is {config.expected_rows:,} but {report.matched_rows:,} rows of "
                f"{weeks} match cutoff_date {config.cutoff}; nothing was changed. Check the "
                "dry run's matched_rows and run again with expected_rows set to it"
            )
        if config.dry_run or (report.matched_rows == 0 and not resume):
            report.seconds = time.monotonic() - started
            return report

        if not resume:
            create_tables(conn, db, tables)
            resume = RollbackState(
                str(uuid.uuid4()), config.cutoff, bound, found.matched_rows, "walking", 0, 0, 0
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {state} (rollback_id, schema_name, table_name, cutoff_date, "
                    "upper_bound, matched_rows, phase) VALUES (%s, %s, %s, %s, %s, %s, 'walking')"
                ).format(state=tables.state),
                [
                    resume.rollback_id,
                    db.schema_name,
                    db.weeks_table,
                    config.cutoff,
                    bound,
                    found.matched_rows,
                ],
            )
            report.rollback_id = resume.rollback_id
            log.info(f"rollback {resume.rollback_id}: backing up into {report.backup_table}")
        wal_start = catalog.wal_lsn(conn)
        try:
            clear(conn, db, tables, config, resume, found, report, log, layout)
        except psycopg.OperationalError:
            if not conn.broken:  # a cancelled statement, not a lost connection
                raise
            raise refuse(
                f"the connection to {db.describe()} was lost during rollback "
                f"{resume.rollback_id} of {weeks}; every finished batch is committed with "
                f"its backup: run {ROLLBACK_JOB} again with cutoff_date {config.cutoff} to "
                "continue"
            ) from None
        report.wal_bytes = catalog.wal_bytes(wal_start, catalog.wal_lsn(conn))
    report.seconds = time.monotonic() - started
    log.info(
        f"rollback {report.rollback_id} finished: cleared {report.cleared_rows:,} of "
        f"{report.matched_rows:,} rows of {weeks} in {report.batches:,} batches "
        f"(longest {report.longest_batch_ms:,.0f} ms), backup in {report.backup_table}"
    )
    return report


@dataclass
class Walker:
    """One real run's batches: each clears part of one leaf in its own transaction, backs
    its rows up and advances the state row; sizes follow the time aim and the WAL room."""

    conn: psycopg.Connection
    db: TargetDatabase
    tables: BackupTables
    state: RollbackState
    root_oid: int
    max_rows: int
    log: Any
    # The table's leaves when the run started: the matched set is their rows. A partition
    # attached later brings rows the dry run never counted; they are left alone.
    leaves: frozenset[int] = frozenset()
    progress: Progress = field(init=False)
    wal_buffers: int | None = field(init=False)
    wal_budget: int | None = field(init=False)
    capped: bool = False
    wal_waited: float = 0.0
    gone: list[str] = field(default_factory=list)
    strangers: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.progress = Progress(total=self.state.matched_rows - self.state.cleared_rows)
        self.wal_buffers = wal_buffers_bytes(self.conn)
        self.wal_budget = int(self.wal_buffers * WAL_BUDGET_SHARE) if self.wal_buffers else None
        self.mark = catalog.wal_lsn(self.conn)  # where the next batch's WAL starts
        self.params = {
            "cutoff": midnight(self.state.cutoff),
            "bound": self.state.upper_bound,
            "rid": self.state.rollback_id,
        }
        self.what = f"rollback {self.state.rollback_id} of {self.db.qualified(self.db.weeks_table)}"

    def batch(
        self, leaf: Leaf, where: sql.Composable, extra: dict, phase: str, next_block: int
    ) -> LastBatch:
        """Clear the matched rows of `leaf` that `where` selects; LeafGone if it left."""
        if self.wal_budget:
            self.wal_waited += wait_for_wal_room(self.conn, self.wal_buffers - self.wal_budget)
        template = CLEAR_BATCH_18 if self.conn.info.server_version >= RETURNING_OLD else CLEAR_BATCH
        statement = sql.SQL(template.rstrip() + SAVE_CLEARED).format(
            leaf=leaf.ident,
            backup=self.tables.backup,
            where=where,
            matched=MATCHED,
            matched_w=matched("w"),
        )
        advance = sql.SQL(ADVANCE).format(state=self.tables.state)

        def work(c: psycopg.Connection) -> int:
            n = c.execute(statement, {**self.params, **extra, "leaf_oid": leaf.oid}).fetchone()[0]
            if not still_a_leaf(c, self.root_oid, leaf):
                raise LeafGone(leaf.label)  # rolls the batch back: nothing changed there
            c.execute(
                advance,
                {"phase": phase, "next": next_block, "cleared": n, "rid": self.state.rollback_id},
            )
            return n

        n, ms = in_one_transaction(
            self.conn, work, self.what, [self.db.weeks, self.tables.backup, self.tables.state]
        )
        self.progress.add(n, ms)
        if self.progress.due():
            self.log.info(self.progress.line("cleared", self.state.cleared_rows))
        start, self.mark = self.mark, catalog.wal_lsn(self.conn)
        return LastBatch(n, ms, catalog.wal_bytes(start, self.mark))

    def resize(self, size: int, done: LastBatch) -> int:
        resized = batch_rows(size, done, self.max_rows, self.wal_budget)
        if not self.capped and resized < batch_rows(size, done, self.max_rows):
            self.capped = True
            self.log.info(
                f"batches of {resized:,} rows, each writing at most "
                f"{self.wal_budget / 2**20:.1f} MB of WAL to stay within wal_buffers "
                f"({self.wal_buffers / 2**20:.0f} MB); a larger "
                "wal_buffers allows larger, faster batches"
            )
        return resized

    def left_alone(self, label: str) -> None:
        self.gone.append(label)
        self.log.warning(
            f"{label} left {self.db.qualified(self.db.weeks_table)} during {self.what} "
            "(detached, no longer inheriting, or renamed): its rows are no longer part of "
            "the table and were left alone"
        )

    def ours(self, oid: int) -> bool:
        if oid in self.leaves:
            return True
        if oid not in self.strangers:
            self.strangers.add(oid)
            found = Leaf.find(self.conn, oid)
            self.not_ours(found.label if found else f"table oid {oid}")
        return False

    def not_ours(self, label: str) -> None:
        self.log.warning(
            f"{label} joined {self.db.qualified(self.db.weeks_table)} after {self.what} "
            "started: its rows were not part of the table when the run fixed its row set, "
            "and are left alone (run the rollback again to clear them)"
        )

    def walk(self, found: Survey, size: int) -> int:
        """Every leaf's planned block ranges in turn, one leaf at a time; the batch size."""
        for oid, blocks in sorted(found.leaves.items()):
            leaf = Leaf.find(self.conn, oid)
            if oid not in self.leaves:
                self.not_ours(leaf.label if leaf else f"table oid {oid}")
                continue
            if leaf is None:
                self.left_alone(f"table oid {oid}")
                continue
            walk = BlockWalk(blocks)
            try:
                while not walk.done:
                    lo, hi = walk.next(size)
                    done = self.batch(
                        leaf, IN_BLOCKS, {"lo": f"({lo},0)", "hi": f"({hi},0)"}, "walking", hi
                    )
                    size = self.resize(size, done)
            except LeafGone:
                self.left_alone(leaf.label)
        return size

    def sweep(self, size: int) -> int:
        """Rows the walk skipped or missed (updated meanwhile, or moved behind it) still
        match: find them by (leaf, ctid), a few rounds while writers keep touching them."""
        find = sql.SQL("SELECT tableoid::bigint, ctid::text FROM {weeks} WHERE {matched}").format(
            weeks=self.db.weeks, matched=MATCHED
        )
        swept = 0
        for _ in range(SWEEP_ROUNDS):
            leftover: dict[int, list[str]] = {}
            for oid, ctid in self.conn.execute(find, self.params).fetchall():
                leftover.setdefault(oid, []).append(ctid)
            if not leftover:
                return swept
            leftover = {oid: ctids for oid, ctids in leftover.items() if self.ours(oid)}
            if not leftover:
                return swept
            for oid, ctids in sorted(leftover.items()):
                leaf = Leaf.find(self.conn, oid)
                try:
                    if leaf is None:
                        raise LeafGone(f"table oid {oid}")
                    for i in range(0, len(ctids), size):
                        chunk = {"ctids": ctids[i : i + size]}
                        swept += self.batch(leaf, BY_CTID, chunk, "sweeping", 0).rows
                except LeafGone as gone:
                    self.left_alone(str(gone))
        left = sum(1 for oid, _ in self.conn.execute(find, self.params) if oid in self.leaves)
        if left:
            raise refuse(
                f"{self.what}: {left:,} matched rows kept changing under {SWEEP_ROUNDS} "
                f"sweeps; run {ROLLBACK_JOB} again with cutoff_date {self.state.cutoff} to "
                "continue once writes calm down"
            )
        return swept


def clear(
    conn: psycopg.Connection,
    db: TargetDatabase,
    tables: BackupTables,
    config: RollbackConfig,
    state: RollbackState,
    found: Survey,
    report: RollbackReport,
    log,
    layout: Layout,
) -> None:
    """Walk the planned block ranges leaf by leaf, then sweep up rows that moved; mark the
    run finished."""
    leaves = frozenset(m.oid for m in layout.leaves)
    walker = Walker(conn, db, tables, state, layout.root.oid, config.batch_size, log, leaves)
    size = min(config.batch_size, FIRST_BATCH_ROWS)  # a probe, then sized by time and WAL
    if state.phase == "walking":
        size = walker.walk(found, size)
    swept = walker.sweep(size)
    conn.execute(
        sql.SQL(
            "UPDATE {state} SET phase = 'finished', finished_at = now() WHERE rollback_id = %s"
        ).format(state=tables.state),
        [state.rollback_id],
    )
    if swept:
        log.info(f"the final sweep cleared {swept:,} rows that moved during the walk")
    if walker.wal_waited >= 1:
        log.info(
            f"between batches, the run waited {walker.wal_waited:,.1f} s in all for the "
            "server to write out WAL (its disk was busy); no row was locked while it waited"
        )
    progress = walker.progress
    report.cleared_rows = state.cleared_rows + progress.done
    report.cleared_this_run = progress.done
    report.batches = state.batches + progress.batches
    report.longest_batch_ms = progress.longest_ms
    report.swept_rows = swept
    report.leaves_walked = len(found.leaves)
    report.leaves_left_alone = walker.gone


# -- Dagster definitions ----------------------------------------------------------------


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
    continues the same rollback. `restore_execution_id` undoes it.
    """
    if config.dry_run:
        report = rollback(target_db, config, context.log)
    else:
        with exclusive_write(target_db, ROLLBACK_JOB):
            report = rollback(target_db, config, context.log)
    return dg.MaterializeResult(metadata=report.metadata())


rollback_assets = [execution_id_rollback]
