"""The final sweep: matched rows the walk skipped or missed (updated meanwhile, or moved
behind it), found by (leaf, ctid) and cleared, a few rounds while writers keep touching
them."""

from psycopg import sql

from rdw_tracking.errors import refuse
from rdw_tracking.rollback import ROLLBACK_JOB
from rdw_tracking.rollback.matched import MATCHED
from rdw_tracking.rollback.walk import BY_CTID, Leaf, LeafGone, Walker

SWEEP_ROUNDS = 5


def sweep(walker: Walker, size: int) -> int:
    """Rows the walk skipped or missed still match: find them by (leaf, ctid), a few
    rounds while writers keep touching them; the rows swept."""
    find = sql.SQL("SELECT tableoid::bigint, ctid::text FROM {weeks} WHERE {matched}").format(
        weeks=walker.db.weeks, matched=MATCHED
    )
    swept = 0
    for _ in range(SWEEP_ROUNDS):
        leftover: dict[int, list[str]] = {}
        for oid, ctid in walker.conn.execute(find, walker.params).fetchall():
            leftover.setdefault(oid, []).append(ctid)
        leftover = {oid: ctids for oid, ctids in leftover.items() if walker.ours(oid)}
        if not leftover:
            return swept
        for oid, ctids in sorted(leftover.items()):
            swept += sweep_leaf(walker, oid, ctids, size)
    conn = walker.conn
    left = sum(1 for oid, _ in conn.execute(find, walker.params) if oid in walker.leaves)
    if left:
        raise refuse(
            f"{walker.what}: {left:,} matched rows kept changing under {SWEEP_ROUNDS} "
            f"sweeps; run {ROLLBACK_JOB} again with cutoff_date {walker.state.cutoff} to "
            "continue once writes calm down"
        )
    return swept


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
