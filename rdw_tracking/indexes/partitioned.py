"""An index on a partitioned table (`ON ONLY` the parent, each partition's built and
attached) or an inheritance tree (the parent's and each child's)."""

import time
from dataclasses import dataclass, field, replace

# Only to catch the failures `refuse` raises below and add to their message.
import dagster as dg
import psycopg
from psycopg import sql

from rdw_tracking.errors import refuse
from rdw_tracking.indexes.connections import Connections, connections
from rdw_tracking.indexes.existing import ExistingIndex, lookup, matches, member_indexes
from rdw_tracking.indexes.sessions import LockWait, describe, raise_if_stuck, table_lock_holders
from rdw_tracking.indexes.specs import IndexSpec
from rdw_tracking.indexes.table import (
    IndexBuild,
    PartitionBuild,
    build_table_index,
    psycopg_errors,
    refuse_conflict,
)
from rdw_tracking.indexes.watch import Log, run_watched, with_lock_retries
from rdw_tracking.layout import Layout, Member, table_layout
from rdw_tracking.resources import TargetDatabase


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
        with psycopg_errors(db, spec):
            if conns is None:
                return run_watched(db, statement, what, log)
            # catalog only, over in milliseconds: no watcher thread; on a lock timeout the
            # sessions holding `on` or its indexes still hold them, and are named
            started = time.monotonic()
            try:
                conns.work.execute(statement)
            except psycopg.errors.LockNotAvailable as err:
                raise LockWait(what, table_lock_holders(conns.watch, on.oid)) from err
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


def _exists(conn: psycopg.Connection, oid: int) -> bool:
    return conn.execute("SELECT 1 FROM pg_class WHERE oid = %s::oid", [oid]).fetchone() is not None


def _valid(conn: psycopg.Connection, index_oid: int) -> bool:
    row = conn.execute(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::oid", [index_oid]
    ).fetchone()
    return bool(row and row[0])


def _children(layout: Layout, parent: Member) -> list[Member]:
    return [m for m in layout.members if m.parent_oid == parent.oid]


def _reusable(spec: IndexSpec, indexes: list[ExistingIndex]) -> ExistingIndex | None:
    """A valid index of `spec`'s definition on a partition, attached to nothing yet:
    the one of `spec`'s own name first."""
    free = [
        i for i in indexes if i.attached_to is None and i.valid and i.ready and matches(spec, i)
    ]
    return next((i for i in free if i.name == spec.name), free[0] if free else None)


def _continues_later(failure: dg.Failure, members: str) -> dg.Failure:
    """`failure`, its metadata kept, adding that the `members` already indexed stay so."""
    return refuse(
        f"{failure.description}. {members} already indexed stay so: the next "
        "run continues with the rest",
        **{k: v.value for k, v in (failure.metadata or {}).items()},
    )


