"""The per-day tally of the weeks table: rows, stamped rows and orphaned ids for every UTC
creation day, counted in the run's own snapshot and kept between runs.

Every figure a validation publishes as current is counted from the table in that run's
snapshot: by default each run counts every day again (one grouped pass, an index-only
scan of the created_at index) and the orphaned ids of every day (one anti-join, or none
at all where a validated foreign key proves there is no orphan: `premises.orphan_proof`).
The server's activity counters are a hint, never a proof (`rdw_tracking.premises` says
why), so they decide nothing by default.

Only where a user opts into a budget (`count_budget_hours` > 0) may a run take the days
before its recount from an earlier count, at most that many hours old, and only while
every premise the counters rest on holds and they show no change. Each day keeps when it
was counted (`counted_at`), so the metadata can say which days come from which count;
orphans are counted over the whole table whatever the budget. The stored tally also tells
the next run which days changed, so that only those are published to the history.
Nothing here imports Dagster.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal

import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row

from rdw_tracking import premises
from rdw_tracking.layout import Layout
from rdw_tracking.premises import Counters, Hints

VERSION = 4
# Rows are stamped `created_at = now()` when their transaction starts: a run that began
# shortly before the previous tally commits rows dated before it.
LOOKBACK = dt.timedelta(hours=1)


def rate(with_execution_id: int, total: int) -> float | None:
    """The spec's ROUND(with * 100.0 / total, 2), exactly; None without rows."""
    if not total:
        return None
    exact = Decimal(with_execution_id) * 100 / Decimal(total)
    return float(exact.quantize(Decimal("0.01"), ROUND_HALF_UP))


def midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class DayTally:
    rows: int
    stamped: int
    orphans: int = 0

    def __add__(self, other: DayTally) -> DayTally:
        return DayTally(
            self.rows + other.rows, self.stamped + other.stamped, self.orphans + other.orphans
        )


ZERO = DayTally(0, 0, 0)
Day = dt.date | None  # None: rows without a created_at


@dataclass(frozen=True)
class Source:
    """Days whose rows were counted by one run: `counted_at`, from `first` to `last`."""

    counted_at: dt.datetime
    first: Day
    last: Day
    days: int


@dataclass(frozen=True)
class Tally:
    days: dict[Day, DayTally]
    counted_at: dict[Day, dt.datetime]  # when each day's rows were counted
    taken_at: dt.datetime
    with_executions: bool
    epoch: list  # premises.epoch: the server run, the statistics, each physical table
    counters: Counters | None = None  # read before the snapshot (budget runs only)
    expected_inserts: int = 0  # inserts the days account for (ahead of lagging counters)
    recounted_from: dt.date | None = None  # None: every day was counted by this run
    reason: str = ""  # why every day was counted, or how older days were taken
    orphan_proof: str | None = None  # the validated foreign key that proves no orphan

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

    def sources(self) -> list[Source]:
        """The counts this tally's days come from, newest first."""
        by_count: dict[dt.datetime, list[Day]] = {}
        for day in self.days:
            by_count.setdefault(self.counted_at.get(day, self.taken_at), []).append(day)
        sources = []
        for counted_at, days in sorted(by_count.items(), reverse=True):
            dated = sorted(d for d in days if d is not None)
            first, last = (dated[0], dated[-1]) if dated else (None, None)
            sources.append(Source(counted_at, first, last, len(days)))
        return sources

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": VERSION,
                "days": {
                    _key(d): [c.rows, c.stamped, c.orphans, self.counted_at[d].isoformat()]
                    for d, c in self.days.items()
                },
                "taken_at": self.taken_at.isoformat(),
                "with_executions": self.with_executions,
                "epoch": self.epoch,
                "counters": None if self.counters is None else self.counters.__dict__,
                "expected_inserts": self.expected_inserts,
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
            days = {_day(k): v for k, v in raw["days"].items()}
            return cls(
                days={d: DayTally(*v[:3]) for d, v in days.items()},
                counted_at={d: dt.datetime.fromisoformat(v[3]) for d, v in days.items()},
                taken_at=dt.datetime.fromisoformat(raw["taken_at"]),
                with_executions=raw["with_executions"],
                epoch=raw["epoch"],
                counters=None if raw["counters"] is None else Counters(**raw["counters"]),
                expected_inserts=raw["expected_inserts"],
            )
        except (ValueError, KeyError, TypeError, IndexError):
            return None


