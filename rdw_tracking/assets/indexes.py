"""The spec's "Index Considerations": the two partial indexes on `execution_id`, built
online with `CREATE INDEX CONCURRENTLY` on a table that keeps taking writes — an
ordinary table, each partition of a partitioned one, or each table of an inheritance
tree.

`build_index()` is the one safe way this project builds an index; the index asset, the
foreign-key job and the opt-in `workflow_executions(completed_at)` index all use it.
"""

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol, TypeVar

import dagster as dg
import psycopg
from psycopg import sql
from pydantic import Field, field_validator, model_validator

from rdw_tracking import catalog
from rdw_tracking.assets import GROUP, READ_RETRY, WRITE_POOL
from rdw_tracking.assets.tables import report_data_weeks, workflow_executions
from rdw_tracking.errors import refuse
from rdw_tracking.layout import Layout, Member, table_layout
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.writes import Need, exclusive_write, refuse_without_grants

# No `from __future__ import annotations` here: Dagster reads the Config annotation at runtime.

EXECUTION_ID_INDEX = "idx_report_data_weeks_execution_id"
COLLECTION_EXECUTION_INDEX = "idx_report_data_weeks_collection_execution"
COMPLETED_AT_INDEX = "idx_workflow_executions_completed_at"
CREATED_AT_INDEX = "idx_report_data_weeks_created_at"
TRACKED = "execution_id IS NOT NULL"

T = TypeVar("T")


class Log(Protocol):
    def info(self, msg: str) -> Any: ...
    def warning(self, msg: str) -> Any: ...


# -- what an index should be -----------------------------------------------------------


@dataclass(frozen=True)
class IndexSpec:
    """A plain btree index: `name` on `table(columns)`, partial when `predicate` is set.

    `schema` is the table's (and so the index's) schema; None: `target_db.schema_name`.
    A partition may live in another schema than its parent.
    """

    name: str
    table: str
    columns: tuple[str, ...]
    predicate: str | None = None  # SQL text written in this module, never from config
    schema: str | None = None

    def schema_of(self, db: TargetDatabase) -> str:
        return self.schema or db.schema_name

    def where(self, db: TargetDatabase) -> str:
        """`schema.index`, for messages."""
        return f"{self.schema_of(db)}.{self.name}"

    def table_label(self, db: TargetDatabase) -> str:
        return f"{self.schema_of(db)}.{self.table}"

    def _create(self, db: TargetDatabase, template: str) -> sql.Composed:
        statement = sql.SQL(template).format(
            name=sql.Identifier(self.name),
            table=sql.Identifier(self.schema_of(db), self.table),
            columns=sql.SQL(", ").join(map(sql.Identifier, self.columns)),
        )
        if self.predicate:
            statement += sql.SQL(" WHERE ") + sql.SQL(self.predicate)
        return statement

    def create(self, db: TargetDatabase) -> sql.Composed:
        return self._create(db, "CREATE INDEX CONCURRENTLY {name} ON {table} ({columns})")

    def create_on_only(self, db: TargetDatabase) -> sql.Composed:
        """The partitioned parent's index alone: INVALID until every partition's is attached."""
        return self._create(db, "CREATE INDEX {name} ON ONLY {table} ({columns})")

    def attach(self, db: TargetDatabase, partition_index: "IndexSpec") -> sql.Composed:
        return sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
            sql.Identifier(self.schema_of(db), self.name),
            sql.Identifier(partition_index.schema_of(db), partition_index.name),
        )

    def drop(self, db: TargetDatabase) -> sql.Composed:
        return sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
            sql.Identifier(self.schema_of(db), self.name)
        )

    def definition(self, db: TargetDatabase) -> str:
        """How the index reads in `pg_indexes`, for messages."""
        where = f" WHERE ({self.predicate})" if self.predicate else ""
        return (
            f"CREATE INDEX {self.name} ON {self.table_label(db)} "
            f"USING btree ({', '.join(self.columns)}){where}"
        )

    def on_member(self, member: Member) -> "IndexSpec":
        """The same index on one partition or child table, under a name derived from both."""
        return IndexSpec(
            member_index_name(self, member.name),
            member.name,
            self.columns,
            self.predicate,
            member.schema,
        )


def member_index_name(spec: IndexSpec, table: str) -> str:
    """`idx_<partition>_<what>` (`idx_report_data_weeks_p202401_execution_id`): the
    contract's naming, applied to the partition; at most 63 bytes, a short hash of the
    full name keeping two long names apart."""
    prefixes = (f"idx_{spec.table}_", "idx_report_data_weeks_", "idx_")  # any weeks_table
    what = next(spec.name[len(p) :] for p in (*prefixes, "") if spec.name.startswith(p))
    name = f"idx_{table}_{what}"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.md5(name.encode()).hexdigest()[:8]
    room = 63 - len(f"idx__{digest}_{what}".encode())
    if room < 8:  # a very long `what`: keep the table's start and the hash
        return f"idx_{_truncate(table, 63 - 13)}_{digest}"
    return f"idx_{_truncate(table, room)}_{digest}_{what}"


def _truncate(text: str, max_bytes: int) -> str:
    return text.encode()[:max_bytes].decode(errors="ignore")


def contract_indexes(db: TargetDatabase) -> dict[str, IndexSpec]:
    """The spec's two recommended partial indexes on the weeks table, by name."""
    return {
        EXECUTION_ID_INDEX: IndexSpec(
            EXECUTION_ID_INDEX, db.weeks_table, ("execution_id",), TRACKED
        ),
        COLLECTION_EXECUTION_INDEX: IndexSpec(
            COLLECTION_EXECUTION_INDEX, db.weeks_table, ("collection_id", "execution_id"), TRACKED
        ),
    }


def completed_at_index(db: TargetDatabase) -> IndexSpec:
    """Opt-in: lets the polling sensor find newly completed executions without a scan."""
    return IndexSpec(COMPLETED_AT_INDEX, db.executions_table, ("completed_at",))


def created_at_index(db: TargetDatabase) -> IndexSpec:
    """Opt-in: lets validation read only the days and runs it judges.

    A B-tree on (created_at, execution_id), not BRIN: measured at 5M rows, a day's counts
    took 0.09 ms from it (an index-only scan) and 706 ms from a BRIN, whose block ranges
    each hold rows of many days once rows arrive late or are updated. execution_id as
    the second column lets per-day and per-window counts skip the table.
    """
    return IndexSpec(CREATED_AT_INDEX, db.weeks_table, ("created_at", "execution_id"))


# -- what an index is ------------------------------------------------------------------


@dataclass(frozen=True)
class ExistingIndex:
    name: str
    table: str
    definition: str
    valid: bool
    ready: bool
    unique: bool
    method: str
    columns: tuple[str | None, ...]  # key columns; None for an expression, "x DESC" if descending
    include_columns: int
    predicate: str | None
    bytes: int
    oid: int = 0
    table_oid: int = 0
    schema: str = ""
    attached_to: int | None = None  # the partitioned index this one is a partition of
    partitioned: bool = False  # a partitioned table's index (relkind 'I')


# The spec's `pg_indexes` query, with what `pg_indexes` leaves out: validity, readiness,
# key columns, predicate, size, and which partitioned index an index is attached to.
_INDEXES = """
    SELECT i.relname, t.relname, pg_get_indexdef(i.oid), x.indisvalid, x.indisready,
           x.indisunique, am.amname,
           ARRAY(SELECT CASE WHEN k.attnum = 0 THEN NULL
                             ELSE a.attname || CASE WHEN x.indoption[k.n - 1] & 1 = 1
                                                    THEN ' DESC' ELSE '' END END
                 FROM unnest(x.indkey[0:x.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, n)
                 LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
                 ORDER BY k.n),
           x.indnatts - x.indnkeyatts,
           pg_get_expr(x.indpred, x.indrelid),
           pg_relation_size(i.oid),
           i.oid::bigint, t.oid::bigint, n.nspname,
           (SELECT h.inhparent::bigint FROM pg_inherits h WHERE h.inhrelid = i.oid),
           i.relkind = 'I'
    FROM pg_index x
    JOIN pg_class i ON i.oid = x.indexrelid
    JOIN pg_class t ON t.oid = x.indrelid
    JOIN pg_namespace n ON n.oid = t.relnamespace
    JOIN pg_am am ON am.oid = i.relam
"""