@dataclass
class _Tree:
    """One build of `spec` on a partitioned table: the passes over its partition tree,
    and what each partition got (`done`, of the last pass)."""

    db: TargetDatabase
    spec: IndexSpec  # the contract index, on the parent
    layout: Layout
    log: Log
    retries: int
    backoff_s: float
    progress_every_s: float
    conns: Connections
    indexes: dict[int, list[ExistingIndex]] = field(default_factory=dict)
    done: list[PartitionBuild] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # partitions dropped mid-build

    def create_on_only(self) -> None:
        """The parent's index, catalog only: INVALID until every partition's is attached."""
        db, spec, layout = self.db, self.spec, self.layout
        self.log.info(
            f"{spec.where(db)}: creating it ON ONLY {layout.label} (INVALID until every "
            f"partition's index is attached), then on each of {len(layout.leaves)} "
            "partitions concurrently"
        )
        self.short_ddl(
            spec.create_on_only(db),
            f"CREATE INDEX {spec.where(db)} ON ONLY {layout.label}",
            spec,
            layout.root,
        )

    def until_valid(self) -> None:
        """Pass over the tree until the parent's index is valid: three passes at most."""
        for _ in range(3):  # a partition attached meanwhile is taken in by the next pass
            self.read_tree()
            root = self.layout.root
            root_index = next(i for i in self.indexes[root.oid] if i.name == self.spec.name)
            self.done = []
            self.complete(root, self.spec, root_index.oid)
            now = lookup(self.db, self.spec, self.conns.watch).named
            if now is not None and now.valid:
                return
        raise refuse(
            f"{self.spec.where(self.db)} is still INVALID after three passes over the "
            f"partitions of {self.layout.label} (partitions attached or detached all along?); "
            "run the job again"
        )

    def read_tree(self) -> None:
        """The partitions and their indexes as they are now, refused as at the start."""
        with self.conns.watch.cursor() as cur:
            self.layout = table_layout(cur, self.layout.schema, self.layout.table) or self.layout
            self.indexes = member_indexes(cur, self.layout)
        refusal = self.layout.refusal(f"building index {self.spec.where(self.db)}")
        if refusal:
            raise refuse(refusal)

    def complete(self, parent: Member, parent_spec: IndexSpec, parent_oid: int) -> None:
        """Give every partition under `parent` an index attached to `parent_oid`.

        A partition dropped meanwhile (a partition manager's retention) is skipped, in one
        sentence, and the others are finished; PostgreSQL does not re-judge the parent's
        index when a partition goes, so it is attached again (a no-op that re-judges it)."""
        attached_last: tuple[Member, IndexSpec] | None = None
        for child in _children(self.layout, parent):
            if child.relkind not in ("r", "p"):
                continue  # a foreign partition: refused before anything was built
            try:
                own = self.complete_child(child, parent_spec, parent_oid)
            except (dg.Failure, psycopg.Error):
                if _exists(self.conns.watch, child.oid):
                    raise
                self.log.warning(
                    f"{self.spec.where(self.db)}: partition {child.label} was dropped while "
                    "the job was indexing it, so it was skipped; the job goes on with the "
                    "partitions that still exist"
                )
                self.dropped.append(child.label)
                continue
            attached_last = (child, own)
        if attached_last is not None and not _valid(self.conns.watch, parent_oid):
            child, own = attached_last
            self.attach(parent_spec, own, child)

    def complete_child(self, child: Member, parent_spec: IndexSpec, parent_oid: int) -> IndexSpec:
        """`child`'s index, attached to `parent_oid`: the one it has, or made so."""
        on_child = self.indexes.get(child.oid, [])
        attached = next((i for i in on_child if i.attached_to == parent_oid), None)
        child_spec = self.spec.on_member(child)
        if attached is not None and attached.valid:
            self.record(child, attached.name, "unchanged", 0.0)
            own = replace(child_spec, name=attached.name)
            if child.relkind == "p":  # every partition below it is too: record them
                self.complete(child, own, attached.oid)
            return own
        if child.relkind == "p":
            return self.complete_subpartitioned(child, parent_spec, child_spec, attached, on_child)
        return self.complete_leaf(child, parent_spec, child_spec, attached, on_child)

    def complete_subpartitioned(
        self,
        child: Member,
        parent_spec: IndexSpec,
        child_spec: IndexSpec,
        attached: ExistingIndex | None,
        on_child: list[ExistingIndex],
    ) -> IndexSpec:
        """A sub-partitioned partition: its own `ON ONLY` index, completed below, attached."""
        started = time.monotonic()
        index, action = self.on_only_index(child, child_spec, attached, on_child)
        own = replace(child_spec, name=index.name)
        self.complete(child, own, index.oid)
        if attached is None:
            self.attach(parent_spec, own, child)
        self.record(child, index.name, action, time.monotonic() - started)
        return own

    def on_only_index(
        self,
        child: Member,
        child_spec: IndexSpec,
        attached: ExistingIndex | None,
        on_child: list[ExistingIndex],
    ) -> tuple[ExistingIndex, str]:
        """(the index a sub-partitioned `child` completes, what this run does with it):
        the one attached, else a reusable one, else ours from an interrupted run, else new."""
        if attached is not None:
            return attached, "completed"
        reuse = _reusable(child_spec, on_child)
        if reuse is not None:
            return reuse, "attached"
        named = next((i for i in on_child if i.name == child_spec.name), None)
        refuse_conflict(self.db, child_spec, named, self.conns.watch)
        if named is not None:
            return named, "completed"
        self.short_ddl(
            child_spec.create_on_only(self.db),
            f"CREATE INDEX {child_spec.where(self.db)} ON ONLY {child.label}",
            child_spec,
            child,
        )
        return lookup(self.db, child_spec, self.conns.watch).named, "created"

    def complete_leaf(
        self,
        child: Member,
        parent_spec: IndexSpec,
        child_spec: IndexSpec,
        attached: ExistingIndex | None,
        on_child: list[ExistingIndex],
    ) -> IndexSpec:
        """A partition holding rows: an equivalent index it has, or one built, attached."""
        started = time.monotonic()
        if attached is not None:  # an INVALID index attached: only REINDEX mends it
            raise refuse(
                f"index {child.schema}.{attached.name} of partition {child.label} is "
                f"attached to {self.spec.where(self.db)} but INVALID; nothing more was "
                f"changed. Run REINDEX INDEX CONCURRENTLY {child.schema}.{attached.name}, "
                "then the job again"
            )
        reuse = _reusable(child_spec, on_child)
        if reuse is not None:
            own, action = replace(child_spec, name=reuse.name), "attached"
        else:
            try:
                build = build_table_index(
                    self.db,
                    child_spec,
                    self.log,
                    self.retries,
                    self.backoff_s,
                    self.progress_every_s,
                    self.conns,
                    on_child,
                )
            except dg.Failure as failure:
                raise _continues_later(failure, "Partitions") from None
            own, action = replace(child_spec, name=build.equivalent or build.name), build.action
        self.attach(parent_spec, own, child)
        self.record(child, own.name, action, time.monotonic() - started)
        return own

    def attach(self, parent_spec: IndexSpec, index: IndexSpec, child: Member) -> None:
        self.short_ddl(
            parent_spec.attach(self.db, index),
            f"ALTER INDEX {parent_spec.where(self.db)} ATTACH PARTITION {index.where(self.db)}",
            index,
            child,
        )

    def short_ddl(self, statement: sql.Composable, what: str, spec: IndexSpec, on: Member) -> None:
        run_short_ddl(
            self.db, statement, what, spec, on, self.log, self.retries, self.backoff_s, self.conns
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
        tree = _Tree(db, spec, layout, log, retries, backoff_s, progress_every_s, conns)
        return _build_partitioned(tree)


def _build_partitioned(tree: _Tree) -> IndexBuild:
    db, spec, log, conns = tree.db, tree.spec, tree.log, tree.conns
    where = spec.where(db)
    named, on_root = lookup(db, spec, conns.watch)
    refuse_conflict(db, spec, named, conns.watch)
    on_every_partition = [i for i in on_root if i.partitioned and i.valid and matches(spec, i)]
    if named is None and on_every_partition:
        equivalent = on_every_partition[0]
        log.info(
            f"{where} not built: {spec.schema_of(db)}.{equivalent.name} already is that "
            f"index on every partition ({equivalent.definition})"
        )
        return IndexBuild(spec.name, "equivalent", equivalent=equivalent.name)
    started = time.monotonic()
    if named is None:
        tree.create_on_only()
    elif not named.valid:
        log.info(f"{where} is INVALID: continuing with the partitions not yet attached")
    tree.until_valid()
    action = "created" if named is None else ("unchanged" if named.valid else "rebuilt")
    if action == "unchanged" and any(p.action != "unchanged" for p in tree.done):
        action = "completed"
    seconds = round(time.monotonic() - started, 3)
    log.info(
        f"{where}: {action} on {tree.layout.label} and its {len(tree.done)} partitions in "
        f"{seconds:.2f} s"
    )
    return IndexBuild(spec.name, action, seconds, partitions=tree.done)


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
            except (dg.Failure, psycopg.Error) as failure:
                if not _exists(conns.watch, child.oid):
                    log.warning(
                        f"{spec.where(db)}: child table {child.label} was dropped while the "
                        "job was indexing it, so it was skipped; the job goes on with the "
                        "child tables that still exist"
                    )
                    continue
                if isinstance(failure, psycopg.Error):
                    raise
                raise _continues_later(failure, "Child tables") from None
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