def _key(day: Day) -> str:
    return "null" if day is None else day.isoformat()


def _day(key: str) -> Day:
    return None if key == "null" else dt.date.fromisoformat(key)


# -- counting ---------------------------------------------------------------------------------

# Rows and stamped rows per day: with an index on (created_at, execution_id) this is one
# index-only scan, in parallel where the table is large.
DAYS_SQL = """
SELECT w.created_at::date AS day, count(*) AS rows, count(w.execution_id) AS stamped
FROM {weeks} AS w WHERE {where} GROUP BY 1
"""
# Every orphaned row per day: the ids are few, so each stamped row asks
# workflow_executions' primary key once, through a hashed anti-join.
ORPHANS_PER_DAY_SQL = """
SELECT w.created_at::date AS day, count(*) AS orphans FROM {weeks} AS w
WHERE w.execution_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM {executions} AS e WHERE e.id = w.execution_id)
GROUP BY 1
"""
SINCE = "w.created_at >= %(since)s OR w.created_at IS NULL"


@dataclass
class Tables:
    """The names and physical tables a tally reads."""

    weeks: sql.Identifier
    executions: sql.Identifier | None  # None: workflow_executions does not exist
    layout: Layout
    foreign_keys_prove: bool = True  # False: count orphans even under a validated FK

    @property
    def leaves(self) -> list[int]:
        return [m.oid for m in self.layout.leaves]


def count_days(cur: psycopg.Cursor, t: Tables, since: dt.date | None = None) -> dict:
    """{day: DayTally(rows, stamped)} of every day at or after `since` (None: every day),
    rows without a created_at included."""
    where = "true" if since is None else SINCE
    statement = sql.SQL(DAYS_SQL).format(weeks=t.weeks, where=sql.SQL(where))
    params = {} if since is None else {"since": midnight(since)}
    with cur.connection.cursor(row_factory=namedtuple_row) as named:
        rows = named.execute(statement, params).fetchall()
    return {row.day: DayTally(row.rows, row.stamped) for row in rows}


def count_orphans(cur: psycopg.Cursor, t: Tables) -> tuple[dict[Day, int], str | None]:
    """({day: orphaned rows}, the foreign key that proves there are none, if one does)."""
    if t.executions is None:
        return {}, None
    proof = premises.orphan_proof(cur, t.layout, t.executions) if t.foreign_keys_prove else None
    if proof:
        return {}, proof
    statement = sql.SQL(ORPHANS_PER_DAY_SQL).format(weeks=t.weeks, executions=t.executions)
    return dict(cur.execute(statement).fetchall()), None


def count_all(cur: psycopg.Cursor, t: Tables) -> dict[Day, DayTally]:
    """Every day of the table with its orphans, counted in `cur`'s snapshot."""
    days = count_days(cur, t)
    orphans, _ = count_orphans(cur, t)
    return _with_orphans(days, orphans)


def _with_orphans(days: dict[Day, DayTally], orphans: dict[Day, int]) -> dict[Day, DayTally]:
    return {d: replace(c, orphans=orphans.get(d, 0)) for d, c in days.items()}


# -- bringing a tally up to date ----------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """What a run may take from an earlier count (`count_budget_hours` > 0 only)."""

    hours: float
    hints: Hints  # the counters and their premises, read before the snapshot
    recount_from: dt.date  # days at or after it are always counted (the recent window)


@dataclass(frozen=True)
class Moment:
    now: dt.datetime
    epoch: list = field(default_factory=list)


