"""The per-day tally of the weeks table: rows, stamped rows and orphaned ids for every UTC
creation day, kept between runs and brought up to date by recounting only what changed.

A validation after every collection run cannot afford to read the whole table. The
tally makes it read only the days since the previous tally, and proves that older days
did not change from the server's own activity counters (`pg_stat_all_tables`, summed
over every partition or child that holds rows):

- the rows inserted since then (`n_tup_ins`) all sit in the recounted days;
- no row was deleted or moved to a new version by an update that could change
  `created_at` or `execution_id` (`n_tup_upd - n_tup_hot_upd`: a HOT update changes no
  indexed column, and `execution_id` is indexed);
- no `workflow_executions` row was deleted, and the table, its partitions and the
  server's statistics are the same ones (no TRUNCATE, rewrite, attach/detach, reset,
  restart).

Orphaned ids of older days can only disappear (their execution being inserted late):
the tally keeps them and asks `workflow_executions` about those ids only. When any of
this cannot be shown, the tally counts the whole table again and says why. The counters
are updated by each backend shortly after its transaction ends, so a change made in the
last seconds can be proven only at the next run: the check is conservative, and a miss
is caught then. Nothing here imports Dagster.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal

import psycopg
from psycopg import sql
from psycopg.rows import class_row, namedtuple_row

from rdw_tracking.layout import Layout

VERSION = 3
# Rows are stamped `created_at = now()` when their transaction starts: a run that began
# shortly before the previous tally commits rows dated before it.
LOOKBACK = dt.timedelta(hours=1)
# Orphaned ids kept by name; beyond this, older days' orphans are recounted each time.
ORPHAN_IDS_MAX = 20_000
# A full recount at least this often, whatever the counters say (a changed execution id,
# which the counters cannot tell from a status update, is caught by it).
FULL_RECOUNT_DAYS = 7
STATS_RETRIES = 4
STATS_WAIT_S = 0.25


def rate(with_execution_id: int, total: int) -> float | None:
    """The spec's ROUND(with * 100.0 / total, 2), exactly; None without rows."""
    if not total:
        return None
    exact = Decimal(with_execution_id) * 100 / Decimal(total)
    return float(exact.quantize(Decimal("0.01"), ROUND_HALF_UP))


@dataclass(frozen=True)
class DayTally:
    rows: int
    stamped: int
    orphans: int = 0

    def __add__(self, other: DayTally) -> DayTally:
        return DayTally(
            self.rows + other.rows, self.stamped + other.stamped, self.orphans + other.orphans
        )

    def __sub__(self, other: DayTally) -> DayTally:
        return DayTally(
            self.rows - other.rows, self.stamped - other.stamped, self.orphans - other.orphans
        )


ZERO = DayTally(0, 0, 0)
Day = dt.date | None  # None: rows without a created_at
OrphanIds = dict[str, dict[Day, int]]  # execution_id -> day -> rows pointing at it


@dataclass(frozen=True)
class Part:
    """Counts of some rows per day, with the orphaned ids among them."""

    days: dict[Day, DayTally]
    orphan_ids: OrphanIds


@dataclass(frozen=True)
class Counters:
    """What the statistics say happened to the tables (summed over their leaves)."""

    inserted: int = 0
    moved: int = 0  # non-HOT updates: may have changed created_at or execution_id
    deleted: int = 0
    executions_deleted: int = 0
    executions_inserted: int = 0


