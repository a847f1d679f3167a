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
"""

import time
from dataclasses import dataclass

import psycopg

from rdw_tracking import catalog

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
