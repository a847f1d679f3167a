"""One index on one physical table: `CREATE INDEX CONCURRENTLY`, an INVALID leftover of a
failed build dropped and rebuilt, a conflicting index refused untouched."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# Only to catch the failures `refuse` raises below and add to their message.
import dagster as dg
import psycopg

from rdw_tracking.errors import refuse
from rdw_tracking.indexes.connections import Connections
from rdw_tracking.indexes.existing import ExistingIndex, equivalent_of, lookup, matches
from rdw_tracking.indexes.sessions import LockWait, building_sessions, describe, raise_if_stuck
from rdw_tracking.indexes.specs import IndexSpec
from rdw_tracking.indexes.watch import Log, run_watched, with_lock_retries
from rdw_tracking.resources import TargetDatabase


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
def psycopg_errors(db: TargetDatabase, spec: IndexSpec) -> Iterator[None]:
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
    now = lookup(db, spec, watch).named
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
    refuse_conflict(db, spec, named, watch)
    there = _already_there(db, spec, named, on_table, log)
    if there is not None:
        return there
    attempt = _Attempt(db, spec, log, progress_every_s, conns, named)
    where = spec.where(db)
    try:
        seconds = with_lock_retries(attempt, f"build of {where}", log, retries, backoff_s)
    except LockWait as wait:
        raise _gave_up(db, spec, log, conns, wait, attempt.build.attempts) from None
    except dg.Failure as failure:
        if not _drop_invalid_leftover(db, spec, log, conns):
            raise
        raise refuse(
            f"{failure.description}. It left an INVALID {where} that could not be dropped "
            "now; the next run drops and rebuilds it",
            invalid_index_left=True,
        ) from None
    attempt.build.seconds = round(seconds, 3)
    if conns is None:
        log.info(f"{where}: {attempt.build.action} in {attempt.build.seconds:.2f} s")
    return attempt.build


def _already_there(
    db: TargetDatabase,
    spec: IndexSpec,
    named: ExistingIndex | None,
    on_table: list[ExistingIndex],
    log: Log,
) -> IndexBuild | None:
    """`spec` valid under its name (unchanged) or under another (equivalent); else None."""
    if named is not None and named.valid:
        return IndexBuild(spec.name, "unchanged")
    equivalent = equivalent_of(spec, on_table) if named is None else None
    if equivalent is None:
        return None
    log.info(
        f"{spec.where(db)} not built: {spec.schema_of(db)}.{equivalent.name} already is that "
        f"index ({equivalent.definition})"
    )
    return IndexBuild(spec.name, "equivalent", equivalent=equivalent.name)


class _Attempt:
    """One attempt at `CREATE INDEX CONCURRENTLY` of `spec`, called once per retry;
    `build` counts them."""

    def __init__(
        self,
        db: TargetDatabase,
        spec: IndexSpec,
        log: Log,
        progress_every_s: float,
        conns: Connections | None,
        named: ExistingIndex | None,
    ):
        self.db, self.spec, self.log, self.conns, self.named = db, spec, log, conns, named
        self.progress_every_s = progress_every_s
        self.build = IndexBuild(spec.name, "created" if named is None else "rebuilt")

    def __call__(self) -> float:
        db, spec, log, conns = self.db, self.spec, self.log, self.conns
        watch = conns.watch if conns else None
        self.build.attempts += 1
        where = spec.where(db)
        raise_if_stuck(db, [spec.table], f"build of {where}", True, spec.schema_of(db), watch)
        with psycopg_errors(db, spec):
            # a retry may find what the last attempt left; `drop_invalid` re-checks anyway
            leftover = self.named if self.build.attempts == 1 else lookup(db, spec, watch).named
            if leftover is not None and not leftover.valid:
                drop_invalid(db, spec, leftover, log, conns)
            if conns is None:
                log.info(f"building {where}: {spec.create(db).as_string(None)}")
            return run_watched(
                db,
                spec.create(db),
                spec.name,
                log,
                self.progress_every_s,
                conns=conns,
                log_phases=conns is None,
            )


def _gave_up(
    db: TargetDatabase,
    spec: IndexSpec,
    log: Log,
    conns: Connections | None,
    wait: LockWait,
    attempts: int,
) -> dg.Failure:
    """The failure after the last lock wait, once any INVALID leftover has been dropped."""
    left = _drop_invalid_leftover(db, spec, log, conns)
    where = spec.where(db)
    return refuse(
        f"gave up building index {where} on {spec.table_label(db)} after "
        f"{attempts} attempts: each waited {db.lock_timeout_ms} ms at most for a lock "
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
    )


def _drop_invalid_leftover(
    db: TargetDatabase, spec: IndexSpec, log: Log, conns: Connections | None = None
) -> bool:
    """Drop the INVALID index a failed build of `spec` left; True if one is still there."""
    if conns is not None and (conns.work.broken or conns.watch.broken):
        conns = None  # the failure took a connection with it: use fresh ones
    watch = conns.watch if conns else None
    leftover = lookup(db, spec, watch).named
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
    now = lookup(db, spec, watch).named
    return now is not None and not now.valid