@dataclass(frozen=True)
class Tally:
    days: dict[Day, DayTally]
    orphan_ids: dict[str, dict[Day, int]] | None  # None: too many to keep, or no executions
    with_executions: bool
    taken_at: dt.datetime
    counters: Counters  # the server's figures when the tally was taken
    expected_inserts: int  # inserts the days account for (ahead of counters while they lag)
    epoch: list
    full_at: dt.datetime
    # The tail: rows created at or after `tail_from` (and rows without created_at) as
    # they were counted; the next tally counts only the tail again, and what came since.
    tail_from: dt.datetime
    tail: Part
    snapshot_xmax: int  # the snapshot's xmax (xid8): rows written later have a newer xmin
    expected_executions: int  # workflow_executions inserts accounted for (like expected_inserts)
    recounted_from: dt.date | None = None  # None: the whole table was counted
    reason: str = ""  # why the whole table was counted, or how older days were proven
    waited_s: float = 0.0

    @property
    def full(self) -> bool:
        return self.recounted_from is None

    def total(self, since: dt.date | None = None) -> DayTally:
        """Every day at or after `since` (None: every row, those without created_at too)."""
        total = ZERO
        for day, counts in self.days.items():
            if since is None or (day is not None and day >= since):
                total += counts
        return total

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": VERSION,
                "days": {_key(d): [c.rows, c.stamped, c.orphans] for d, c in self.days.items()},
                "orphan_ids": None
                if self.orphan_ids is None
                else {i: {_key(d): n for d, n in by.items()} for i, by in self.orphan_ids.items()},
                "with_executions": self.with_executions,
                "taken_at": self.taken_at.isoformat(),
                "counters": self.counters.__dict__,
                "expected_inserts": self.expected_inserts,
                "epoch": self.epoch,
                "full_at": self.full_at.isoformat(),
                "tail_from": self.tail_from.isoformat(),
                "tail": _part_json(self.tail),
                "snapshot_xmax": self.snapshot_xmax,
                "expected_executions": self.expected_executions,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Tally | None:
        """The stored tally, or None if it is unreadable or of another version."""
        try:
            raw = json.loads(text)
            if raw.get("version") != VERSION:
                return None
            orphan_ids = raw["orphan_ids"]
            return cls(
                days={_day(k): DayTally(*v) for k, v in raw["days"].items()},
                orphan_ids=None
                if orphan_ids is None
                else {i: {_day(k): n for k, n in by.items()} for i, by in orphan_ids.items()},
                with_executions=raw["with_executions"],
                taken_at=dt.datetime.fromisoformat(raw["taken_at"]),
                counters=Counters(**raw["counters"]),
                expected_inserts=raw["expected_inserts"],
                epoch=raw["epoch"],
                full_at=dt.datetime.fromisoformat(raw["full_at"]),
                tail_from=dt.datetime.fromisoformat(raw["tail_from"]),
                tail=_part(raw["tail"]),
                snapshot_xmax=raw["snapshot_xmax"],
                expected_executions=raw["expected_executions"],
            )
        except (ValueError, KeyError, TypeError):
            return None


def _part_json(part: Part) -> dict:
    return {
        "days": {_key(d): [c.rows, c.stamped, c.orphans] for d, c in part.days.items()},
        "orphan_ids": {i: {_key(d): n for d, n in by.items()} for i, by in part.orphan_ids.items()},
    }


def _part(raw: dict) -> Part:
    return Part(
        {_day(k): DayTally(*v) for k, v in raw["days"].items()},
        {i: {_day(k): n for k, n in by.items()} for i, by in raw["orphan_ids"].items()},
    )


def _key(day: Day) -> str:
    return "null" if day is None else day.isoformat()


def _day(key: str) -> Day:
    return None if key == "null" else dt.date.fromisoformat(key)


def midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc)


# -- what the server says happened ---------------------------------------------------------