def _existing(rows) -> list[ExistingIndex]:
    return [
        ExistingIndex(
            name,
            table,
            definition,
            valid,
            ready,
            unique,
            method,
            tuple(cols),
            include,
            pred,
            size,
            int(oid),
            int(table_oid),
            schema,
            None if parent is None else int(parent),
            partitioned,
        )
        for (
            name,
            table,
            definition,
            valid,
            ready,
            unique,
            method,
            cols,
            include,
            pred,
            size,
            oid,
            table_oid,
            schema,
            parent,
            partitioned,
        ) in rows
    ]


def table_indexes(
    cur: psycopg.Cursor, schema: str, tables: list[str], names: list[str] = ()
) -> list[ExistingIndex]:
    """Every index on `schema.tables`, plus any index of `schema` named in `names`."""
    cur.execute(
        _INDEXES
        + """
        WHERE n.nspname = %s AND (t.relname = ANY(%s) OR i.relname = ANY(%s))
        ORDER BY t.relname, i.relname
        """,
        [schema, list(tables), list(names)],
    )
    return _existing(cur.fetchall())


def member_indexes(cur: psycopg.Cursor, layout: Layout) -> dict[int, list[ExistingIndex]]:
    """Every index on each member of `layout` (the table, its partitions or children),
    by the member's oid."""
    cur.execute(
        _INDEXES + " WHERE t.oid = ANY(%s::oid[]) ORDER BY t.relname, i.relname",
        [[m.oid for m in layout.members]],
    )
    found: dict[int, list[ExistingIndex]] = {m.oid: [] for m in layout.members}
    for index in _existing(cur.fetchall()):
        found.setdefault(index.table_oid, []).append(index)
    return found


def normalize_predicate(predicate: str | None) -> str | None:
    """`(execution_id IS NOT NULL)` and `execution_id is not null` compare equal."""
    if predicate is None:
        return None
    return " ".join(re.sub(r'[()"]', " ", predicate).lower().split())


def matches(spec: IndexSpec, index: ExistingIndex) -> bool:
    """Whether `index` has the definition of `spec` (whatever its name)."""
    return (
        index.table == spec.table
        and index.method == "btree"
        and not index.unique
        and index.columns == spec.columns
        and index.include_columns == 0
        and normalize_predicate(index.predicate) == normalize_predicate(spec.predicate)
    )


def equivalent_of(spec: IndexSpec, indexes: list[ExistingIndex]) -> ExistingIndex | None:
    """A valid index of `spec`'s definition under another name, if there is one."""
    return next(
        (i for i in indexes if i.name != spec.name and i.valid and i.ready and matches(spec, i)),
        None,
    )


def lookup(
    db: TargetDatabase, spec: IndexSpec, conn: psycopg.Connection | None = None
) -> tuple[ExistingIndex | None, list[ExistingIndex]]:
    """(the index named `spec.name`, every index on `spec.table`)."""
    if conn is not None:
        found = table_indexes(conn.cursor(), spec.schema_of(db), [spec.table], [spec.name])
    else:
        with db.cursor() as cur:
            found = table_indexes(cur, spec.schema_of(db), [spec.table], [spec.name])
    named = next((i for i in found if i.name == spec.name), None)
    return named, [i for i in found if i.table == spec.table]


# -- who holds the lock ----------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """Another session, as much of it as is safe to log (never its query text)."""

    pid: int
    application: str | None
    query_start: datetime | None
    state: str | None

    def __str__(self) -> str:
        started = (
            f"query started {self.query_start:%Y-%m-%d %H:%M:%S} UTC"
            if self.query_start
            else "query start not visible (grant pg_read_all_stats to see it)"
        )
        state = f", {self.state}" if self.state else ""
        return f"pid {self.pid} (application {self.application or '(none)'!r}, {started}{state})"


class LockWait(Exception):
    """A statement gave up waiting for a lock (or did not start because it would have)."""

    def __init__(self, what: str, blockers: list[Session]):
        self.what = what
        self.blockers = blockers
        super().__init__(f"{what}: waiting for {describe(blockers)}")


def describe(blockers: list[Session]) -> str:
    return "; ".join(map(str, blockers)) or "a session that has since let go"


_SESSIONS = """
    SELECT a.pid, a.application_name, a.query_start, a.state
    FROM pg_stat_activity a WHERE a.pid = ANY(%s) ORDER BY a.pid
"""

# Sessions that would make a concurrent build (or its cleanup) wait until they end:
# an open transaction idle at the client, or one older than our lock wait, holding a lock
# on the table that conflicts with a build; with `snapshots`, also any idle transaction
# holding a snapshot, which the build's last phase waits out.
_STUCK_HOLDERS = """
    SELECT a.pid, a.application_name, a.query_start, a.state
    FROM pg_stat_activity a
    WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
      AND a.backend_type = 'client backend' AND a.xact_start IS NOT NULL
      AND (a.state LIKE 'idle in transaction%%'
           OR a.xact_start < now() - make_interval(secs => %(wait_s)s))
      AND (EXISTS (SELECT 1 FROM pg_locks l
                   WHERE l.pid = a.pid AND l.granted AND l.locktype = 'relation'
                     AND l.mode NOT IN ('AccessShareLock', 'RowShareLock')
                     AND l.relation = (SELECT c.oid FROM pg_class c
                                       JOIN pg_namespace n ON n.oid = c.relnamespace
                                       WHERE n.nspname = %(schema)s AND c.relname = %(table)s))
           OR (%(snapshots)s AND a.backend_xmin IS NOT NULL
               AND a.state LIKE 'idle in transaction%%'))
    ORDER BY a.xact_start
"""


def stuck_lock_holders(
    db: TargetDatabase,
    tables: list[str],
    snapshots: bool = True,
    schema: str | None = None,
    conn: psycopg.Connection | None = None,
) -> list[Session]:
    """Sessions that would hold DDL on `tables` (of `schema`, default the configured one)
    beyond the lock timeout."""
    with _autocommit(db, conn) as conn:
        found: dict[int, Session] = {}
        for table in tables:
            params = {
                "wait_s": db.lock_timeout_ms / 1000,
                "schema": schema or db.schema_name,
                "table": table,
                "snapshots": snapshots,
            }
            for row in conn.execute(_STUCK_HOLDERS, params):
                found.setdefault(row[0], Session(*row))
    return list(found.values())


def raise_if_stuck(
    db: TargetDatabase,
    tables: list[str],
    what: str,
    snapshots: bool,
    schema: str | None = None,
    conn: psycopg.Connection | None = None,
) -> None:
    """Don't start DDL that would only wait out its lock timeout behind an idle session."""
    stuck = stuck_lock_holders(db, tables, snapshots, schema, conn)
    if stuck:
        raise LockWait(what, stuck)


# Another session's CREATE INDEX CONCURRENTLY of this very index: its index is INVALID
# until it finishes, and is not ours to drop. A role without pg_read_all_stats sees other
# roles' builds with their index hidden (NULL): any such build might be this one.
_BUILDING = """
    SELECT a.pid, a.application_name, a.query_start, a.state
    FROM pg_stat_progress_create_index p
    JOIN pg_stat_activity a ON a.pid = p.pid
    WHERE p.pid <> pg_backend_pid() AND p.datname = current_database()
      AND (p.index_relid = %(oid)s::oid OR p.index_relid IS NULL)
    ORDER BY a.pid
"""


def building_sessions(
    db: TargetDatabase, index_oid: int, conn: psycopg.Connection | None = None
) -> list[Session]:
    """Sessions building index `index_oid` right now (or whose builds this role cannot see)."""
    with _autocommit(db, conn) as conn:
        return [Session(*row) for row in conn.execute(_BUILDING, {"oid": index_oid})]


