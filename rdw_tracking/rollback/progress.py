"""Progress of a batched run: counts logged every few seconds, and the log they go to."""

import time
from dataclasses import dataclass, field
from typing import Protocol

PROGRESS_EVERY_S = 5.0


class Log(Protocol):
    """Where a run reports: a `logging.Logger`, Dagster's `context.log`, or a test's list."""

    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...


@dataclass
class Progress:
    """Counts of one run, logged every few seconds: done of total, rate, time left."""

    total: int
    done: int = 0
    batches: int = 0
    longest_ms: float = 0.0
    started: float = field(default_factory=time.monotonic)
    logged: float = field(default_factory=time.monotonic)

    def add(self, rows: int, ms: float) -> None:
        self.done += rows
        self.batches += 1
        self.longest_ms = max(self.longest_ms, ms)

    def line(self, verb: str, done_before: int = 0) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        done = done_before + self.done
        left = (self.total - done) / rate if rate else float("nan")
        pct = 100 * done / self.total if self.total else 100.0
        return (
            f"{verb} {done:,} of {self.total:,} rows ({pct:.1f}%), "
            f"{rate:,.0f} rows/s, about {max(left, 0):,.0f} s left"
        )

    def due(self) -> bool:
        if time.monotonic() - self.logged >= PROGRESS_EVERY_S:
            self.logged = time.monotonic()
            return True
        return False