COUNTERS_SQL = """
SELECT coalesce(sum(s.n_tup_ins), 0)::bigint AS inserted,
       coalesce(sum(s.n_tup_upd - s.n_tup_hot_upd), 0)::bigint AS moved,
       coalesce(sum(s.n_tup_del), 0)::bigint AS deleted,
       (SELECT coalesce(sum(x.n_tup_del), 0)::bigint FROM pg_stat_all_tables x
        WHERE x.relid = ANY(%(executions)s::oid[])) AS executions_deleted,
       (SELECT coalesce(sum(x.n_tup_ins), 0)::bigint FROM pg_stat_all_tables x
        WHERE x.relid = ANY(%(executions)s::oid[])) AS executions_inserted
FROM pg_stat_all_tables s WHERE s.relid = ANY(%(leaves)s::oid[])
"""
# What must stay the same for counters to be compared: the server run, the statistics,
# and each physical table (a TRUNCATE or rewrite gives it a new file).
EPOCH_SQL = """
SELECT pg_postmaster_start_time()::text AS started,
       (SELECT stats_reset::text FROM pg_stat_database WHERE datname = current_database())
         AS stats_reset,
       ARRAY(SELECT oid::text || ':' || pg_relation_filenode(oid)::text
             FROM unnest(%(relations)s::oid[]) AS oid ORDER BY 1) AS filenodes
"""
# The physical tables of workflow_executions: itself, its partitions or its children.
EXECUTION_LEAVES_SQL = """
WITH RECURSIVE tree AS (
    SELECT %(table)s::regclass::oid AS oid
    UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid)
SELECT coalesce(array_agg(t.oid), '{}') FROM tree t JOIN pg_class c ON c.oid = t.oid
WHERE c.relkind = 'r'
"""


def read_counters(cur: psycopg.Cursor, leaves: list[int], executions: list[int]) -> Counters:
    cur.execute("SELECT pg_stat_clear_snapshot()")  # fresh figures, not the transaction's cache
    with cur.connection.cursor(row_factory=class_row(Counters)) as by_name:
        return by_name.execute(
            COUNTERS_SQL, {"leaves": leaves, "executions": executions}
        ).fetchone()


def execution_leaves(cur: psycopg.Cursor, table: sql.Identifier) -> list[int]:
    name = table.as_string(cur)
    return list(cur.execute(EXECUTION_LEAVES_SQL, {"table": name}).fetchone()[0])


# -- counting -------------------------------------------------------------------------------

DAYS_SQL = """
SELECT w.created_at::date AS day, count(*) AS rows, count(w.execution_id) AS stamped
FROM {weeks} AS w WHERE {where} GROUP BY 1
"""
# Orphans of recent days: group first, so workflow_executions is asked once per id.
RECENT_ORPHANS_SQL = """
SELECT d.day, d.execution_id::text, d.n FROM (
    SELECT w.created_at::date AS day, w.execution_id, count(*) AS n
    FROM {weeks} AS w WHERE w.execution_id IS NOT NULL AND ({where}) GROUP BY 1, 2) AS d
WHERE NOT EXISTS (SELECT 1 FROM {executions} AS e WHERE e.id = d.execution_id)
"""
# Every orphaned id: each distinct id once (an index-only scan of the execution_id
# index, in id order, beside workflow_executions' primary key).
ORPHAN_IDS_SQL = """
SELECT d.execution_id::text FROM (
    SELECT DISTINCT execution_id FROM {weeks} WHERE execution_id IS NOT NULL) AS d
WHERE NOT EXISTS (SELECT 1 FROM {executions} AS e WHERE e.id = d.execution_id)
LIMIT %(limit)s
"""
ORPHAN_DAYS_SQL = """
SELECT created_at::date, execution_id::text, count(*) FROM {weeks}
WHERE execution_id = ANY(%(ids)s::uuid[]) GROUP BY 1, 2
"""
# Beyond ORPHAN_IDS_MAX ids: counts per day only.
ORPHANS_PER_DAY_SQL = """
SELECT w.created_at::date, count(*) FROM {weeks} AS w
WHERE w.execution_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM {executions} AS e WHERE e.id = w.execution_id)
GROUP BY 1
"""
STILL_ORPHANED_SQL = """
SELECT i FROM unnest(%(ids)s::uuid[]) AS i
WHERE NOT EXISTS (SELECT 1 FROM {executions} AS e WHERE e.id = i)
"""
SINCE = "w.created_at >= %(since)s"
NO_CREATED_AT = "w.created_at IS NULL"
# The rows since the previous tail began, and among them the new tail.
IN_NEW_TAIL = "(w.created_at >= %(new_from)s OR w.created_at IS NULL)"
TAIL_DAYS_SQL = """
SELECT w.created_at::date AS day, count(*) AS rows, count(w.execution_id) AS stamped,
       count(*) FILTER (WHERE {in_new}) AS tail_rows,
       count(w.execution_id) FILTER (WHERE {in_new}) AS tail_stamped
FROM {weeks} AS w WHERE {where} GROUP BY 1
"""
TAIL_ORPHANS_SQL = """
SELECT d.day, d.execution_id::text AS execution_id, d.n, d.tail_n FROM (
    SELECT w.created_at::date AS day, w.execution_id, count(*) AS n,
           count(*) FILTER (WHERE {in_new}) AS tail_n
    FROM {weeks} AS w WHERE w.execution_id IS NOT NULL AND ({where}) GROUP BY 1, 2) AS d
WHERE NOT EXISTS (SELECT 1 FROM {executions} AS e WHERE e.id = d.execution_id)
"""


