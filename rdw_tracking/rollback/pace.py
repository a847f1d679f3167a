"""How large each batch is and when it may start: the time aim, the WAL budget and the
wait for WAL room.

A batch holds its rows' locks until it commits: aim each at BATCH_TARGET_MS. After a
batch much slower or faster than that, the next range is cut at a batch size scaled
to match, between MIN_BATCH_ROWS and the configured batch_size.

A batch must also write less WAL than the server's WAL buffers hold (wal_buffers: 4MB
on a server with the stock 128MB shared_buffers, 16MB from 512MB up). A batch that
overflows them writes WAL out itself, and waits for the WAL write lock while another
session's commit is syncing: on a busy disk that turned ~100 ms batches into 300-770 ms
ones (measured at 5M rows, benchmarks/RESULTS.md). So each batch is also capped at
WAL_BUDGET_SHARE of wal_buffers, at the WAL per row the last batch wrote, and starts
only once the buffers have room for it: while a sync holds the WAL write lock, the
previous batches' WAL stays unwritten, and the batch that then ran out of buffers took
the rest of the stall with its rows locked. Waiting before the batch, holding nothing,
took the batches over 80 ms from 4-5 a run to 0-2 (5M rows, 4MB wal_buffers), for
about 1 s of waits in a 33 s run.

Standbys replay all that WAL too: between batches the run also waits while any standby
replays more than max_replica_lag_s behind (`ReplicaLag`).
"""

import time
from dataclasses import dataclass

import psycopg

from rdw_tracking import catalog
from rdw_tracking.rollback.progress import Log

BATCH_TARGET_MS = 100
MIN_BATCH_ROWS = 100
FIRST_BATCH_ROWS = 1_000
WAL_BUDGET_SHARE = 0.75


@dataclass(frozen=True)
class LastBatch:
    """What the previous batch of the walk took: rows, milliseconds, WAL bytes."""

    rows: int
    ms: float
    wal_bytes: int | None


def batch_rows(size: int, last: LastBatch, max_rows: int, wal_budget: int | None = None) -> int:
    """The batch size for the next batches, given what the last one took."""
    rows = size
    if last.ms > 0 and not BATCH_TARGET_MS / 2 <= last.ms <= BATCH_TARGET_MS:
        rows = int(size * BATCH_TARGET_MS / last.ms)
    if wal_budget and last.wal_bytes and last.rows:
        rows = min(rows, int(wal_budget * last.rows / last.wal_bytes))
    return max(MIN_BATCH_ROWS, min(max_rows, rows))


def wal_buffers_bytes(conn: psycopg.Connection) -> int | None:
    """The server's wal_buffers in bytes."""
    try:
        return int(
            conn.execute("SELECT pg_size_bytes(current_setting('wal_buffers'))").fetchone()[0]
        )
    except psycopg.Error:
        return None


def wait_for_wal_room(conn: psycopg.Connection, most_unflushed: int) -> float:
    """Between batches, holding no lock: when more than `most_unflushed` bytes of WAL
    are not yet on disk, flush them ourselves (one synchronous commit of an empty
    transaction); seconds it took.

    The batches commit without waiting for their WAL to reach disk. Left to the WAL
    writer (every wal_writer_delay, 200 ms), that WAL piles up: the next batch then ran
    out of WAL buffers inside its transaction, holding its rows' locks, and a writer's
    own commit had to flush all of it first. Polling for the WAL writer instead cost up
    to 200 ms per batch (9.5 s of a 17 s run, 1M rows, 4MB wal_buffers)."""
    started = time.monotonic()
    if catalog.wal_unflushed(conn) > most_unflushed:
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = on")
            conn.execute("SELECT pg_current_xact_id()")  # an xid: its commit flushes
    return time.monotonic() - started


# Replicas: a rollback of 1M rows writes ~3.9 GB of WAL, which every standby must replay.
REPLICA_POLL_S = 0.5
REPLICA_LOG_EVERY_S = 10.0
DEFAULT_MAX_REPLICA_LAG_S = 10.0
# The standby furthest behind, if more than %(most)s seconds behind in replay and not yet
# past the run's last batch (`mark`): one that has replayed all the run wrote is caught
# up with it, whatever its last measured lag. replay_lag grows while a standby's replay
# stands still (the server interpolates it) and is NULL once it is idle and caught up.
_LAGGING = """
SELECT coalesce(nullif(application_name, ''), 'pid ' || pid) AS name,
       extract(epoch FROM replay_lag)::float8 AS lag_s
FROM pg_stat_replication
WHERE replay_lag > make_interval(secs => %(most)s)
  AND (replay_lsn IS NULL OR replay_lsn < %(mark)s::pg_lsn)
ORDER BY replay_lag DESC LIMIT 1
"""
# Whether this role sees the standbys' lag at all (pg_stat_replication hides it from
# roles without pg_read_all_stats), and how many standbys there are.
_REPLICA_VIEW = """
SELECT count(*) AS standbys,
       pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS sees_lag
FROM pg_stat_replication
"""


@dataclass
class ReplicaLag:
    """Between batches, holding no lock: wait while any standby replays more than
    `max_lag_s` behind (0: never), logging the pause; `paused_s` adds them up."""

    max_lag_s: float
    log: Log
    what: str
    paused_s: float = 0.0
    checked: bool = False

    def wait(self, conn: psycopg.Connection, mark: str | None) -> float:
        """Seconds waited before the next batch (0.0 when no standby lags)."""
        if not self.max_lag_s or mark is None:
            return 0.0
        if not self.checked:
            self.checked = True
            standbys, sees_lag = conn.execute(_REPLICA_VIEW).fetchone()
            if standbys and not sees_lag:
                self.log.warning(
                    f"{self.what}: this role cannot see the {standbys} standbys' replay lag, "
                    "so max_replica_lag_s cannot pause the run for them; GRANT "
                    "pg_read_all_stats to it"
                )
        started = logged = None
        while True:
            row = conn.execute(_LAGGING, {"most": self.max_lag_s, "mark": mark}).fetchone()
            if row is None:
                break
            name, lag_s = row
            now = time.monotonic()
            if started is None:
                started = logged = now
                self.log.info(
                    f"{self.what}: pausing, standby {name} replays {lag_s:.1f} s behind "
                    f"(max_replica_lag_s {self.max_lag_s:g}); no row is locked meanwhile"
                )
            elif now - logged >= REPLICA_LOG_EVERY_S:
                logged = now
                self.log.info(
                    f"{self.what}: still paused after {now - started:.0f} s, standby {name} "
                    f"replays {lag_s:.1f} s behind"
                )
            time.sleep(REPLICA_POLL_S)
        if started is None:
            return 0.0
        waited = time.monotonic() - started
        self.paused_s += waited
        self.log.info(f"{self.what}: the standbys caught up after {waited:.1f} s; going on")
        return waited