# -- running DDL while watching it -----------------------------------------------------


@dataclass(frozen=True)
class Connections:
    """Two autocommit connections reused across the many short steps of one build on a
    partitioned or inheritance table: `work` runs each statement (its own transaction),
    `watch` looks at it meanwhile and asks the catalog between statements."""

    work: psycopg.Connection
    watch: psycopg.Connection


@contextmanager
def connections(db: TargetDatabase) -> Iterator[Connections]:
    with db.connect(autocommit=True) as work, db.connect(autocommit=True) as watch:
        yield Connections(work, watch)


@contextmanager
def _autocommit(
    db: TargetDatabase, conn: psycopg.Connection | None
) -> Iterator[psycopg.Connection]:
    if conn is not None:
        yield conn
    else:
        with db.connect(autocommit=True) as own:
            yield own


@dataclass(frozen=True)
class Progress:
    phase: str
    blocks_done: int
    blocks_total: int
    tuples_done: int
    tuples_total: int
    lockers_done: int
    lockers_total: int


def _pct(done: int, total: int) -> str:
    return f"{100 * done / total:.1f}%" if total else "n/a"


def progress_line(name: str, progress: Progress, seconds: float) -> str:
    """One line a person watching the run can follow, from pg_stat_progress_create_index."""
    parts = [f"{name}: {progress.phase} after {seconds:.1f} s"]
    if progress.phase.startswith("waiting"):  # the other counters still hold the last phase's
        if progress.lockers_total:
            parts.append(
                f"waited for {progress.lockers_done:,} of {progress.lockers_total:,} "
                f"transactions ({_pct(progress.lockers_done, progress.lockers_total)})"
            )
        return " — ".join(parts)
    if progress.blocks_total:
        parts.append(
            f"blocks {progress.blocks_done:,} of {progress.blocks_total:,} "
            f"({_pct(progress.blocks_done, progress.blocks_total)})"
        )
    if progress.tuples_total:
        parts.append(
            f"tuples {progress.tuples_done:,} of {progress.tuples_total:,} "
            f"({_pct(progress.tuples_done, progress.tuples_total)})"
        )
    return " — ".join(parts)


# pg_blocking_pids() takes every lock-manager partition lock: asked several times a
# second through a build, it slowed the build itself. Only a backend waiting on a lock
# has blockers to name.
_WATCH = """
    SELECT p.phase, p.blocks_done, p.blocks_total, p.tuples_done, p.tuples_total,
           p.lockers_done, p.lockers_total,
           CASE WHEN a.wait_event_type = 'Lock' THEN pg_blocking_pids(%(pid)s) END
    FROM (SELECT 1) AS one
    LEFT JOIN pg_stat_progress_create_index p ON p.pid = %(pid)s
    LEFT JOIN pg_stat_activity a ON a.pid = %(pid)s
"""


def run_watched(
    db: TargetDatabase,
    statement: sql.Composable,
    what: str,
    log: Log,
    progress_every_s: float = 5.0,
    poll_s: float = 0.25,
    conns: Connections | None = None,
    log_phases: bool = True,
) -> float:
    """Run one statement on an autocommit connection of its own (so it is its own
    transaction), watching it from another: who blocks it, and for index builds the
    progress, logged at each new phase (with `log_phases`) and every `progress_every_s`.
    Returns its seconds. `conns`: reuse these two connections rather than open two.

    Raises `LockWait` naming the blocking sessions when the lock timeout fires.
    """
    with (
        _autocommit(db, conns and conns.work) as work,
        _autocommit(db, conns and conns.watch) as watch,
    ):
        pid = work.info.backend_pid
        outcome: dict[str, BaseException] = {}

        def execute() -> None:
            try:
                work.execute(statement)
            except BaseException as err:  # handed to the watching thread
                outcome["error"] = err

        started = time.monotonic()
        worker = threading.Thread(target=execute, name=f"rdw:{what}", daemon=True)
        worker.start()
        blockers: list[Session] = []
        logged_at, logged_phase = started, None
        try:
            while worker.is_alive():
                worker.join(poll_s)
                if not worker.is_alive():
                    break
                *numbers, blocking = watch.execute(_WATCH, {"pid": pid}).fetchone()
                if blocking:
                    sessions = watch.execute(_SESSIONS, [blocking]).fetchall()
                    blockers = [Session(*row) for row in sessions] or blockers
                now = time.monotonic()
                phase = numbers[0]
                if phase is not None and (
                    (log_phases and phase != logged_phase) or now - logged_at >= progress_every_s
                ):
                    log.info(progress_line(what, Progress(*numbers), now - started))
                    logged_at, logged_phase = now, phase
        finally:
            if worker.is_alive():  # the run is being stopped: don't leave the DDL behind
                work.cancel_safe()
                worker.join()
        error = outcome.get("error")
        if isinstance(error, psycopg.errors.LockNotAvailable):
            raise LockWait(what, blockers) from error
        if error is not None:
            raise error
        return time.monotonic() - started


def backoff_delays(retries: int, backoff_s: float, cap_s: float = 60.0) -> list[float]:
    """Seconds to wait before each retry: doubling from `backoff_s`, at most `cap_s`."""
    return [min(cap_s, backoff_s * 2**n) for n in range(retries)]


def with_lock_retries(
    attempt: Callable[[], T], what: str, log: Log, retries: int, backoff_s: float
) -> T:
    """`attempt()`, again after a back-off each time it raises `LockWait`, `retries` times.

    The last `LockWait` propagates; nothing here decides what to tell the user.
    """
    delays = backoff_delays(retries, backoff_s)
    for number in range(retries + 1):
        try:
            return attempt()
        except LockWait as wait:
            if number == retries:
                raise
            log.warning(
                f"{what}: gave up waiting for a lock held by {describe(wait.blockers)}; "
                f"retry {number + 1} of {retries} in {delays[number]:g} s"
            )
            time.sleep(delays[number])
    raise AssertionError("unreachable")


# -- building one index safely ---------------------------------------------------------


@dataclass
class PartitionBuild:
    """What one run did for one contract index on one partition or child table."""

    index: str  # the contract index (the parent's)
    partition: str  # schema.table
    partition_index: str  # the index serving that partition (or child)
    action: str  # created, rebuilt, attached, unchanged, equivalent
    seconds: float = 0.0


@dataclass
class IndexBuild:
    """What `build_index` did: created, rebuilt (an INVALID one), completed (an index of a
    partitioned or inheritance table that some partitions or children lacked), unchanged
    or equivalent."""

    name: str
    action: str
    seconds: float = 0.0
    equivalent: str | None = None
    attempts: int = 0
    partitions: list[PartitionBuild] = field(default_factory=list)


def _problem(db: TargetDatabase, spec: IndexSpec, err: psycopg.Error) -> dg.Failure:
    where = f"{spec.where(db)} on {spec.table_label(db)}"
    if isinstance(err, psycopg.errors.InsufficientPrivilege):
        return refuse(
            f"building index {where} needs the owner of {spec.table_label(db)}: run the "
            "job as that role (or a member of it)"
        )
    if isinstance(err, psycopg.errors.QueryCanceled) and "statement timeout" not in str(err):
        return refuse(
            f"building index {where} was cancelled by another session (pg_cancel_backend, "
            "or a person at psql) before it finished; run the job again to build it"
        )
    if isinstance(err, psycopg.errors.QueryCanceled):
        return refuse(
            f"building index {where} ran past target_db.statement_timeout_ms "
            f"({db.statement_timeout_ms} ms); raise it for this job (run config "
            "resources.target_db.config.statement_timeout_ms) and run it again"
        )
    if isinstance(err, psycopg.errors.DuplicateTable):
        return refuse(
            f"{spec.where(db)} already names another relation in schema "
            f"{spec.schema_of(db)}; rename that relation, then run the job again"
        )
    return refuse(f"building index {where} failed: {type(err).__name__}: {err}".rstrip())