@dataclass
class Tables:
    """The names and physical tables a tally reads."""

    weeks: sql.Identifier
    executions: sql.Identifier | None  # None: workflow_executions does not exist
    layout: Layout
    execution_leaves: list[int] = field(default_factory=list)

    @property
    def leaves(self) -> list[int]:
        return [m.oid for m in self.layout.leaves]


def by_name(cur: psycopg.Cursor, statement: sql.Composable | str, params: dict) -> list:
    """The rows of `statement`, each a named tuple of its columns' labels."""
    with cur.connection.cursor(row_factory=namedtuple_row) as named:
        return named.execute(statement, params).fetchall()


def _days(cur: psycopg.Cursor, t: Tables, where: str, params: dict) -> dict[Day, DayTally]:
    cur.execute(sql.SQL(DAYS_SQL).format(weeks=t.weeks, where=sql.SQL(where)), params)
    return {day: DayTally(rows, stamped) for day, rows, stamped in cur.fetchall()}


def _with_orphans(
    days: dict[Day, DayTally], orphan_ids: dict[str, dict[Day, int]]
) -> dict[Day, DayTally]:
    per_day: dict[Day, int] = {}
    for by_day in orphan_ids.values():
        for day, n in by_day.items():
            per_day[day] = per_day.get(day, 0) + n
    return {d: replace(c, orphans=c.orphans + per_day.get(d, 0)) for d, c in days.items()}


def count_all(cur: psycopg.Cursor, t: Tables) -> tuple[dict[Day, DayTally], dict | None]:
    """Every day of the table, with its orphans: (days, orphan ids or None if too many)."""
    days = _days(cur, t, "true", {})
    if t.executions is None:
        return days, None
    ids = [
        row[0]
        for row in cur.execute(
            sql.SQL(ORPHAN_IDS_SQL).format(weeks=t.weeks, executions=t.executions),
            {"limit": ORPHAN_IDS_MAX + 1},
        ).fetchall()
    ]
    if len(ids) > ORPHAN_IDS_MAX:
        statement = sql.SQL(ORPHANS_PER_DAY_SQL).format(weeks=t.weeks, executions=t.executions)
        per_day = dict(cur.execute(statement).fetchall())
        return {d: replace(c, orphans=per_day.get(d, 0)) for d, c in days.items()}, None
    orphan_ids: dict[str, dict[Day, int]] = {}
    if ids:
        statement = sql.SQL(ORPHAN_DAYS_SQL).format(weeks=t.weeks)
        for day, execution_id, n in cur.execute(statement, {"ids": ids}).fetchall():
            orphan_ids.setdefault(execution_id, {})[day] = n
    return _with_orphans(days, orphan_ids), orphan_ids


def still_orphaned(cur: psycopg.Cursor, t: Tables, ids: list[str]) -> set[str]:
    if not ids:
        return set()
    statement = sql.SQL(STILL_ORPHANED_SQL).format(executions=t.executions)
    return {str(row[0]) for row in cur.execute(statement, {"ids": ids}).fetchall()}


