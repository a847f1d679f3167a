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
from dataclasses import dataclass, replace

import psycopg

from rdw_tracking import premises
from rdw_tracking.counting import (  # noqa: F401 (the tally's names, where callers find them)
    ZERO,
    Day,
    DayTally,
    Tables,
    count_all,
    count_days,
    count_orphans,
    midnight,
    rate,
    with_orphans,
)
from rdw_tracking.premises import Counters, Hints

VERSION = 4
# Rows are stamped `created_at = now()` when their transaction starts: a run that began
# shortly before the previous tally commits rows dated before it.
LOOKBACK = dt.timedelta(hours=1)


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
    epoch: list


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
    if isinstance(reused, Tally):
        recounted = _recount_since(cur, t, reused, budget, moment)
        if isinstance(recounted, Tally):
            reused = _unseen_change(recounted, orphans) or recounted
        else:
            reused = recounted
    if isinstance(reused, Tally):
        return replace(reused, days=with_orphans(reused.days, orphans), orphan_proof=proof)
    days = with_orphans(count_days(cur, t), orphans)
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


def _unseen_change(tally: Tally, orphans: dict[Day, int]) -> str | None:
    """Why days taken from an earlier count cannot be right: the orphans, counted now,
    sit on a day that count has no rows or stamped rows for."""
    for day, n in orphans.items():
        if n > tally.days.get(day, ZERO).stamped:
            return (
                f"{n} orphaned row(s) created on {day} are more than the earlier count's "
                "stamped rows of that day: the table changed where the counters did not see it"
            )
    return None


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