def update(
    cur: psycopg.Cursor, t: Tables, previous: Tally | None, budget: Budget | None = None
) -> Tally:
    """The tally now, counted in `cur`'s snapshot (a REPEATABLE READ transaction): every
    day, or under a budget the days since the previous tally when nothing says older
    days changed."""
    moment = Moment(cur.execute("SELECT now()").fetchone()[0], premises.epoch(cur, t.leaves))
    with_executions = t.executions is not None
    orphans, proof = count_orphans(cur, t)
    reused = _reusable(previous, budget, moment, with_executions)
    if isinstance(reused, str):
        days = _with_orphans(count_days(cur, t), orphans)
        return Tally(
            days=days,
            counted_at=dict.fromkeys(days, moment.now),
            taken_at=moment.now,
            with_executions=with_executions,
            epoch=moment.epoch,
            counters=budget.hints.counters if budget else None,
            expected_inserts=budget.hints.counters.inserted if budget else 0,
            reason=reused,
            orphan_proof=proof,
        )
    recounted = _recount_since(cur, t, previous, budget, moment)
    if isinstance(recounted, str):  # the inserts do not balance: count every day
        days = _with_orphans(count_days(cur, t), orphans)
        counted_at = dict.fromkeys(days, moment.now)
        return Tally(
            days, counted_at, moment.now, with_executions, moment.epoch,
            budget.hints.counters, budget.hints.counters.inserted, reason=recounted,
            orphan_proof=proof,
        )  # fmt: skip
    return replace(recounted, days=_with_orphans(recounted.days, orphans), orphan_proof=proof)


def _reusable(
    previous: Tally | None, budget: Budget | None, moment: Moment, with_executions: bool
) -> Tally | str:
    """`previous` if its older days may stand in for a count, else why every day is counted."""
    if budget is None:
        return (
            "every day counted (count_budget_hours is 0: no figure is taken from an earlier count)"
        )
    if previous is None:
        return "no earlier tally"
    reason = premises.why_not_reuse(budget.hints, previous.counters, previous.epoch, moment.epoch)
    if reason:
        return reason
    if previous.with_executions != with_executions:
        return "workflow_executions appeared or disappeared since the last tally"
    oldest = min(previous.counted_at.values(), default=previous.taken_at)
    age_h = (moment.now - oldest).total_seconds() / 3600
    if age_h > budget.hours:
        return (
            f"the oldest count the tally holds is {age_h:.1f} h old, more than "
            f"count_budget_hours ({budget.hours:g})"
        )
    return previous


def _recount_since(
    cur: psycopg.Cursor, t: Tables, previous: Tally, budget: Budget, moment: Moment
) -> Tally | str:
    """`previous` with every day from the earlier of its last hour and the recent window
    counted again, or why that is not enough (rows inserted into older days)."""
    since = min(budget.recount_from, (previous.taken_at - LOOKBACK).date())
    fresh = count_days(cur, t, since)
    kept = {d: c for d, c in previous.days.items() if d is not None and d < since}
    recounted_before = sum(c.rows for d, c in previous.days.items() if d not in kept)
    growth = sum(c.rows for c in fresh.values()) - recounted_before
    inserted = budget.hints.counters.inserted - previous.expected_inserts
    if inserted > growth:
        return (
            f"{inserted - growth} row(s) inserted since the last tally are dated before "
            f"{since} (rows dated in the past, or inserts rolled back)"
        )
    counted_at = {d: previous.counted_at[d] for d in kept} | dict.fromkeys(fresh, moment.now)
    return Tally(
        days=kept | fresh,
        counted_at=counted_at,
        taken_at=moment.now,
        with_executions=previous.with_executions,
        epoch=moment.epoch,
        counters=budget.hints.counters,
        expected_inserts=previous.expected_inserts + growth,
        recounted_from=since,
        reason=(
            f"rows created before {since} taken from earlier counts (count_budget_hours "
            f"{budget.hours:g}; the oldest of {min(counted_at.values()):%Y-%m-%d %H:%M} UTC): "
            f"since the last tally {growth} row(s) inserted, all dated after it, and the "
            "counters show no update or delete"
        ),
    )