# -- bringing a tally up to date ------------------------------------------------------------


def why_not_incremental(
    previous: Tally | None, now: dt.datetime, counters: Counters, epoch: list, t: Tables
) -> str | None:
    """Why older days cannot be taken from `previous` (None: they can, if inserts balance)."""
    if previous is None:
        return "no earlier tally"
    if previous.epoch != epoch:
        return (
            "the server restarted, its statistics were reset, or a table was truncated, "
            "rewritten, attached or detached since the last tally"
        )
    if previous.with_executions != (t.executions is not None):
        return "workflow_executions appeared or disappeared since the last tally"
    if now - previous.full_at > dt.timedelta(days=FULL_RECOUNT_DAYS):
        return f"the last full count is more than {FULL_RECOUNT_DAYS} days old"
    before = previous.counters
    if counters.inserted < before.inserted:
        return "the statistics of the weeks table were reset since the last tally"
    if counters.moved != before.moved or counters.deleted != before.deleted:
        changed = (counters.moved - before.moved) + (counters.deleted - before.deleted)
        return (
            f"{changed} row(s) were updated (created_at or execution_id may have changed) "
            "or deleted since the last tally"
        )
    if counters.executions_deleted != before.executions_deleted:
        return "workflow_executions rows were deleted since the last tally"
    return None


def count_tail(
    cur: psycopg.Cursor, t: Tables, since: dt.datetime, new_from: dt.datetime
) -> tuple[Part, Part]:
    """(the rows created at or after `since`, the rows at or after `new_from` among them),
    rows without created_at in both: counts per day with their orphaned ids."""
    parts = {"in_new": sql.SQL(IN_NEW_TAIL), "weeks": t.weeks}
    params = {"since": since, "new_from": new_from}
    seen: dict[Day, DayTally] = {}
    tail: dict[Day, DayTally] = {}
    seen_orphans: OrphanIds = {}
    tail_orphans: OrphanIds = {}
    for where in (SINCE, NO_CREATED_AT):
        statement = sql.SQL(TAIL_DAYS_SQL).format(where=sql.SQL(where), **parts)
        for row in by_name(cur, statement, params):
            seen[row.day] = DayTally(row.rows, row.stamped)
            if row.tail_rows:
                tail[row.day] = DayTally(row.tail_rows, row.tail_stamped)
        if t.executions is None:
            continue
        statement = sql.SQL(TAIL_ORPHANS_SQL).format(
            where=sql.SQL(where), executions=t.executions, **parts
        )
        for row in by_name(cur, statement, params):
            seen_orphans.setdefault(row.execution_id, {})[row.day] = row.n
            if row.tail_n:
                tail_orphans.setdefault(row.execution_id, {})[row.day] = row.tail_n
    return (
        Part(_with_orphans(seen, seen_orphans), seen_orphans),
        Part(_with_orphans(tail, tail_orphans), tail_orphans),
    )


def _moment(cur: psycopg.Cursor, t: Tables) -> tuple[list, dt.datetime, Counters]:
    """(the epoch, the snapshot's now(), the counters) at the start of a tally."""
    if t.executions is not None and not t.execution_leaves:
        t.execution_leaves = execution_leaves(cur, t.executions)
    (row,) = by_name(cur, EPOCH_SQL, {"relations": t.leaves + t.execution_leaves})
    epoch = [row.started, row.stats_reset, list(row.filenodes)]  # as a tally stores it
    now = cur.execute("SELECT now()").fetchone()[0]
    return epoch, now, read_counters(cur, t.leaves, t.execution_leaves)


XMAX_SQL = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"


def snapshot_xmax(cur: psycopg.Cursor) -> int:
    return cur.execute(XMAX_SQL).fetchone()[0]


