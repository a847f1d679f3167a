"""The tally of a target database kept in Dagster's storage, brought up to date per run.

The tally (`rdw_tracking.tally`) is stored in the instance's key-value store, in the
same PostgreSQL that holds runs and events, so a run on any machine finds the one the
previous run left. Its key names the server, database and table, never a credential.
"""

from dataclasses import dataclass
from urllib.parse import quote

import dagster as dg
import psycopg
from psycopg import sql

from rdw_tracking import catalog
from rdw_tracking.errors import refuse
from rdw_tracking.layout import Layout, table_layout
from rdw_tracking.premises import Hints, read_hints
from rdw_tracking.resources import TargetDatabase, server_of
from rdw_tracking.tally import Budget, Tables, Tally, update

CREATED_AT_INDEX = "idx_report_data_weeks_created_at"
KEY_PREFIX = "rdw_tracking/tally/"


def tally_key(db: TargetDatabase, cur: psycopg.Cursor) -> str:
    """Host, port, hostaddr, database, schema and table, each percent-quoted whole (a
    `.` or `/` in a name included), so that no two targets share a key."""
    endpoint = db.endpoint()
    hostaddr = server_of(db.resolved_url())[1]
    database = cur.execute("SELECT current_database()").fetchone()[0]
    parts = (endpoint.host, endpoint.port, hostaddr, database, db.schema_name, db.weeks_table)
    return KEY_PREFIX + "/".join(quote(str(part), safe="") for part in parts)


def load(instance: dg.DagsterInstance, key: str) -> Tally | None:
    text = instance.run_storage.get_cursor_values({key}).get(key)
    return Tally.from_json(text) if text else None


def save(instance: dg.DagsterInstance, key: str, tally: Tally) -> None:
    instance.run_storage.set_cursor_values({key: tally.to_json()})


@dataclass(frozen=True)
class Current:
    """A tally brought up to date, with what it was brought up from."""

    tally: Tally
    previous: Tally | None
    layout: Layout


def weeks_layout(cur: psycopg.Cursor, db: TargetDatabase) -> Layout:
    layout = table_layout(cur, db.schema_name, db.weeks_table)
    if layout is None or layout.kind not in ("ordinary", "partitioned", "inheritance"):
        what = "does not exist" if layout is None else f"is a {layout.kind}, not a table"
        raise refuse(
            f"table {db.qualified(db.weeks_table)} {what}; check target_db.schema_name and "
            "weeks_table"
        )
    return layout


def unindexed_leaves(cur: psycopg.Cursor, layout: Layout) -> list[str]:
    missing = set(catalog.without_leading_index(cur, [m.oid for m in layout.leaves], "created_at"))
    return [m.label for m in layout.leaves if m.oid in missing]


SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"


@dataclass(frozen=True)
class Opened:
    """A validation's snapshot, opened: the table's layout, what a missing created_at
    index costs ('' when none is missing), and the counters read just before it."""

    layout: Layout
    note: str
    hints: Hints | None  # None: no budget, the counters are not read


def begin(cur: psycopg.Cursor, db: TargetDatabase, budget_hours: float = 0.0) -> Opened:
    """Open a validation's snapshot on `cur` and refuse a missing weeks table. Under a
    budget the counters are read first, in a transaction of their own: counters read
    after the snapshot could count a change the snapshot does not see."""
    hints = None
    if budget_hours > 0:
        _refuse_missing(cur, db)
        hints = read_hints(cur, [m.oid for m in weeks_layout(cur, db).leaves])
        cur.connection.rollback()
    open_snapshot(cur, db)
    layout = weeks_layout(cur, db)
    if hints and tuple(m.oid for m in layout.leaves) != hints.leaves:
        hints = Hints(hints.counters, "the table's partitions changed as the run began")
    return Opened(layout, index_note(db, unindexed_leaves(cur, layout)), hints)


