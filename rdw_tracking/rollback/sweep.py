"""The final sweep: matched rows the walk skipped or missed (updated meanwhile, or moved
behind it), found by (leaf, ctid) and cleared, a few rounds while writers keep touching
them; and what is left once it is done."""

from dataclasses import dataclass, field

from psycopg import sql

from rdw_tracking.errors import refuse
from rdw_tracking.resources import long_statements
from rdw_tracking.rollback import ROLLBACK_JOB
from rdw_tracking.rollback.matched import MATCHED
from rdw_tracking.rollback.walk import BY_CTID, Leaf, LeafGone, Walker

SWEEP_ROUNDS = 5


@dataclass(frozen=True)
class Swept:
    """What the sweep did and left: rows it cleared; matched rows left in the run's own
    leaves (only under `visible_rows_only`: rows its row-level security hides or forbids);
    matched rows in leaves that joined the table during the run, per leaf."""

    rows: int
    left: int = 0
    joined: dict[str, int] = field(default_factory=dict)


def sweep(walker: Walker, size: int) -> Swept:
    """Rows the walk skipped or missed still match: find them by (leaf, ctid), a few
    rounds while writers keep touching them; what was swept and what is left."""
    find = sql.SQL("SELECT tableoid::bigint, ctid::text FROM {weeks} WHERE {matched}").format(
        weeks=walker.db.weeks, matched=MATCHED
    )
    swept, last = 0, None
    for round_ in range(SWEEP_ROUNDS + 1):
        leftover: dict[int, list[str]] = {}
        with long_statements(walker.conn, walker.db.statement_timeout_ms):  # a full scan
            found = walker.conn.execute(find, walker.params).fetchall()
        for oid, ctid in found:
            leftover.setdefault(oid, []).append(ctid)
        ours = {oid: ctids for oid, ctids in leftover.items() if walker.ours(oid)}
        # Rows the role's policies keep from it stay put, round after round.
        stuck = walker.visible_rows_only and last == 0
        if not ours or stuck or round_ == SWEEP_ROUNDS:
            break
        last = sum(sweep_leaf(walker, oid, ctids, size) for oid, ctids in sorted(ours.items()))
        swept += last
    left = sum(len(ctids) for ctids in ours.values())
    if left and not walker.visible_rows_only:
        raise refuse(
            f"{walker.what}: {left:,} matched rows kept changing under {SWEEP_ROUNDS} "
            f"sweeps; run {ROLLBACK_JOB} again with cutoff_date {walker.state.cutoff} to "
            "continue once writes calm down"
        )
    joined = {}
    for oid, ctids in sorted(leftover.items()):
        if oid not in walker.leaves:
            leaf = Leaf.find(walker.conn, oid)
            joined[leaf.label if leaf else f"table oid {oid}"] = len(ctids)
    return Swept(swept, left, joined)


def sweep_leaf(walker: Walker, oid: int, ctids: list[str], size: int) -> int:
    """Clear the rows at `ctids` of leaf `oid` in batches of `size`; the rows cleared."""
    swept = 0
    leaf = Leaf.find(walker.conn, oid)
    try:
        if leaf is None:
            raise LeafGone(f"table oid {oid}")
        for i in range(0, len(ctids), size):
            chunk = {"ctids": ctids[i : i + size]}
            swept += walker.batch(leaf, BY_CTID, chunk, "sweeping", 0).rows
    except LeafGone as gone:
        walker.left_alone(str(gone))
    return swept
