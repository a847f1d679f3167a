"""What a population snapshot is made of: counts, days, orphans, the snapshot itself."""

import datetime as dt
from dataclasses import dataclass, field
from typing import NamedTuple

from rdw_tracking.tally import rate

ORPHAN_SAMPLE_SIZE = 10


ROW_SAMPLE_SIZE = 5


@dataclass(frozen=True)
class Counts:
    rows: int
    with_execution_id: int

    @property
    def without_execution_id(self) -> int:
        return self.rows - self.with_execution_id

    @property
    def pct(self) -> float | None:
        return rate(self.with_execution_id, self.rows)


@dataclass(frozen=True)
class Day:
    creation_date: dt.date
    total_records: int
    with_execution_id: int

    @property
    def population_rate(self) -> float | None:
        return rate(self.with_execution_id, self.total_records)


class Orphan(NamedTuple):
    """A report_data_weeks row whose execution_id has no workflow_executions row."""

    id: str
    execution_id: str


@dataclass(frozen=True)
class Orphans:
    count: int
    recent_count: int
    sample: list[Orphan]
    proof: str | None = None  # the validated foreign key that proves there are none


@dataclass(frozen=True)
class Snapshot:
    today: dt.date
    window_start: dt.date
    recent_since: dt.datetime  # the later of window_start and tracking_started_at
    overall: Counts
    recent: Counts
    since_tracking: Counts | None
    daily: list[Day]
    orphans: Orphans | None  # None: workflow_executions does not exist
    sample: list[dict] = field(default_factory=list)