@contextmanager
def _psycopg_errors(db: TargetDatabase, spec: IndexSpec) -> Iterator[None]:
    try:
        yield
    except psycopg.errors.LockNotAvailable:
        raise
    except psycopg.Error as err:
        raise _problem(db, spec, err) from None


def refuse_conflict(
    db: TargetDatabase,
    spec: IndexSpec,
    named: ExistingIndex | None,
    conn: psycopg.Connection | None = None,
) -> None:
    """An index of `spec`'s name that is not `spec` (nor a failed build of it) is the
    user's to resolve: one of another definition or on another table, valid or INVALID,
    or one that another session is still building. Nothing is dropped for them."""
    if named is None:
        return
    where = spec.where(db)
    if not matches(spec, named):
        raise refuse(
            f"index {where} exists with another definition"
            f"{'' if named.valid else ' and is INVALID'}: found `{named.definition}`, "
            f"expected `{spec.definition(db)}`; nothing was changed. Drop or rename the "
            f"existing index (DROP INDEX CONCURRENTLY {where}), then run the job again",
            found=named.definition,
            expected=spec.definition(db),
        )
    if not named.valid and not named.partitioned:
        building = building_sessions(db, named.oid, conn)
        if building:
            raise refuse(
                f"index {where} is INVALID because another session is still building it "
                f"({describe(building)}); nothing was changed. Let that build finish (or "
                "cancel it), then run the job again",
                blocking_sessions=describe(building),
            )


def drop_invalid(
    db: TargetDatabase,
    spec: IndexSpec,
    leftover: ExistingIndex,
    log: Log,
    conns: Connections | None = None,
) -> None:
    """`DROP INDEX CONCURRENTLY` of `leftover`, a failed build of `spec` — checked, by OID
    just before the drop, to still be that INVALID index of `spec`'s definition that no
    session is building."""
    watch = conns.watch if conns else None
    refuse_conflict(db, spec, leftover, watch)
    now, _ = lookup(db, spec, watch)
    if now is None:
        return
    if now.oid != leftover.oid or now.valid:
        raise refuse(
            f"index {spec.where(db)} changed while the job was about to drop its INVALID "
            "leftover (another session rebuilt or replaced it); nothing was dropped. Run the "
            "job again"
        )
    log.info(f"{spec.where(db)} is INVALID (a failed or cancelled build): dropping it")
    run_watched(db, spec.drop(db), f"drop of INVALID {spec.where(db)}", log, conns=conns)


def build_index(
    db: TargetDatabase,
    spec: IndexSpec,
    log: Log,
    retries: int = 3,
    backoff_s: float = 2.0,
    progress_every_s: float = 5.0,
) -> IndexBuild:
    """Make `spec` exist and be valid on its table, whatever the table's layout, without
    ever blocking the table's writers for longer than `lock_timeout_ms`.

    An ordinary table: `build_table_index`. A partitioned table: the parent's index
    `ON ONLY`, each partition's built concurrently and attached (`build_partitioned_index`).
    An inheritance parent: the parent's and each child's (`build_inherited_index`).
    A view, a foreign table or a table with rules is refused before any change.
    """
    with db.cursor() as cur:
        layout = table_layout(cur, spec.schema_of(db), spec.table)
    if layout is None or layout.kind == "ordinary":
        return build_table_index(db, spec, log, retries, backoff_s, progress_every_s)
    refusal = layout.refusal(f"building index {spec.where(db)}")
    if refusal:
        raise refuse(refusal)
    build = build_partitioned_index if layout.kind == "partitioned" else build_inherited_index
    return build(db, spec, layout, log, retries, backoff_s, progress_every_s)


def build_table_index(
    db: TargetDatabase,
    spec: IndexSpec,
    log: Log,
    retries: int = 3,
    backoff_s: float = 2.0,
    progress_every_s: float = 5.0,
    conns: Connections | None = None,
    on_table: list[ExistingIndex] | None = None,
) -> IndexBuild:
    """Make `spec` exist and be valid on one physical table.

    - a valid index of that name and definition: unchanged;
    - an index of that name and another definition or table (valid or not), or one
      another session is still building: refused, nothing touched;
    - a valid equivalent under another name: reported, not duplicated;
    - an INVALID one of that definition (a failed or cancelled build):
      `DROP INDEX CONCURRENTLY`, rebuilt;
    - none: `CREATE INDEX CONCURRENTLY`.

    Each attempt waits for locks at most `lock_timeout_ms`, and does not start while a
    session that would stall it sits idle in its transaction. After `retries` back-offs
    it gives up naming the session in the way, and drops any INVALID index it left.
    On a partition (`conns` given) it logs only its progress every `progress_every_s`;
    `on_table`: the table's indexes, as just read with all the partitions' at once.
    """
    watch = conns.watch if conns else None
    if on_table is None:
        named, on_table = lookup(db, spec, watch)
    else:  # another relation of that name, if any, is refused by CREATE INDEX itself
        named = next((i for i in on_table if i.name == spec.name), None)
    where = spec.where(db)
    refuse_conflict(db, spec, named, watch)
    if named is not None and named.valid:
        return IndexBuild(spec.name, "unchanged")
    if named is None:
        equivalent = equivalent_of(spec, on_table)
        if equivalent is not None:
            log.info(
                f"{where} not built: {spec.schema_of(db)}.{equivalent.name} already is that "
                f"index ({equivalent.definition})"
            )
            return IndexBuild(spec.name, "equivalent", equivalent=equivalent.name)
    action = "created" if named is None else "rebuilt"
    build = IndexBuild(spec.name, action)

    def attempt() -> float:
        build.attempts += 1
        raise_if_stuck(db, [spec.table], f"build of {where}", True, spec.schema_of(db), watch)
        with _psycopg_errors(db, spec):
            # a retry may find what the last attempt left; `drop_invalid` re-checks anyway
            leftover = named if build.attempts == 1 else lookup(db, spec, watch)[0]
            if leftover is not None and not leftover.valid:
                drop_invalid(db, spec, leftover, log, conns)
            if conns is None:
                log.info(f"building {where}: {spec.create(db).as_string(None)}")
            return run_watched(
                db,
                spec.create(db),
                spec.name,
                log,
                progress_every_s,
                conns=conns,
                log_phases=conns is None,
            )

    try:
        build.seconds = round(
            with_lock_retries(attempt, f"build of {where}", log, retries, backoff_s), 3
        )
    except LockWait as wait:
        left = _drop_invalid_leftover(db, spec, log, conns)
        raise refuse(
            f"gave up building index {where} on {spec.table_label(db)} after "
            f"{build.attempts} attempts: each waited {db.lock_timeout_ms} ms at most for a lock "
            f"held by {describe(wait.blockers)}; "
            + (
                f"an INVALID {where} is left (drop it with DROP INDEX CONCURRENTLY {where} "
                "once that session ends, or run the job again then). "
                if left
                else "no INVALID index was left behind. "
            )
            + "Run the job again when that session has finished",
            blocking_sessions=describe(wait.blockers),
            invalid_index_left=left,
        ) from None
    except dg.Failure as failure:
        if not _drop_invalid_leftover(db, spec, log, conns):
            raise
        raise refuse(
            f"{failure.description}. It left an INVALID {where} that could not be dropped "
            "now; the next run drops and rebuilds it",
            invalid_index_left=True,
        ) from None
    if conns is None:
        log.info(f"{where}: {action} in {build.seconds:.2f} s")
    return build


def _drop_invalid_leftover(
    db: TargetDatabase, spec: IndexSpec, log: Log, conns: Connections | None = None
) -> bool:
    """Drop the INVALID index a failed build of `spec` left; True if one is still there."""
    if conns is not None and (conns.work.broken or conns.watch.broken):
        conns = None  # the failure took a connection with it: use fresh ones
    watch = conns.watch if conns else None
    leftover, _ = lookup(db, spec, watch)
    if leftover is None or leftover.valid:
        return False
    where = spec.where(db)
    try:
        with_lock_retries(
            lambda: drop_invalid(db, spec, leftover, log, conns),
            f"drop of INVALID {where}",
            log,
            retries=2,
            backoff_s=1.0,
        )
    except (LockWait, psycopg.Error, dg.Failure) as err:
        reason = err.description if isinstance(err, dg.Failure) else err
        log.warning(f"could not drop the INVALID {where}: {reason}")
    now, _ = lookup(db, spec, watch)
    return now is not None and not now.valid


