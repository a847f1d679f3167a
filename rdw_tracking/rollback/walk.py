"""The block walk: each leaf's planned block ranges cleared in turn, one batch at a time,
each batch backing its rows up and advancing the state row in its own transaction.

A leaf is one physical table of the weeks table (the table itself, a partition or an
inheritance child): a ctid names a row only inside its own heap, so every batch works on
one leaf, and a leaf that leaves the table mid-run is left alone from then on.
"""

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from rdw_tracking import catalog
from rdw_tracking.layout import is_member, member_by_oid
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.rollback.backup import BackupTables
from rdw_tracking.rollback.batches import in_one_transaction
from rdw_tracking.rollback.matched import MATCHED, Survey, matched
from rdw_tracking.rollback.pace import (
    WAL_BUDGET_SHARE,
    LastBatch,
    ReplicaLag,
    batch_rows,
    wait_for_wal_room,
    wal_buffers_bytes,
)
from rdw_tracking.rollback.progress import Log, Progress
from rdw_tracking.rollback.state import ADVANCE, RollbackState
from rdw_tracking.tally import midnight


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
    log: Log
    # The table's leaves when the run started: the matched set is their rows. A partition
    # attached later brings rows the dry run never counted; they are left alone.
    leaves: frozenset[int] = frozenset()
    # Under row-level security the user let apply: rows it keeps from the run stay put.
    visible_rows_only: bool = False
    max_replica_lag_s: float = 0.0
    progress: Progress = field(init=False)
    replicas: ReplicaLag = field(init=False)
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
        self.replicas = ReplicaLag(self.max_replica_lag_s, self.log, self.what)

    def batch(
        self, leaf: Leaf, where: sql.Composable, extra: dict, phase: str, next_block: int
    ) -> LastBatch:
        """Clear the matched rows of `leaf` that `where` selects; LeafGone if it left."""
        self.replicas.wait(self.conn, self.mark)
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
            "started (created or attached, or rows moved into it): this run leaves its "
            "rows alone and ends failed, and the next run continues the rollback with it"
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
