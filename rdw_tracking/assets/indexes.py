"""The spec's "Index Considerations": the two partial indexes on `execution_id`, built
online with `CREATE INDEX CONCURRENTLY` on a table that keeps taking writes.

`build_index()` is the one safe way this project builds an index; the index asset, the
foreign-key job and the opt-in `workflow_executions(completed_at)` index all use it.
"""

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

import dagster as dg
import psycopg
from psycopg import sql
from pydantic import Field, field_validator, model_validator

from rdw_tracking import catalog
from rdw_tracking.assets import GROUP, READ_RETRY, refuse
from rdw_tracking.assets.tables import report_data_weeks, workflow_executions
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.writes import Need, exclusive_write, refuse_without_grants

# No `from __future__ import annotations` here: Dagster reads the Config annotation at runtime.

EXECUTION_ID_INDEX = "idx_report_data_weeks_execution_id"
COLLECTION_EXECUTION_INDEX = "idx_report_data_weeks_collection_execution"
COMPLETED_AT_INDEX = "idx_workflow_executions_completed_at"
TRACKED = "execution_id IS NOT NULL"

T = TypeVar("T")


class Log(Protocol):
    def info(self, msg: str) -> Any: ...
    def warning(self, msg: str) -> Any: ...


# -- what an index should be -----------------------------------------------------------


@dataclass(frozen=True)
class IndexSpec:
    """A plain btree index: `name` on `table(columns)`, partial when `predicate` is set."""

    name: str
    table: str
    columns: tuple[str, ...]
    predicate: str | None = None  # SQL text written in this module, never from config

    def create(self, db: TargetDatabase) -> sql.Composed:
        statement = sql.SQL("CREATE INDEX CONCURRENTLY {name} ON {table} ({columns})").format(
            name=sql.Identifier(self.name),
            table=db.table(self.table),
            columns=sql.SQL(", ").join(map(sql.Identifier, self.columns)),
        )
        if self.predicate:
            statement += sql.SQL(" WHERE ") + sql.SQL(self.predicate)
        return statement

    def drop(self, db: TargetDatabase) -> sql.Composed:
        return sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
            sql.Identifier(db.schema_name, self.name)
        )

    def definition(self, db: TargetDatabase) -> str:
        """How the index reads in `pg_indexes`, for messages."""
        where = f" WHERE ({self.predicate})" if self.predicate else ""
        return (
            f"CREATE INDEX {self.name} ON {db.qualified(self.table)} "
            f"USING btree ({', '.join(self.columns)}){where}"
        )


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


def table_indexes(
    cur: psycopg.Cursor, schema: str, tables: list[str], names: list[str] = ()
) -> list[ExistingIndex]:
    """Every index on `schema.tables`, plus any index of `schema` named in `names`.

    The spec's `pg_indexes` query, schema-qualified, with what `pg_indexes` leaves out:
    validity, readiness, key columns, predicate and size.
    """
    cur.execute(
        """
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
               pg_relation_size(i.oid)
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        JOIN pg_am am ON am.oid = i.relam
        WHERE n.nspname = %s AND (t.relname = ANY(%s) OR i.relname = ANY(%s))
        ORDER BY t.relname, i.relname
        """,
        [schema, list(tables), list(names)],
    )
    return [
        ExistingIndex(
            name, table, definition, valid, ready, unique, method, tuple(cols), include, pred, size
        )
        for name, table, definition, valid, ready, unique, method, cols, include, pred, size in cur
    ]


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


def lookup(db: TargetDatabase, spec: IndexSpec) -> tuple[ExistingIndex | None, list[ExistingIndex]]:
    """(the index named `spec.name`, every index on `spec.table`)."""
    with db.cursor() as cur:
        found = table_indexes(cur, db.schema_name, [spec.table], [spec.name])
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
    db: TargetDatabase, tables: list[str], snapshots: bool = True
) -> list[Session]:
    """Sessions that would hold DDL on `tables` beyond the lock timeout."""
    with db.connect(autocommit=True) as conn:
        found: dict[int, Session] = {}
        for table in tables:
            params = {
                "wait_s": db.lock_timeout_ms / 1000,
                "schema": db.schema_name,
                "table": table,
                "snapshots": snapshots,
            }
            for row in conn.execute(_STUCK_HOLDERS, params):
                found.setdefault(row[0], Session(*row))
    return list(found.values())