# -- partitioned and inheritance tables ------------------------------------------------


# Sessions holding any lock on a table or one of its indexes.
_HOLDERS = """
    SELECT a.pid, a.application_name, a.query_start, a.state
    FROM pg_stat_activity a
    WHERE a.pid <> pg_backend_pid()
      AND a.pid IN (SELECT l.pid FROM pg_locks l
                    WHERE l.granted AND l.locktype = 'relation'
                      AND (l.relation = %(oid)s::oid
                           OR l.relation IN (SELECT x.indexrelid FROM pg_index x
                                             WHERE x.indrelid = %(oid)s::oid)))
    ORDER BY a.pid
"""


def run_short_ddl(
    db: TargetDatabase,
    statement: sql.Composable,
    what: str,
    spec: IndexSpec,
    on: Member,
    log: Log,
    retries: int,
    backoff_s: float,
    conns: Connections | None = None,
) -> float:
    """A catalog-only statement (`CREATE INDEX ... ON ONLY`, `ALTER INDEX ... ATTACH
    PARTITION`): its lock is brief but may conflict with writers of `on`, so it waits at
    most `lock_timeout_ms` per attempt and gives up naming who is in the way."""

    def attempt() -> float:
        raise_if_stuck(db, [on.name], what, False, on.schema, conns.watch if conns else None)
        with _psycopg_errors(db, spec):
            if conns is None:
                return run_watched(db, statement, what, log)
            # catalog only, over in milliseconds: no watcher thread; on a lock timeout the
            # sessions holding `on` or its indexes still hold them, and are named
            started = time.monotonic()
            try:
                conns.work.execute(statement)
            except psycopg.errors.LockNotAvailable as err:
                holders = conns.watch.execute(_HOLDERS, {"oid": on.oid}).fetchall()
                raise LockWait(what, [Session(*row) for row in holders]) from err
            return time.monotonic() - started

    try:
        return with_lock_retries(attempt, what, log, retries, backoff_s)
    except LockWait as wait:
        raise refuse(
            f"gave up on {what} after {retries + 1} attempts: each waited "
            f"{db.lock_timeout_ms} ms at most for a lock held by {describe(wait.blockers)}; "
            "the partitions already indexed stay so. Run the job again when that session "
            "has finished: it continues with the rest",
            blocking_sessions=describe(wait.blockers),
        ) from None


def _children(layout: Layout, parent: Member) -> list[Member]:
    return [m for m in layout.members if m.parent_oid == parent.oid]


def _reusable(spec: IndexSpec, indexes: list[ExistingIndex]) -> ExistingIndex | None:
    """A valid index of `spec`'s definition on a partition, attached to nothing yet:
    the one of `spec`'s own name first."""
    free = [
        i for i in indexes if i.attached_to is None and i.valid and i.ready and matches(spec, i)
    ]
    return next((i for i in free if i.name == spec.name), free[0] if free else None)


@dataclass
class _Tree:
    """One pass of `build_partitioned_index` over the partition tree."""

    db: TargetDatabase
    spec: IndexSpec  # the contract index, on the parent
    layout: Layout
    indexes: dict[int, list[ExistingIndex]]
    log: Log
    retries: int
    backoff_s: float
    progress_every_s: float
    done: list[PartitionBuild]
    conns: Connections

    def complete(self, parent: Member, parent_spec: IndexSpec, parent_oid: int) -> None:
        """Give every partition under `parent` an index attached to `parent_oid`."""
        db = self.db
        for child in _children(self.layout, parent):
            if child.relkind not in ("r", "p"):
                continue  # a foreign partition: refused before anything was built
            on_child = self.indexes.get(child.oid, [])
            attached = next((i for i in on_child if i.attached_to == parent_oid), None)
            child_spec = self.spec.on_member(child)
            if attached is not None and attached.valid:
                self.record(child, attached.name, "unchanged", 0.0)
                if child.relkind == "p":  # every partition below it is too: record them
                    self.complete(child, replace(child_spec, name=attached.name), attached.oid)
                continue
            started = time.monotonic()
            if child.relkind == "p":  # a sub-partitioned partition: its own ON ONLY index
                index, action = attached, "completed"
                if index is None:
                    index, action = _reusable(child_spec, on_child), "attached"
                if index is None:  # ours from an interrupted run, or none yet
                    named = next((i for i in on_child if i.name == child_spec.name), None)
                    refuse_conflict(db, child_spec, named, self.conns.watch)
                    index, action = named, "completed"
                if index is None:
                    run_short_ddl(
                        db,
                        child_spec.create_on_only(db),
                        f"CREATE INDEX {child_spec.where(db)} ON ONLY {child.label}",
                        child_spec,
                        child,
                        self.log,
                        self.retries,
                        self.backoff_s,
                        self.conns,
                    )
                    index, action = lookup(db, child_spec, self.conns.watch)[0], "created"
                own = replace(child_spec, name=index.name)
                self.complete(child, own, index.oid)
                if attached is None:
                    self.attach(parent_spec, own, child)
                self.record(child, index.name, action, time.monotonic() - started)
                continue
            if attached is not None:  # an INVALID index attached: only REINDEX mends it
                raise refuse(
                    f"index {child.schema}.{attached.name} of partition {child.label} is "
                    f"attached to {self.spec.where(db)} but INVALID; nothing more was changed. "
                    f"Run REINDEX INDEX CONCURRENTLY {child.schema}.{attached.name}, then the "
                    "job again"
                )
            reuse = _reusable(child_spec, on_child)
            if reuse is not None:
                own, action = replace(child_spec, name=reuse.name), "attached"
            else:
                try:
                    build = build_table_index(
                        db,
                        child_spec,
                        self.log,
                        self.retries,
                        self.backoff_s,
                        self.progress_every_s,
                        self.conns,
                        on_child,
                    )
                except dg.Failure as failure:
                    raise refuse(
                        f"{failure.description}. Partitions already indexed stay so: the next "
                        "run continues with the rest",
                        **{k: v.value for k, v in (failure.metadata or {}).items()},
                    ) from None
                own = replace(child_spec, name=build.equivalent or build.name)
                action = build.action
            self.attach(parent_spec, own, child)
            self.record(child, own.name, action, time.monotonic() - started)

    def attach(self, parent_spec: IndexSpec, index: IndexSpec, child: Member) -> None:
        run_short_ddl(
            self.db,
            parent_spec.attach(self.db, index),
            f"ALTER INDEX {parent_spec.where(self.db)} ATTACH PARTITION {index.where(self.db)}",
            index,
            child,
            self.log,
            self.retries,
            self.backoff_s,
            self.conns,
        )

    def record(self, child: Member, index: str, action: str, seconds: float) -> None:
        done = PartitionBuild(self.spec.name, child.label, index, action, round(seconds, 3))
        self.done.append(done)
        if action != "unchanged":
            self.log.info(
                f"{self.spec.where(self.db)}: partition {child.label} "
                f"({len(self.done)} of {len(self.layout.partitions)}): {action} "
                f"{child.schema}.{index} in {seconds:.2f} s"
            )


def build_partitioned_index(
    db: TargetDatabase,
    spec: IndexSpec,
    layout: Layout,
    log: Log,
    retries: int = 3,
    backoff_s: float = 2.0,
    progress_every_s: float = 5.0,
) -> IndexBuild:
    """PostgreSQL's online route for a partitioned table (CREATE INDEX CONCURRENTLY is
    refused on one): `CREATE INDEX ... ON ONLY` the parent (catalog only, INVALID until
    complete), then for each partition at every level `CREATE INDEX CONCURRENTLY` (or an
    equivalent index it already has) and `ALTER INDEX ... ATTACH PARTITION`; a
    sub-partitioned partition gets its own `ON ONLY` index, attached once complete. The
    parent's index turns valid when its last partition's is attached, and from then on
    PostgreSQL gives every new partition the index itself.

    Interrupted, a rerun finds the parent's index INVALID and continues with the
    partitions not yet attached.
    """
    with connections(db) as conns:
        return _build_partitioned(
            db, spec, layout, log, retries, backoff_s, progress_every_s, conns
        )


