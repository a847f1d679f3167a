"""Rollback: clearing ~20% of an N-row table in batches vs the spec's single UPDATE."""

from __future__ import annotations

import contextlib
import logging
import random
import statistics
import threading
import time

import harness
import psycopg
from psycopg import sql

from rdw_tracking import catalog, demo
from rdw_tracking.assets.rollback import (
    DEFAULT_BACKUP_TABLE,
    DEFAULT_STATE_TABLE,
    RollbackConfig,
    rollback,
)
from rdw_tracking.demo_layouts import relayout
from rdw_tracking.resources import TargetDatabase

TITLE = "Rollback: batched vs the spec's single UPDATE"
NOTES = (
    "Targets: batched total time <= 2x the single UPDATE, longest batch <= 250 ms, and a "
    "concurrent writer updating matched rows (one row per statement, every few ms) not "
    "blocked for the run: its p99 latency stays near its idle latency under the batched "
    "rollback, while the single UPDATE holds every matched row's lock until it commits. "
    "Each method runs on a freshly built table (every row tracked, cutoff at the 80th "
    "percentile of created_at); the batched run includes its plan scan, backup writes and "
    "final sweep. wal_mb is server-wide WAL during the run. Each size runs under each "
    "wal_buffers (the embedded server restarted with it): 4MB is what the embedded "
    "server's stock 128MB shared_buffers gives, 16MB what any server with shared_buffers "
    ">= 512MB has by default. The batches keep their WAL within 3/4 of wal_buffers; with "
    "4MB that means batches of a few hundred rows, and a batch can still wait behind "
    "another session's WAL sync."
)
SPEC_UPDATE = (
    "UPDATE public.report_data_weeks SET execution_id = NULL, updated_at = NOW() "
    "WHERE created_at >= %s AND execution_id IS NOT NULL"
)


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--fraction", type=float, default=0.2, help="share of rows cleared")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[5_000])
    parser.add_argument("--writer-pause-ms", type=float, default=5.0)
    parser.add_argument(
        "--layout",
        nargs="+",
        default=["ordinary"],
        help="ordinary, range (monthly partitions on created_at), ... (demo_layouts.LAYOUTS)",
    )
    parser.add_argument(
        "--weeks", type=int, default=52, help="weeks of data (104: 24 monthly partitions)"
    )
    parser.add_argument(
        "--wal-buffers",
        nargs="+",
        default=["default", "16MB"],
        help="wal_buffers values to restart the embedded server with, each in turn "
        "('default': shared_buffers/32, 4MB on the embedded server's 128MB)",
    )


# What the writer's statement waits on when it has run longer than this: sampled from
# pg_stat_activity every few ms, so a long wait is put down to a row lock (a batch holds
# the row), the WAL (its commit flushing WAL behind the rollback's), or something else.
LONG_WAIT_MS = 100


class Writer:
    """Updates random matched rows one statement at a time and records each latency."""

    def __init__(self, url: str, ids: list, pause_ms: float) -> None:
        self.url, self.ids, self.pause = url, ids, pause_ms / 1000
        self.latencies: list[float] = []
        self.waits: dict[str, int] = {}
        self.pid: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.sampler = threading.Thread(target=self._sample, daemon=True)

    def _run(self) -> None:
        rng = random.Random(7)
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = 0")
            conn.execute("SET statement_timeout = 0")
            self.pid = conn.info.backend_pid
            while not self.stop.is_set():
                started = time.perf_counter()
                conn.execute(
                    "UPDATE public.report_data_weeks SET status = status WHERE id = %s",
                    [rng.choice(self.ids)],
                )
                self.latencies.append((time.perf_counter() - started) * 1000)
                time.sleep(self.pause)

    def _sample(self) -> None:
        while self.pid is None and not self.stop.is_set():
            time.sleep(0.01)
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                row = conn.execute(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'), "
                    "extract(epoch FROM clock_timestamp() - query_start) * 1000 "
                    "FROM pg_stat_activity WHERE pid = %s AND state = 'active'",
                    [self.pid],
                ).fetchone()
                if row and row[1] >= LONG_WAIT_MS:
                    self.waits[row[0]] = self.waits.get(row[0], 0) + 1
                time.sleep(0.005)

    def __enter__(self) -> Writer:
        self.thread.start()
        self.sampler.start()
        time.sleep(0.5)  # its idle latency first
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.sampler.join()

    def figures(self) -> dict:
        lat = sorted(self.latencies) or [0.0]
        return {
            "writer_updates": len(self.latencies),
            "writer_p50_ms": round(statistics.median(lat), 2),
            "writer_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1),
            "writer_max_ms": round(lat[-1], 1),
            # samples (5 ms apart) of what a statement running over 100 ms waited on
            "writer_long_waits": ", ".join(
                f"{event} {n}" for event, n in sorted(self.waits.items(), key=lambda kv: -kv[1])
            )
            or "-",
        }