def raise_if_stuck(db: TargetDatabase, tables: list[str], what: str, snapshots: bool) -> None:
    """Don't start DDL that would only wait out its lock timeout behind an idle session."""
    stuck = stuck_lock_holders(db, tables, snapshots)
    if stuck:
        raise LockWait(what, stuck)


# -- running DDL while watching it -----------------------------------------------------


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
) -> float:
    """Run one statement on an autocommit connection of its own (so it is its own
    transaction), watching it from another: who blocks it, and for index builds the
    progress, logged at each new phase and every `progress_every_s`. Returns its seconds.

    Raises `LockWait` naming the blocking sessions when the lock timeout fires.
    """
    with db.connect(autocommit=True) as work, db.connect(autocommit=True) as watch:
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
                    phase != logged_phase or now - logged_at >= progress_every_s
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
class IndexBuild:
    """What `build_index` did: created, rebuilt (an INVALID one), unchanged or equivalent."""

    name: str
    action: str
    seconds: float = 0.0
    equivalent: str | None = None
    attempts: int = 0


def _problem(db: TargetDatabase, spec: IndexSpec, err: psycopg.Error) -> dg.Failure:
    where = f"{db.schema_name}.{spec.name} on {db.qualified(spec.table)}"
    if isinstance(err, psycopg.errors.InsufficientPrivilege):
        return refuse(
            f"building index {where} needs the owner of {db.qualified(spec.table)}: run the "
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
            f"{db.schema_name}.{spec.name} already names another relation in schema "
            f"{db.schema_name}; rename that relation, then run the job again"
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


def refuse_conflict(db: TargetDatabase, spec: IndexSpec, named: ExistingIndex | None) -> None:
    """A valid index of `spec`'s name but another definition is the user's to resolve."""
    if named is None or not named.valid or matches(spec, named):
        return
    where = f"{db.schema_name}.{spec.name}"
    raise refuse(
        f"index {where} exists with another definition: found `{named.definition}`, "
        f"expected `{spec.definition(db)}`; nothing was changed. Drop or rename the "
        f"existing index (DROP INDEX CONCURRENTLY {where}), then run the job again",
        found=named.definition,
        expected=spec.definition(db),
    )


def build_index(
    db: TargetDatabase,
    spec: IndexSpec,
    log: Log,
    retries: int = 3,
    backoff_s: float = 2.0,
    progress_every_s: float = 5.0,
) -> IndexBuild:
    """Make `spec` exist and be valid, without ever blocking the table's writers.

    - a valid index of that name and definition: unchanged;
    - a valid index of that name and another definition: refused, nothing touched;
    - a valid equivalent under another name: reported, not duplicated;
    - an INVALID one (a failed or cancelled build): `DROP INDEX CONCURRENTLY`, rebuilt;
    - none: `CREATE INDEX CONCURRENTLY`.

    Each attempt waits for locks at most `lock_timeout_ms`, and does not start while a
    session that would stall it sits idle in its transaction. After `retries` back-offs
    it gives up naming the session in the way, and drops any INVALID index it left.
    """
    named, on_table = lookup(db, spec)
    where = f"{db.schema_name}.{spec.name}"
    refuse_conflict(db, spec, named)
    if named is not None and named.valid:
        return IndexBuild(spec.name, "unchanged")
    if named is None:
        equivalent = equivalent_of(spec, on_table)
        if equivalent is not None:
            log.info(
                f"{where} not built: {db.schema_name}.{equivalent.name} already is that index "
                f"({equivalent.definition})"
            )
            return IndexBuild(spec.name, "equivalent", equivalent=equivalent.name)
    action = "created" if named is None else "rebuilt"
    build = IndexBuild(spec.name, action)

    def attempt() -> float:
        build.attempts += 1
        raise_if_stuck(db, [spec.table], f"build of {where}", snapshots=True)
        with _psycopg_errors(db, spec):
            if _invalid_leftover(db, spec):
                log.info(f"{where} is INVALID (a failed or cancelled build): dropping it")
                run_watched(db, spec.drop(db), f"drop of INVALID {where}", log)
            log.info(f"building {where}: {spec.create(db).as_string(None)}")
            return run_watched(db, spec.create(db), spec.name, log, progress_every_s)

    try:
        build.seconds = round(
            with_lock_retries(attempt, f"build of {where}", log, retries, backoff_s), 3
        )
    except LockWait as wait:
        left = _drop_invalid_leftover(db, spec, log)
        raise refuse(
            f"gave up building index {where} on {db.qualified(spec.table)} after "
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
        if not _drop_invalid_leftover(db, spec, log):
            raise
        raise refuse(
            f"{failure.description}. It left an INVALID {where} that could not be dropped "
            "now; the next run drops and rebuilds it",
            invalid_index_left=True,
        ) from None
    log.info(f"{where}: {action} in {build.seconds:.2f} s")
    return build


def _invalid_leftover(db: TargetDatabase, spec: IndexSpec) -> bool:
    named, _ = lookup(db, spec)
    return named is not None and not named.valid


def _drop_invalid_leftover(db: TargetDatabase, spec: IndexSpec, log: Log) -> bool:
    """Drop `spec`'s index if a failed build left it INVALID; True if one is still there."""
    if not _invalid_leftover(db, spec):
        return False
    where = f"{db.schema_name}.{spec.name}"
    try:
        with_lock_retries(
            lambda: run_watched(db, spec.drop(db), f"drop of INVALID {where}", log),
            f"drop of INVALID {where}",
            log,
            retries=2,
            backoff_s=1.0,
        )
    except (LockWait, psycopg.Error) as err:
        log.warning(f"could not drop the INVALID {where}: {err}")
    return _invalid_leftover(db, spec)


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
        if not self.indexes and not self.workflow_executions_completed_at:
            raise ValueError(
                "indexes is empty and workflow_executions_completed_at is false: nothing to "
                "build; leave indexes unset to build both"
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


def chosen_indexes(db: TargetDatabase, config: IndexConfig) -> list[IndexSpec]:
    specs = [contract_indexes(db)[name] for name in config.indexes]
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


def build_metadata(
    db: TargetDatabase, specs: list[IndexSpec], builds: list[IndexBuild], wal_bytes: int | None
) -> dict[str, Any]:
    with db.cursor() as cur:
        found = table_indexes(
            cur, db.schema_name, sorted({s.table for s in specs} | {db.weeks_table})
        )
    by_name = {i.name: i for i in found}
    kept = [by_name.get(b.equivalent or b.name) for b in builds]
    metadata: dict[str, Any] = {
        "created": sum(b.action == "created" for b in builds),
        "rebuilt": sum(b.action == "rebuilt" for b in builds),
        "unchanged": sum(b.action in ("unchanged", "equivalent") for b in builds),
        "index_bytes": sum(i.bytes for i in kept if i is not None),
        "indexes": indexes_table(found, {b.name: b for b in builds} | _equivalents(builds)),
        "build_seconds": round(sum(b.seconds for b in builds), 3),
        "wal_bytes": wal_bytes,
    }
    for build in builds:
        metadata[f"build_seconds/{build.name}"] = build.seconds
    equivalents = {b.name: b.equivalent for b in builds if b.equivalent}
    if equivalents:
        metadata["equivalent"] = equivalents
    return metadata


def _equivalents(builds: list[IndexBuild]) -> dict[str, IndexBuild]:
    return {b.equivalent: b for b in builds if b.equivalent}


@dg.asset(
    key="execution_id_indexes",
    group_name=GROUP,
    pool="rdw/db-writes",  # one database write at a time, however it is launched
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

    Rerunning changes nothing. An INVALID index left by a failed build is dropped
    (`DROP INDEX CONCURRENTLY`) and rebuilt; a same-named index of another definition is
    an error that touches nothing; an equivalent index under another name is kept.
    Needs the table's owner role and CREATE on its schema (checked before anything is
    built; for the opt-in index, on `workflow_executions` too). Progress is logged every few seconds.
    """
    specs = chosen_indexes(target_db, config)
    refuse_unless_buildable(target_db, specs)
    tables = dict.fromkeys(spec.table for spec in specs)
    refuse_without_grants(
        target_db,
        context.run.job_name,
        [Need(target_db.schema_name, table, ("OWNER", "CREATE")) for table in tables],
    )
    with exclusive_write(target_db, context.run.job_name):
        for spec in specs:  # refuse before building any, so a conflict changes nothing
            refuse_conflict(target_db, spec, lookup(target_db, spec)[0])
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
    return dg.MaterializeResult(metadata=build_metadata(target_db, specs, builds, wal_bytes))


def index_problems(
    db: TargetDatabase, indexes: list[ExistingIndex]
) -> tuple[list[str], dict[str, str]]:
    """(each way the expected indexes fall short, as a sentence; {expected: equivalent})."""
    by_name = {i.name: i for i in indexes}
    expected = list(contract_indexes(db).values())
    if COMPLETED_AT_INDEX in by_name:  # opt-in: judged only once someone built it
        expected.append(completed_at_index(db))
    problems, equivalents = [], {}
    fix = "run create_execution_id_indexes"
    for spec in expected:
        where = f"{db.schema_name}.{spec.name}"
        index = by_name.get(spec.name)
        if index is None:
            other = equivalent_of(spec, [i for i in indexes if i.table == spec.table])
            if other is not None:
                equivalents[spec.name] = other.name
            else:
                problems.append(f"{where} is missing; {fix}")
        elif not index.valid:
            problems.append(f"{where} is INVALID (a failed or cancelled build); {fix}")
        elif not index.ready:
            problems.append(f"{where} is not ready for inserts; {fix}")
        elif not matches(spec, index):
            problems.append(
                f"{where} is `{index.definition}`, expected `{spec.definition(db)}`; "
                "drop it, then " + fix
            )
    return problems, equivalents


@dg.asset_check(
    asset="execution_id_indexes",
    name="execution_id_indexes_valid",
    retry_policy=READ_RETRY,
)
def execution_id_indexes_valid(target_db: TargetDatabase) -> dg.AssetCheckResult:
    """Each recommended index exists, is valid and ready, on the right columns, with the
    predicate `execution_id IS NOT NULL` (an equivalent index under another name counts).
    Read-only: runs in `verify_execution_tracking` without building anything."""
    with target_db.cursor() as cur:
        indexes = table_indexes(
            cur,
            target_db.schema_name,
            [target_db.weeks_table],
            [EXECUTION_ID_INDEX, COLLECTION_EXECUTION_INDEX, COMPLETED_AT_INDEX],
        )
    problems, equivalents = index_problems(target_db, indexes)
    names = ", ".join(contract_indexes(target_db))
    description = "; ".join(problems) or f"{names}: valid, ready, expected definition"
    if equivalents and not problems:
        description += " (" + ", ".join(f"{k} is {v}" for k, v in equivalents.items()) + ")"
    return dg.AssetCheckResult(
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata={
            "problems": problems,
            "problem_count": len(problems),
            "equivalent": equivalents,
            "index_bytes": sum(i.bytes for i in indexes if i.table == target_db.weeks_table),
        },
    )


index_assets = [execution_id_indexes]
index_checks = [execution_id_indexes_valid]