def _build_partitioned(
    db: TargetDatabase,
    spec: IndexSpec,
    layout: Layout,
    log: Log,
    retries: int,
    backoff_s: float,
    progress_every_s: float,
    conns: Connections,
) -> IndexBuild:
    where = spec.where(db)
    named, on_root = lookup(db, spec, conns.watch)
    refuse_conflict(db, spec, named, conns.watch)
    if named is None:
        equivalent = next(
            (i for i in on_root if i.partitioned and i.valid and matches(spec, i)), None
        )
        if equivalent is not None:
            log.info(
                f"{where} not built: {spec.schema_of(db)}.{equivalent.name} already is that "
                f"index on every partition ({equivalent.definition})"
            )
            return IndexBuild(spec.name, "equivalent", equivalent=equivalent.name)
    started = time.monotonic()
    if named is None:
        log.info(
            f"{where}: creating it ON ONLY {layout.label} (INVALID until every partition's "
            f"index is attached), then on each of {len(layout.leaves)} partitions concurrently"
        )
        run_short_ddl(
            db,
            spec.create_on_only(db),
            f"CREATE INDEX {where} ON ONLY {layout.label}",
            spec,
            layout.root,
            log,
            retries,
            backoff_s,
            conns,
        )
    elif not named.valid:
        log.info(f"{where} is INVALID: continuing with the partitions not yet attached")
    action = "created" if named is None else ("unchanged" if named.valid else "rebuilt")
    done: list[PartitionBuild] = []
    for _ in range(3):  # a partition attached meanwhile is taken in by the next pass
        with conns.watch.cursor() as cur:
            layout = table_layout(cur, layout.schema, layout.table) or layout
            indexes = member_indexes(cur, layout)
        refusal = layout.refusal(f"building index {where}")
        if refusal:
            raise refuse(refusal)
        root_index = next(i for i in indexes[layout.root.oid] if i.name == spec.name)
        done = []
        tree = _Tree(
            db, spec, layout, indexes, log, retries, backoff_s, progress_every_s, done, conns
        )
        tree.complete(layout.root, spec, root_index.oid)
        now, _ = lookup(db, spec, conns.watch)
        if now is not None and now.valid:
            break
    else:
        raise refuse(
            f"{where} is still INVALID after three passes over the partitions of "
            f"{layout.label} (partitions attached or detached all along?); run the job again"
        )
    if action == "unchanged" and any(p.action != "unchanged" for p in done):
        action = "completed"
    build = IndexBuild(spec.name, action, partitions=done)
    build.seconds = round(time.monotonic() - started, 3)
    log.info(
        f"{where}: {action} on {layout.label} and its {len(done)} partitions in "
        f"{build.seconds:.2f} s"
    )
    return build


def build_inherited_index(
    db: TargetDatabase,
    spec: IndexSpec,
    layout: Layout,
    log: Log,
    retries: int = 3,
    backoff_s: float = 2.0,
    progress_every_s: float = 5.0,
) -> IndexBuild:
    """Table inheritance shares no index: the parent gets `spec` under its contract name,
    every child table (any level) the same index under a name derived from its own,
    each built by `build_table_index`. A child added later needs a rerun (the check
    names it)."""
    build = build_table_index(db, spec, log, retries, backoff_s, progress_every_s)
    children = [m for m in layout.partitions if m.relkind == "r"]
    with connections(db) as conns:
        for number, child in enumerate(children, 1):
            try:
                done = build_table_index(
                    db, spec.on_member(child), log, retries, backoff_s, progress_every_s, conns
                )
            except dg.Failure as failure:
                raise refuse(
                    f"{failure.description}. Child tables already indexed stay so: the next "
                    "run continues with the rest",
                    **{k: v.value for k, v in (failure.metadata or {}).items()},
                ) from None
            index = done.equivalent or done.name
            build.partitions.append(
                PartitionBuild(spec.name, child.label, index, done.action, done.seconds)
            )
            if done.action != "unchanged":
                log.info(
                    f"{spec.where(db)}: child table {child.label} ({number} of "
                    f"{len(children)}): {done.action} {child.schema}.{index} "
                    f"in {done.seconds:.2f} s"
                )
            build.seconds = round(build.seconds + done.seconds, 3)
    if build.action in ("unchanged", "equivalent") and any(
        p.action not in ("unchanged", "equivalent") for p in build.partitions
    ):
        build.action = "completed"
    return build


def wal_lsn(db: TargetDatabase) -> str | None:
    with db.connect(autocommit=True) as conn:
        return catalog.wal_lsn(conn)


# -- the asset and its check -----------------------------------------------------------


class IndexConfig(dg.Config):
    indexes: list[str] = Field(
        default=[EXECUTION_ID_INDEX, COLLECTION_EXECUTION_INDEX],
        description="Which of the two recommended indexes to build (default: both).",
    )
    workflow_executions_completed_at: bool = Field(
        default=False,
        description=f"Also build {COMPLETED_AT_INDEX} on workflow_executions(completed_at), "
        "for the polling sensor.",
    )
    report_data_weeks_created_at: bool = Field(
        default=False,
        description=f"Also build {CREATED_AT_INDEX} on the weeks table (created_at, "
        "execution_id), so per-run verdicts and daily history read only their own rows.",
    )
    lock_retries: int = Field(
        default=3, ge=0, le=20, description="Retries after a lock wait times out."
    )
    retry_backoff_s: float = Field(
        default=2.0, ge=0, le=600, description="First back-off (s); doubles each retry."
    )
    progress_every_s: float = Field(
        default=5.0, gt=0, description="How often build progress is logged (s)."
    )

    @field_validator("indexes")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        known = [EXECUTION_ID_INDEX, COLLECTION_EXECUTION_INDEX]
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown index {', '.join(unknown)}; choose from {', '.join(known)}")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _something(self) -> "IndexConfig":
        if not (
            self.indexes
            or self.workflow_executions_completed_at
            or self.report_data_weeks_created_at
        ):
            raise ValueError(
                "indexes is empty and both opt-in indexes are off: nothing to build; leave "
                "indexes unset to build both"
            )
        return self


def refuse_unless_buildable(db: TargetDatabase, specs: list[IndexSpec]) -> None:
    """Each index's table and columns exist: say so plainly rather than fail in the DDL."""
    with db.cursor() as cur:
        for table in dict.fromkeys(spec.table for spec in specs):
            columns = {c.name for c in catalog.columns(cur, db.schema_name, table)}
            if not columns:
                field = "weeks_table" if table == db.weeks_table else "executions_table"
                raise refuse(
                    f"table {db.qualified(table)} does not exist; check target_db.schema_name "
                    f"and target_db.{field}"
                )
            needed = [c for spec in specs if spec.table == table for c in spec.columns]
            for column in dict.fromkeys(needed):
                if column not in columns:
                    raise refuse(
                        f"{db.qualified(table, column)} does not exist, so no index can use it; "
                        "see the execution_id_column_contract check"
                    )


def weeks_layout(db: TargetDatabase) -> Layout | None:
    with db.cursor() as cur:
        return table_layout(cur, db.schema_name, db.weeks_table)


def refuse_conflicts(db: TargetDatabase, spec: IndexSpec) -> None:
    """`refuse_conflict` for `spec` on its table and, on a partitioned or inheritance
    table, for its partition-named index on each partition or child."""
    refuse_conflict(db, spec, lookup(db, spec)[0])
    with db.cursor() as cur:
        layout = table_layout(cur, spec.schema_of(db), spec.table)
        tree = member_indexes(cur, layout) if layout is not None and layout.is_tree else {}
    for member in layout.partitions if tree else []:
        own = spec.on_member(member)
        refuse_conflict(db, own, next((i for i in tree[member.oid] if i.name == own.name), None))