def update(cur: psycopg.Cursor, t: Tables, previous: Tally | None) -> Tally:
    """The tally now: `previous` with its tail and what came since recounted when the
    counters show nothing else changed, else the whole table counted. `cur` must be in a
    fresh REPEATABLE READ transaction, so every count sees one snapshot."""
    epoch, now, counters = _moment(cur, t)
    reason = why_not_incremental(previous, now, counters, epoch, t)
    if reason is None:
        incremental = _incremental(cur, t, previous, now, counters)
        if isinstance(incremental, Tally):
            return incremental
        reason = incremental
    days, orphan_ids = count_all(cur, t)
    _, tail = count_tail(cur, t, now - LOOKBACK, now - LOOKBACK)
    return Tally(
        days=days,
        orphan_ids=orphan_ids,
        with_executions=t.executions is not None,
        taken_at=now,
        counters=counters,
        expected_inserts=counters.inserted,
        epoch=epoch,
        full_at=now,
        tail_from=now - LOOKBACK,
        tail=tail,
        snapshot_xmax=snapshot_xmax(cur),
        expected_executions=counters.executions_inserted,
        recounted_from=None,
        reason=reason,
    )


def _growth(
    cur: psycopg.Cursor, t: Tables, previous: Tally, seen: Part
) -> tuple[int, int, Counters, float]:
    """(rows added since the previous tally, inserts the counters report, the counters,
    seconds waited for them). A backend reports its inserts shortly after its commit:
    rows the snapshot sees may not be counted yet, so wait a little for them; past that
    they are accounted for now (the next tally then expects them)."""
    growth = sum(c.rows for c in seen.days.values()) - sum(
        c.rows for c in previous.tail.days.values()
    )
    counters = read_counters(cur, t.leaves, t.execution_leaves)
    inserted = counters.inserted - previous.expected_inserts
    waited = 0.0
    for _ in range(STATS_RETRIES):
        if inserted >= growth:
            break
        time.sleep(STATS_WAIT_S)
        waited += STATS_WAIT_S
        counters = read_counters(cur, t.leaves, t.execution_leaves)
        inserted = counters.inserted - previous.expected_inserts
    return growth, inserted, counters, waited


def _minus(ids: OrphanIds, less: OrphanIds) -> OrphanIds:
    """Orphaned ids of `ids` once the rows of `less` are taken out."""
    kept: OrphanIds = {}
    for execution_id, by_day in ids.items():
        for day, n in by_day.items():
            left = n - less.get(execution_id, {}).get(day, 0)
            if left > 0:
                kept.setdefault(execution_id, {})[day] = left
    return kept


def _merge(ids: OrphanIds, more: OrphanIds) -> OrphanIds:
    merged = {i: dict(by) for i, by in ids.items()}
    for execution_id, by_day in more.items():
        for day, n in by_day.items():
            merged.setdefault(execution_id, {})[day] = merged.get(execution_id, {}).get(day, 0) + n
    return merged


# workflow_executions rows referenced by the rows since the tail began, with their xmin.
REFERENCED_SQL = """
SELECT e.id::text, e.xmin::text::bigint FROM {executions} AS e
WHERE e.id IN (SELECT w.execution_id FROM {weeks} AS w
               WHERE (w.created_at >= %(since)s OR w.created_at IS NULL)
                 AND w.execution_id IS NOT NULL)
"""


def _resolved_by_new_executions(
    cur: psycopg.Cursor, t: Tables, previous: Tally, counters: Counters
) -> set[str] | None:
    """The ids that can have stopped being orphans since `previous`, when that is cheap to
    know, else None (ask every older orphaned id again).

    An orphan stops being one only when its execution is inserted. When the counters'
    inserts into workflow_executions since `previous` all belong to executions that rows
    written since then point at (xmin newer than the previous snapshot), those are the
    only candidates; a collection run inserts its execution and stamps its rows, so that
    is the usual case, and asking a few ids replaces asking every orphaned id."""
    inserted = counters.executions_inserted - previous.expected_executions
    statement = sql.SQL(REFERENCED_SQL).format(executions=t.executions, weeks=t.weeks)
    rows = cur.execute(statement, {"since": previous.tail_from}).fetchall()
    now_xmax = snapshot_xmax(cur)
    new = {i for i, xmin in rows if _xid8(xmin, now_xmax) >= previous.snapshot_xmax}
    # Fewer inserts counted than new executions seen: the statistics lag (they are
    # expected next time); more: an execution no new row points at, ask every id.
    return new if inserted <= len(new) else None


