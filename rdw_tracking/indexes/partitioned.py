"""An index on a partitioned table (`ON ONLY` the parent, each partition's built and
attached) or an inheritance tree (the parent's and each child's)."""

import time
from dataclasses import dataclass, replace

import dagster as dg
import psycopg
from psycopg import sql

from rdw_tracking.errors import refuse
from rdw_tracking.indexes.connections import Connections, connections
from rdw_tracking.indexes.existing import ExistingIndex, lookup, matches, member_indexes
from rdw_tracking.indexes.sessions import HOLDERS, LockWait, Session, describe, raise_if_stuck
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
                holders = conns.watch.execute(HOLDERS, {"oid": on.oid}).fetchall()
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