def chosen_indexes(db: TargetDatabase, config: IndexConfig) -> list[IndexSpec]:
    specs = [contract_indexes(db)[name] for name in config.indexes]
    if config.report_data_weeks_created_at:
        specs.append(created_at_index(db))
    return specs + ([completed_at_index(db)] if config.workflow_executions_completed_at else [])


def indexes_table(
    indexes: list[ExistingIndex], builds: dict[str, IndexBuild]
) -> dg.TableMetadataValue:
    """Every index on the tables the run touched, and what this run did to each."""
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {
                    "index_name": i.name,
                    "table_name": i.table,
                    "definition": i.definition,
                    "valid": i.valid,
                    "bytes": i.bytes,
                    "action": builds[i.name].action if i.name in builds else "",
                    "build_seconds": builds[i.name].seconds if i.name in builds else 0.0,
                }
            )
            for i in indexes
        ],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("index_name", "string"),
                dg.TableColumn("table_name", "string"),
                dg.TableColumn("definition", "string"),
                dg.TableColumn("valid", "bool"),
                dg.TableColumn("bytes", "int"),
                dg.TableColumn("action", "string"),
                dg.TableColumn("build_seconds", "float"),
            ]
        ),
    )


def partitions_table(
    builds: list[IndexBuild], tree: dict[int, list[ExistingIndex]]
) -> dg.TableMetadataValue:
    """Each partition (or child table) of the weeks table, per contract index: the index
    serving it, and what this run did there."""
    found = {(f"{i.schema}.{i.table}", i.name): i for indexes in tree.values() for i in indexes}
    records = []
    for build in builds:
        for done in build.partitions:
            index = found.get((done.partition, done.partition_index))
            records.append(
                dg.TableRecord(
                    {
                        "index_name": done.index,
                        "partition": done.partition,
                        "partition_index": done.partition_index,
                        "action": done.action,
                        "valid": bool(index and index.valid),
                        "bytes": index.bytes if index else 0,
                        "build_seconds": done.seconds,
                    }
                )
            )
    return dg.MetadataValue.table(
        records=records,
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("index_name", "string"),
                dg.TableColumn("partition", "string"),
                dg.TableColumn("partition_index", "string"),
                dg.TableColumn("action", "string"),
                dg.TableColumn("valid", "bool"),
                dg.TableColumn("bytes", "int"),
                dg.TableColumn("build_seconds", "float"),
            ]
        ),
    )


def build_metadata(
    db: TargetDatabase,
    specs: list[IndexSpec],
    builds: list[IndexBuild],
    wal_bytes: int | None,
    layout: Layout | None = None,
) -> dict[str, Any]:
    with db.cursor() as cur:
        found = table_indexes(
            cur, db.schema_name, sorted({s.table for s in specs} | {db.weeks_table})
        )
        tree = member_indexes(cur, layout) if layout is not None and layout.is_tree else {}
    by_name = {i.name: i for i in found}
    kept = [by_name.get(b.equivalent or b.name) for b in builds]
    partitions = [p for b in builds for p in b.partitions]
    on_partitions = {
        (f"{i.schema}.{i.table}", i.name): i.bytes for indexes in tree.values() for i in indexes
    }
    metadata: dict[str, Any] = {
        "created": sum(b.action == "created" for b in builds),
        "rebuilt": sum(b.action in ("rebuilt", "completed") for b in builds),
        "unchanged": sum(b.action in ("unchanged", "equivalent") for b in builds),
        # a partitioned index has no storage of its own: its partitions' indexes hold it
        "index_bytes": sum(i.bytes for i in kept if i is not None)
        + sum(on_partitions.get((p.partition, p.partition_index), 0) for p in partitions),
        "indexes": indexes_table(found, {b.name: b for b in builds} | _equivalents(builds)),
        "build_seconds": round(sum(b.seconds for b in builds), 3),
        "wal_bytes": wal_bytes,
    }
    for build in builds:
        metadata[f"build_seconds/{build.name}"] = build.seconds
    equivalents = {b.name: b.equivalent for b in builds if b.equivalent}
    if equivalents:
        metadata["equivalent"] = equivalents
    if layout is not None and layout.is_tree:
        metadata["layout"] = layout.describe()
        metadata["partitions"] = partitions_table(builds, tree)
        metadata["partitions_built"] = sum(p.action in ("created", "rebuilt") for p in partitions)
        metadata["partitions_attached"] = sum(p.action == "attached" for p in partitions)
        metadata["partitions_unchanged"] = sum(
            p.action in ("unchanged", "equivalent") for p in partitions
        )
    return metadata


def _equivalents(builds: list[IndexBuild]) -> dict[str, IndexBuild]:
    return {b.equivalent: b for b in builds if b.equivalent}


@dg.asset(
    key="execution_id_indexes",
    group_name=GROUP,
    pool=WRITE_POOL,  # one database write at a time, however it is launched
    deps=[report_data_weeks, workflow_executions],
    kinds={"postgres"},
)
def execution_id_indexes(
    context: dg.AssetExecutionContext, config: IndexConfig, target_db: TargetDatabase
) -> dg.MaterializeResult:
    """The spec's two partial indexes on `report_data_weeks`, built online.

    `idx_report_data_weeks_execution_id (execution_id)` and
    `idx_report_data_weeks_collection_execution (collection_id, execution_id)`, both
    `WHERE execution_id IS NOT NULL` so the legacy NULL rows cost nothing.

    **What it locks:** `CREATE INDEX CONCURRENTLY` takes only a SHARE UPDATE EXCLUSIVE
    lock on the table: inserts, updates, deletes and reads keep going throughout; only
    other DDL, VACUUM and ANALYZE of that table wait. The build waits for transactions
    already writing to the table to finish; each wait is capped at `lock_timeout_ms`,
    retried with back-off, and when it gives up it names the session in the way and
    leaves no INVALID index behind. Safe to run while collection runs are writing.

    **Partitioned tables** (range, list, hash, multi-level, DEFAULT partition): the index
    is created `ON ONLY` the parent (INVALID until complete), then built concurrently on
    each partition and attached (`ALTER INDEX ... ATTACH PARTITION`); the parent's index
    is valid once the last one is attached, and PostgreSQL gives every partition created
    later the index itself. A partition's own equivalent index is attached, not rebuilt.
    Interrupted, the next run continues with the partitions not yet attached. The
    contract's names belong to the parent's indexes; each partition's is named
    `idx_<partition>_execution_id` / `idx_<partition>_collection_execution`.
    **Inheritance:** the parent's indexes, and the same on every child table (a child
    added later needs a rerun; the check names it). Views, foreign partitions and tables
    with rules are refused before any change. Progress is logged per partition; metadata
    `partitions` lists what was done on each.

    Rerunning changes nothing. An INVALID index left by a failed build of the very index
    is dropped (`DROP INDEX CONCURRENTLY`, after checking by OID that it is still that
    index and no session is still building it) and rebuilt; a same-named index of another
    definition or table, valid or INVALID, is an error that touches nothing; an
    equivalent index under another name is kept.
    Needs the table's owner role and CREATE on its schema (checked before anything is
    built; for the opt-in index, on `workflow_executions` too). Progress is logged every few seconds.
    """
    specs = chosen_indexes(target_db, config)
    layout = weeks_layout(target_db)
    refusal = layout.refusal(context.run.job_name) if layout is not None else None
    if refusal:
        raise refuse(refusal)
    refuse_unless_buildable(target_db, specs)
    tables = dict.fromkeys(spec.table for spec in specs)
    members = layout.partitions if layout is not None else []
    refuse_without_grants(
        target_db,
        context.run.job_name,
        [Need(target_db.schema_name, table, ("OWNER", "CREATE")) for table in tables]
        + [Need(m.schema, m.name, ("OWNER", "CREATE")) for m in members],
    )
    if layout is not None and layout.is_tree:
        context.log.info(layout.describe())
    with exclusive_write(target_db, context.run.job_name):
        for spec in specs:  # refuse before building any, so a conflict changes nothing
            refuse_conflicts(target_db, spec)
        lsn = wal_lsn(target_db)
        builds = [
            build_index(
                target_db,
                spec,
                context.log,
                retries=config.lock_retries,
                backoff_s=config.retry_backoff_s,
                progress_every_s=config.progress_every_s,
            )
            for spec in specs
        ]
        wal_bytes = catalog.wal_bytes(lsn, wal_lsn(target_db))
    return dg.MaterializeResult(
        metadata=build_metadata(target_db, specs, builds, wal_bytes, layout)
    )