def _xid8(xmin: int, reference: int) -> int:
    """A 32-bit xmin as a 64-bit xid, taken as the latest one not after `reference`."""
    full = (reference >> 32 << 32) | xmin
    return full - (1 << 32) if full > reference else full


def _brought_forward(
    cur: psycopg.Cursor, t: Tables, previous: Tally, seen: Part, counters: Counters
) -> tuple[dict[Day, DayTally], OrphanIds | None, int]:
    """Every day: the previous tally less its tail, plus the rows seen since the tail
    began; orphaned ids of older rows asked again (only they can have changed)."""
    rows = {}
    for day in set(previous.days) | set(seen.days):
        old = previous.days.get(day, ZERO) - previous.tail.days.get(day, ZERO)
        rows[day] = replace(old + seen.days.get(day, ZERO), orphans=0)
    if t.executions is None:
        return rows, None, counters.executions_inserted
    if previous.orphan_ids is None:
        statement = sql.SQL(ORPHANS_PER_DAY_SQL).format(weeks=t.weeks, executions=t.executions)
        per_day = dict(cur.execute(statement).fetchall())
        days = {d: replace(c, orphans=per_day.get(d, 0)) for d, c in rows.items()}
        return days, None, counters.executions_inserted
    older = _minus(previous.orphan_ids, previous.tail.orphan_ids)
    resolved = _resolved_by_new_executions(cur, t, previous, counters)
    if resolved is None:
        alive = still_orphaned(cur, t, list(older))
        expected = counters.executions_inserted
    else:
        alive = set(older) - resolved
        expected = previous.expected_executions + len(resolved)
    orphan_ids = _merge({i: by for i, by in older.items() if i in alive}, seen.orphan_ids)
    days = _with_orphans(rows, orphan_ids)
    return days, (orphan_ids if len(orphan_ids) <= ORPHAN_IDS_MAX else None), expected


def _incremental(
    cur: psycopg.Cursor, t: Tables, previous: Tally, now: dt.datetime, counters: Counters
) -> Tally | str:
    """`previous` brought up to date by recounting its tail and the rows since, or why
    it cannot be."""
    seen, tail = count_tail(cur, t, previous.tail_from, now - LOOKBACK)
    growth, inserted, counters, waited = _growth(cur, t, previous, seen)
    if inserted > growth:
        return (
            f"{inserted - growth} row(s) inserted since the last tally are not dated after "
            f"{previous.tail_from:%Y-%m-%d %H:%M} UTC (rows dated in the past, or inserts "
            "rolled back)"
        )
    days, orphan_ids, expected_executions = _brought_forward(cur, t, previous, seen, counters)
    days = {d: c for d, c in days.items() if c.rows}
    return Tally(
        days=days,
        orphan_ids=orphan_ids,
        with_executions=t.executions is not None,
        taken_at=now,
        counters=counters,
        expected_inserts=previous.expected_inserts + growth,
        epoch=previous.epoch,
        full_at=previous.full_at,
        tail_from=now - LOOKBACK,
        tail=tail,
        snapshot_xmax=snapshot_xmax(cur),
        expected_executions=expected_executions,
        recounted_from=previous.tail_from.date(),
        reason=(
            f"rows created before {previous.tail_from:%Y-%m-%d %H:%M} UTC taken from the tally "
            f"of {previous.taken_at:%Y-%m-%d %H:%M} UTC: since then {growth} row(s) inserted, "
            "all dated after it, none updated or deleted"
        ),
        waited_s=waited,
    )