def prepare(url: str, rows: int, fraction: float, layout: str, weeks: int) -> tuple[str, list]:
    """A fresh table; (cutoff date clearing about `fraction` of it, sample of matched ids)."""
    demo.build(url, demo.DemoShape(rows=rows, weeks=weeks, cutover_days=weeks * 7 + 400))
    relayout(url, layout)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        for table in (DEFAULT_BACKUP_TABLE, DEFAULT_STATE_TABLE):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        cutoff = conn.execute(
            "SELECT (percentile_disc(%s) WITHIN GROUP (ORDER BY created_at))::date::text "
            "FROM public.report_data_weeks",
            [1 - fraction],
        ).fetchone()[0]
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM public.report_data_weeks TABLESAMPLE SYSTEM (5) "
                "WHERE created_at >= %s AND execution_id IS NOT NULL LIMIT 5000",
                [cutoff],
            )
        ]
    harness.settle(url)
    return cutoff, ids


def wal_position(url: str) -> str | None:
    with psycopg.connect(url) as conn:
        return catalog.wal_lsn(conn)


def wal_mb_since(url: str, lsn: str | None) -> float:
    return round(catalog.wal_bytes(lsn, wal_position(url)) / 2**20, 1)


def single_update(url: str, rows: int, fraction: float, pause_ms: float, shape: tuple) -> dict:
    cutoff, ids = prepare(url, rows, fraction, *shape)
    lsn = wal_position(url)
    with Writer(url, ids, pause_ms) as writer:
        started = time.monotonic()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET TimeZone = 'UTC'")
            conn.execute("SET statement_timeout = 0")
            cleared = conn.execute(SPEC_UPDATE, [cutoff]).rowcount
        seconds = time.monotonic() - started
    return {
        "layout": shape[0],
        "rows": rows,
        "method": "single UPDATE",
        "cleared": cleared,
        "total_s": round(seconds, 2),
        "longest_batch_ms": round(seconds * 1000, 1),
        "batches": 1,
        **writer.figures(),
        "wal_mb": wal_mb_since(url, lsn),
    }


def batched(
    url: str, rows: int, fraction: float, batch_size: int, pause_ms: float, shape: tuple
) -> dict:
    cutoff, ids = prepare(url, rows, fraction, *shape)
    db = TargetDatabase(url=url, statement_timeout_ms=0)
    config = RollbackConfig(cutoff_date=cutoff, dry_run=False, batch_size=batch_size)
    log = logging.getLogger("bench_rollback")
    lsn = wal_position(url)
    with Writer(url, ids, pause_ms) as writer:
        report = rollback(db, config, log)
    return {
        "layout": shape[0],
        "rows": rows,
        "method": f"batched {batch_size:,}",
        "cleared": report.cleared_rows,
        "total_s": round(report.seconds, 2),
        "longest_batch_ms": round(report.longest_batch_ms, 1),
        "batches": report.batches,
        **writer.figures(),
        "wal_mb": wal_mb_since(url, lsn),
    }


def run(args) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    if harness.is_embedded(args.url_given):
        settings = [
            harness.server_setting("wal_buffers", None if v == "default" else v)
            for v in args.wal_buffers
        ]
    else:  # never restart a server the benchmark doesn't own
        settings = [contextlib.nullcontext(None)]
    for setting in settings:
        with setting as wal_buffers:
            for layout in args.layout:
                for rows in args.rows:
                    results += compare(args, rows, wal_buffers, (layout, args.weeks))
    return results


def compare(args, rows: int, wal_buffers: str | None, shape: tuple) -> list[dict]:
    """The single UPDATE, then each batch size, on `rows` rows laid out as `shape`."""
    label = {"wal_buffers": wal_buffers or server_wal_buffers(args.url)}
    single = single_update(args.url, rows, args.fraction, args.writer_pause_ms, shape)
    print(f"{rows:,} rows, {label}, single UPDATE: {single['total_s']} s", flush=True)
    results = [{**label, **single, "vs_single": 1.0}]
    for batch_size in args.batch_size:
        row = batched(args.url, rows, args.fraction, batch_size, args.writer_pause_ms, shape)
        row["vs_single"] = round(row["total_s"] / single["total_s"], 2)
        print(f"{rows:,} rows, {label}, {row['method']}: {row['total_s']} s", flush=True)
        results.append({**label, **row})
    return results


def server_wal_buffers(url: str) -> str:
    with psycopg.connect(url) as conn:
        return conn.execute("SHOW wal_buffers").fetchone()[0]