def index_problems(
    db: TargetDatabase, indexes: list[ExistingIndex]
) -> tuple[list[str], dict[str, str]]:
    """(each way the expected indexes fall short, as a sentence; {expected: equivalent})."""
    by_name = {i.name: i for i in indexes}
    expected = list(contract_indexes(db).values())
    if COMPLETED_AT_INDEX in by_name:  # opt-in: judged only once someone built it
        expected.append(completed_at_index(db))
    if CREATED_AT_INDEX in by_name:
        expected.append(created_at_index(db))
    problems, equivalents = [], {}
    for spec in expected:
        where = f"{db.schema_name}.{spec.name}"
        index = by_name.get(spec.name)
        if index is None:
            other = equivalent_of(spec, [i for i in indexes if i.table == spec.table])
            if other is not None:
                equivalents[spec.name] = other.name
            else:
                problems.append(f"{where} is missing; {FIX}")
        elif not index.valid and index.partitioned:
            problems.append(f"{where} is INVALID: not every partition's index is attached; {FIX}")
        else:
            problems += _judge(db, spec, index, where)
    return problems, equivalents


FIX = "run create_execution_id_indexes"


def _judge(db: TargetDatabase, spec: IndexSpec, index: ExistingIndex, what: str) -> list[str]:
    """How `index` falls short of `spec`, if it does."""
    if not index.valid:
        return [f"{what} is INVALID (a failed or cancelled build); {FIX}"]
    if not index.ready:
        return [f"{what} is not ready for inserts; {FIX}"]
    if not matches(spec, index):
        return [
            f"{what} is `{index.definition}`, expected `{spec.definition(db)}`; drop it, "
            "then " + FIX
        ]
    return []


def partition_problems(
    db: TargetDatabase,
    layout: Layout,
    tree: dict[int, list[ExistingIndex]],
    equivalents: dict[str, str],
) -> list[str]:
    """Each partition (any level) or child table lacking a contract index (or the opt-in
    created_at index, once built), or whose index is invalid, not ready or of another
    definition, as a sentence naming it."""
    problems: list[str] = []
    specs = list(contract_indexes(db).values())
    if any(i.name == CREATED_AT_INDEX for i in tree.get(layout.root.oid, [])):
        specs.append(created_at_index(db))  # opt-in: judged on every partition once built
    for spec in specs:
        if layout.kind == "inheritance":
            for child in (m for m in layout.partitions if m.relkind == "r"):
                problems += _child_problems(db, spec, child, tree.get(child.oid, []))
            continue
        root_name = equivalents.get(spec.name, spec.name)
        root = next((i for i in tree.get(layout.root.oid, []) if i.name == root_name), None)
        if root is not None:  # a missing one is reported once, as missing
            problems += _attached_problems(db, spec, layout, tree, layout.root, root)
    return problems


def _attached_problems(
    db: TargetDatabase,
    spec: IndexSpec,
    layout: Layout,
    tree: dict[int, list[ExistingIndex]],
    parent: Member,
    parent_index: ExistingIndex,
) -> list[str]:
    problems: list[str] = []
    for child in _children(layout, parent):
        if child.relkind not in ("r", "p"):
            continue  # a foreign partition holds no index
        on_child = tree.get(child.oid, [])
        attached = next((i for i in on_child if i.attached_to == parent_index.oid), None)
        if attached is None:
            problems.append(
                f"partition {child.label} has no index attached to "
                f"{parent_index.schema}.{parent_index.name} ({spec.name}); {FIX}"
            )
            own = spec.on_member(child)
            mine = next((i for i in on_child if i.name == own.name), None)
            if child.relkind == "p" and mine is not None:  # name the partitions below too
                problems += _attached_problems(db, spec, layout, tree, child, mine)
            continue
        what = f"partition {child.label}'s index {child.schema}.{attached.name}"
        problems += _judge(db, spec.on_member(child), attached, what)
        if child.relkind == "p":
            problems += _attached_problems(db, spec, layout, tree, child, attached)
    return problems


def _child_problems(
    db: TargetDatabase, spec: IndexSpec, child: Member, on_child: list[ExistingIndex]
) -> list[str]:
    own = spec.on_member(child)
    named = next((i for i in on_child if i.name == own.name), None)
    if named is None:
        if equivalent_of(own, on_child) is not None:
            return []
        columns = ", ".join(spec.columns)
        return [
            f"child table {child.label} has no index on ({columns}) WHERE {spec.predicate} "
            f"({spec.name} of the parent; expected {child.schema}.{own.name}); {FIX}"
        ]
    return _judge(db, own, named, f"child table {child.label}'s index {child.schema}.{own.name}")


@dg.asset_check(
    asset="execution_id_indexes",
    name="execution_id_indexes_valid",
    retry_policy=READ_RETRY,
)
def execution_id_indexes_valid(target_db: TargetDatabase) -> dg.AssetCheckResult:
    """Each recommended index exists, is valid and ready, on the right columns, with the
    predicate `execution_id IS NOT NULL` (an equivalent index under another name counts).
    On a partitioned table, every partition at every level has its index attached to the
    parent's; on an inheritance parent, every child table has the index too: a failure
    names each partition or child that falls short.
    Read-only: runs in `verify_execution_tracking` without building anything."""
    with target_db.cursor() as cur:
        layout = table_layout(cur, target_db.schema_name, target_db.weeks_table)
        indexes = table_indexes(
            cur,
            target_db.schema_name,
            [target_db.weeks_table],
            [EXECUTION_ID_INDEX, COLLECTION_EXECUTION_INDEX, COMPLETED_AT_INDEX, CREATED_AT_INDEX],
        )
        tree = member_indexes(cur, layout) if layout is not None and layout.is_tree else {}
    if layout is not None and layout.kind not in ("ordinary", "partitioned", "inheritance"):
        problems, equivalents = (
            [
                f"{layout.label} is a {layout.kind}, not a table, so it carries none of the "
                "expected indexes; point target_db.weeks_table at the table that holds the rows"
            ],
            {},
        )
    else:
        problems, equivalents = index_problems(target_db, indexes)
        if tree:
            problems += partition_problems(target_db, layout, tree, equivalents)
    found = {i.name for i in indexes}
    opt_in = [name for name in (CREATED_AT_INDEX, COMPLETED_AT_INDEX) if name in found]
    names = ", ".join([*contract_indexes(target_db), *opt_in])
    shown = problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else [])
    description = "; ".join(shown) or f"{names}: valid, ready, expected definition"
    if tree and not problems:
        description += f", on every one of the {len(layout.partitions)} partitions or children"
    if equivalents and not problems:
        description += " (" + ", ".join(f"{k} is {v}" for k, v in equivalents.items()) + ")"
    on_weeks = [i for i in indexes if i.table == target_db.weeks_table]
    on_members = [i for oid, found in tree.items() if oid != layout.root.oid for i in found]
    metadata: dict[str, Any] = {
        "problems": problems,
        "problem_count": len(problems),
        "equivalent": equivalents,
        "index_bytes": sum(i.bytes for i in on_weeks + on_members),
    }
    if tree:
        metadata["partitions_checked"] = len(layout.partitions)
    return dg.AssetCheckResult(
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata=metadata,
    )


index_assets = [execution_id_indexes]
index_checks = [execution_id_indexes_valid]
