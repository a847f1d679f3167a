"""Running one DDL statement while watching it: its progress, the sessions blocking
it, and the retries with back-off after a lock wait."""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from rdw_tracking.indexes.connections import Connections, autocommit
from rdw_tracking.indexes.sessions import LockWait, Session, describe, sessions_of
from rdw_tracking.resources import TargetDatabase

T = TypeVar("T")


class Log(Protocol):
    def info(self, msg: str) -> Any: ...
    def warning(self, msg: str) -> Any: ...


@dataclass(frozen=True)
class Progress:
    phase: str
    blocks_done: int
    blocks_total: int
    tuples_done: int
    tuples_total: int
    lockers_done: int
    lockers_total: int


def _pct(done: int, total: int) -> str:
    return f"{100 * done / total:.1f}%" if total else "n/a"


def progress_line(name: str, progress: Progress, seconds: float) -> str:
    """One line a person watching the run can follow, from pg_stat_progress_create_index."""
    parts = [f"{name}: {progress.phase} after {seconds:.1f} s"]
    if progress.phase.startswith("waiting"):  # the other counters still hold the last phase's
        if progress.lockers_total:
            parts.append(
                f"waited for {progress.lockers_done:,} of {progress.lockers_total:,} "
                f"transactions ({_pct(progress.lockers_done, progress.lockers_total)})"
            )
        return " — ".join(parts)
    if progress.blocks_total:
        parts.append(
            f"blocks {progress.blocks_done:,} of {progress.blocks_total:,} "
            f"({_pct(progress.blocks_done, progress.blocks_total)})"
        )
    if progress.tuples_total:
        parts.append(
            f"tuples {progress.tuples_done:,} of {progress.tuples_total:,} "
            f"({_pct(progress.tuples_done, progress.tuples_total)})"
        )
    return " — ".join(parts)


@dataclass(frozen=True)
class _Glimpse(Progress):
    """One look at a running statement: its progress, and who blocks it if it waits."""

    blocking: list[int] | None


# pg_blocking_pids() takes every lock-manager partition lock: asked several times a
# second through a build, it slowed the build itself. Only a backend waiting on a lock
# has blockers to name.
_WATCH = """
    SELECT p.phase, p.blocks_done, p.blocks_total, p.tuples_done, p.tuples_total,
           p.lockers_done, p.lockers_total,
           CASE WHEN a.wait_event_type = 'Lock' THEN pg_blocking_pids(%(pid)s) END AS blocking
    FROM (SELECT 1) AS one
    LEFT JOIN pg_stat_progress_create_index p ON p.pid = %(pid)s
    LEFT JOIN pg_stat_activity a ON a.pid = %(pid)s
"""


class _Running:
    """The statement, run in a thread of its own so that this one can watch it."""

    def __init__(self, work: psycopg.Connection, statement: sql.Composable, what: str):
        self.work = work
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._execute, args=(statement,), name=f"rdw:{what}", daemon=True
        )
        self.thread.start()

    def _execute(self, statement: sql.Composable) -> None:
        try:
            self.work.execute(statement)
        except BaseException as err:  # handed to the watching thread
            self.error = err

    def still_running_after(self, seconds: float) -> bool:
        self.thread.join(seconds)
        return self.thread.is_alive()

    def stop(self) -> None:
        if self.thread.is_alive():  # the run is being stopped: don't leave the DDL behind
            self.work.cancel_safe()
            self.thread.join()


@dataclass
class _Watcher:
    """What the watching connection has seen so far, and when it last logged progress."""

    what: str
    log: Log
    progress_every_s: float
    log_phases: bool
    started: float
    logged_at: float
    logged_phase: str | None = None
    blockers: list[Session] = field(default_factory=list)

    def look(self, watch: psycopg.Connection, pid: int) -> None:
        """Who blocks backend `pid`, and its progress when a phase starts or it is time."""
        with watch.cursor(row_factory=class_row(_Glimpse)) as cur:
            glimpse = cur.execute(_WATCH, {"pid": pid}).fetchone()
        if glimpse.blocking:
            self.blockers = sessions_of(watch, glimpse.blocking) or self.blockers
        now = time.monotonic()
        if glimpse.phase is not None and (
            (self.log_phases and glimpse.phase != self.logged_phase)
            or now - self.logged_at >= self.progress_every_s
        ):
            self.log.info(progress_line(self.what, glimpse, now - self.started))
            self.logged_at, self.logged_phase = now, glimpse.phase


def run_watched(
    db: TargetDatabase,
    statement: sql.Composable,
    what: str,
    log: Log,
    progress_every_s: float = 5.0,
    poll_s: float = 0.25,
    conns: Connections | None = None,
    log_phases: bool = True,
) -> float:
    """Run one statement on an autocommit connection of its own (so it is its own
    transaction), watching it from another: who blocks it, and for index builds the
    progress, logged at each new phase (with `log_phases`) and every `progress_every_s`.
    Returns its seconds. `conns`: reuse these two connections rather than open two.

    Raises `LockWait` naming the blocking sessions when the lock timeout fires.
    """
    with (
        autocommit(db, conns and conns.work) as work,
        autocommit(db, conns and conns.watch) as watch,
    ):
        pid = work.info.backend_pid
        started = time.monotonic()
        running = _Running(work, statement, what)
        watcher = _Watcher(what, log, progress_every_s, log_phases, started, logged_at=started)
        try:
            while running.still_running_after(poll_s):
                watcher.look(watch, pid)
        finally:
            running.stop()
        if isinstance(running.error, psycopg.errors.LockNotAvailable):
            raise LockWait(what, watcher.blockers) from running.error
        if running.error is not None:
            raise running.error
        return time.monotonic() - started


def backoff_delays(retries: int, backoff_s: float, cap_s: float = 60.0) -> list[float]:
    """Seconds to wait before each retry: doubling from `backoff_s`, at most `cap_s`."""
    return [min(cap_s, backoff_s * 2**n) for n in range(retries)]


def with_lock_retries(
    attempt: Callable[[], T], what: str, log: Log, retries: int, backoff_s: float
) -> T:
    """`attempt()`, again after a back-off each time it raises `LockWait`, `retries` times.

    The last `LockWait` propagates; nothing here decides what to tell the user.
    """
    delays = backoff_delays(retries, backoff_s)
    for number in range(retries + 1):
        try:
            return attempt()
        except LockWait as wait:
            if number == retries:
                raise
            log.warning(
                f"{what}: gave up waiting for a lock held by {describe(wait.blockers)}; "
                f"retry {number + 1} of {retries} in {delays[number]:g} s"
            )
            time.sleep(delays[number])
    raise AssertionError("unreachable")