def open_snapshot(cur: psycopg.Cursor, db: TargetDatabase) -> None:
    """Begin the snapshot with the weeks table (and its partitions or children) held in
    ACCESS SHARE mode: the lock comes first, so the snapshot is taken after it and no
    DETACH, NO INHERIT, DROP or TRUNCATE can change the tree between the two. Rows of a
    partition detached during the run would otherwise vanish from a snapshot that
    holds them. Only ACCESS EXCLUSIVE waits for it, as for any query on the table."""
    for lock in (LOCK_TREE, LOCK_PARENT):
        cur.execute(SNAPSHOT)
        try:
            cur.execute(sql.SQL(lock).format(db.weeks))
            break
        except psycopg.errors.InsufficientPrivilege:
            cur.connection.rollback()  # no SELECT on a partition: hold the parent alone
            if lock == LOCK_PARENT:
                raise
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
            cur.connection.rollback()
            _refuse_missing(cur, db)
            raise


LOCK_TREE = "LOCK TABLE {} IN ACCESS SHARE MODE"
LOCK_PARENT = "LOCK TABLE ONLY {} IN ACCESS SHARE MODE"


def _refuse_missing(cur: psycopg.Cursor, db: TargetDatabase) -> None:
    if not catalog.table_exists(cur, db.schema_name, db.weeks_table):
        raise refuse(
            f"table {db.qualified(db.weeks_table)} does not exist; "
            "check target_db.schema_name and weeks_table"
        )


def bring_up_to_date(
    cur: psycopg.Cursor,
    db: TargetDatabase,
    instance: dg.DagsterInstance,
    layout: Layout,
    budget: Budget | None = None,
) -> Current:
    """The stored tally brought up to date, and stored again. `cur` is in a transaction
    begun with SNAPSHOT, so that every count sees the same rows; every leaf of `layout`
    has an index led by created_at (`begin` found no `note`)."""
    with_executions = catalog.table_exists(cur, db.schema_name, db.executions_table)
    key = tally_key(db, cur)
    previous = load(instance, key)
    executions = db.executions if with_executions else None
    for _ in range(TREE_ATTEMPTS):
        tally = update(
            cur, Tables(db.weeks, executions, layout, created_at_indexed=True), previous, budget
        )
        # ATTACH PARTITION (or INHERIT) does not wait for the run's ACCESS SHARE lock: a
        # count made while the tree changed is made again on the tree as it is now.
        now = weeks_layout(cur, db)
        if [m.oid for m in now.leaves] == [m.oid for m in layout.leaves]:
            save(instance, key, tally)
            return Current(tally, previous, layout)
        layout, budget = now, None
    raise refuse(
        f"the partitions or child tables of {db.qualified(db.weeks_table)} changed during "
        f"each of {TREE_ATTEMPTS} counts; run the validation again once partition "
        "maintenance is done"
    )


TREE_ATTEMPTS = 3


def index_note(db: TargetDatabase, unindexed: list[str]) -> str:
    """What a missing created_at index costs, and the fix; '' when every leaf has one."""
    if not unindexed:
        return ""
    where = ", ".join(unindexed[:5]) + (" ..." if len(unindexed) > 5 else "")
    return (
        f"no index led by created_at on {where}: validation reads the whole table each run; "
        f"build the opt-in {CREATED_AT_INDEX} with the create_execution_id_indexes job (run "
        "config ops.execution_id_indexes.config.report_data_weeks_created_at: true)"
    )


def budget(
    cur: psycopg.Cursor, hours: float, hints: Hints | None, window_days: int
) -> Budget | None:
    """What a run may take from an earlier count: None without a budget; days of the
    recent window (the checks judge them) are always counted."""
    if hours <= 0 or hints is None:
        return None
    window_start = cur.execute(
        "SELECT CURRENT_DATE - %(days)s::int", {"days": window_days}
    ).fetchone()[0]
    return Budget(hours, hints, window_start)
