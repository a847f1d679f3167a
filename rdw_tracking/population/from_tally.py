"""The snapshot from the per-day tally (`rdw_tracking.tally`): the days it holds, the rows
since it was taken, and the latest rows through the created_at index."""

import datetime as dt

import psycopg
from psycopg import sql

from rdw_tracking.population import samples
from rdw_tracking.population.model import (
    ROW_SAMPLE_SIZE,
    Counts,
    Orphans,
    Snapshot,
)
from rdw_tracking.population.one_pass import (
    window_bounds,
    window_days_of,
)
from rdw_tracking.population.orphans import (
    orphan_sample,
)
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.tally import Tally, midnight

LATEST_SQL = """
SELECT id, collection_id, week_start_date, status, execution_id, created_at
FROM {weeks} WHERE created_at IS NOT NULL ORDER BY created_at DESC LIMIT %(limit)s
"""


PART_OF_DAY_SQL = """
SELECT count(*), count(execution_id) FROM {weeks}
WHERE created_at >= %(since)s AND created_at < %(until)s
"""


def counts_since(
    cur: psycopg.Cursor, db: TargetDatabase, tally: Tally, since: dt.datetime
) -> Counts:
    """Rows created at or after `since`: whole days from the tally, the rest of a day
    that `since` starts within counted from the table (an index range)."""
    day = since.astimezone(dt.timezone.utc).date()
    if since == midnight(day):
        total = tally.total(day)
        return Counts(total.rows, total.stamped)
    after = tally.total(day + dt.timedelta(days=1))
    rows, stamped = cur.execute(
        sql.SQL(PART_OF_DAY_SQL).format(weeks=db.weeks),
        {"since": since, "until": midnight(day + dt.timedelta(days=1))},
    ).fetchone()
    return Counts(after.rows + rows, after.stamped + stamped)


def snapshot_from_tally(
    cur: psycopg.Cursor,
    db: TargetDatabase,
    tally: Tally,
    window_days: int,
    started_at: dt.datetime | None,
) -> Snapshot:
    """The snapshot `take_snapshot` would take, from an up-to-date tally: only the rows
    of part of a day and the five latest rows are read from the table."""
    bounds = window_bounds(cur, window_days, started_at)
    today, window_start = bounds.today, bounds.window_start
    overall = tally.total()
    recent = counts_since(cur, db, tally, bounds.recent_since)
    since_tracking = counts_since(cur, db, tally, started_at) if started_at else None
    groups = {
        d: Counts(c.rows, c.stamped)
        for d, c in tally.days.items()
        if d is not None and d >= window_start
    }
    daily = window_days_of(today, window_start, groups)
    orphans = None
    if tally.with_executions:
        total = tally.total().orphans
        recent_orphans = tally.total(today - dt.timedelta(days=1)).orphans
        sample = orphan_sample(cur, db) if total else []
        orphans = Orphans(total, recent_orphans, sample, proof=tally.orphan_proof)
    # Through the module, so a test that wraps samples.fetch_rows sees this read too.
    sample = samples.fetch_rows(
        cur, sql.SQL(LATEST_SQL).format(weeks=db.weeks), {"limit": ROW_SAMPLE_SIZE}
    )
    return Snapshot(
        today=today,
        window_start=window_start,
        recent_since=bounds.recent_since,
        overall=Counts(overall.rows, overall.stamped),
        recent=recent,
        since_tracking=since_tracking,
        daily=daily,
        orphans=orphans,
        sample=sample,
    )
