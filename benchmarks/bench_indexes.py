"""Index build: create_execution_id_indexes against bare CREATE INDEX CONCURRENTLY.

For each size: builds the demo data, warms the cache, then times
1. the two bare `CREATE INDEX CONCURRENTLY` statements run by hand on one connection,
2. the `create_execution_id_indexes` job (in process, wall time including Dagster's own
   cost; an untimed warm-up run first takes the imports and first-run setup out),
3. the job again while a single-row insert loop writes to the table: insert latencies,
   against the same loop on the idle table (no build) as a baseline.
Indexes are dropped between runs.
"""

import statistics
import threading
import time

import dagster as dg
import psycopg
from psycopg import sql

from rdw_tracking import demo
from rdw_tracking.assets.indexes import contract_indexes
from rdw_tracking.resources import TargetDatabase

TITLE = "Index build: create_execution_id_indexes vs bare CREATE INDEX CONCURRENTLY"
NOTES = (
    "Target: job/bare ratio ≤ 1.10 at 5M rows. `bare_s`: the two statements by hand; "
    "`job_s`: the job's wall time in process (Dagster's own cost included); "
    "`build_s`: the job's own build seconds. Insert latencies (ms) are of a single-row "
    "autocommit INSERT loop: `idle_p99_ms` with no build, the others during the job."
)


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument(
        "--keep-data",
        action="store_true",
        help="reuse the demo data already in the database when it has the asked size",
    )


INSERT = (
    "INSERT INTO {weeks} (collection_id, week_start_date, week_end_date, status, execution_id) "
    "SELECT id, current_date, current_date, 'bench', gen_random_uuid() FROM {collections} LIMIT 1"
)


class InsertLoop:
    """Single-row inserts, one per transaction, as fast as they go, timing each."""

    def __init__(self, url: str, db: TargetDatabase):
        self.url, self.stop, self.latencies = url, threading.Event(), []
        self.statement = sql.SQL(INSERT).format(weeks=db.weeks, collections=db.collections)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                started = time.perf_counter()
                conn.execute(self.statement)
                self.latencies.append((time.perf_counter() - started) * 1000)

    def __enter__(self) -> "InsertLoop":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def percentile(self, p: float) -> float:
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=1000, method="inclusive")[int(p * 10) - 1]


def drop_indexes(url: str, db: TargetDatabase) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for name in contract_indexes(db):
            conn.execute(
                sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(db.schema_name, name))
            )


def bare(url: str, db: TargetDatabase) -> float:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        for spec in contract_indexes(db).values():
            conn.execute(spec.create(db))
    return time.perf_counter() - started


def job(url: str) -> tuple[float, dict]:
    from rdw_tracking.definitions import defs

    run_config = {
        "resources": {"target_db": {"config": {"url": url}}},
        "loggers": {"console": {"config": {"log_level": "WARNING"}}},
    }
    started = time.perf_counter()
    result = defs.resolve_job_def("create_execution_id_indexes").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), run_config=run_config
    )
    seconds = time.perf_counter() - started
    (event,) = result.get_asset_materialization_events()
    metadata = event.event_specific_data.materialization.metadata
    return seconds, {key: getattr(value, "value", value) for key, value in metadata.items()}


def present_rows(url: str, db: TargetDatabase) -> int:
    with psycopg.connect(url) as conn:
        if not conn.execute(
            "SELECT to_regclass(%s)", [f"{db.schema_name}.{db.weeks_table}"]
        ).fetchone()[0]:
            return -1
        return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(db.weeks)).fetchone()[0]


def run(args) -> list[dict]:
    db = TargetDatabase(url=args.url)
    results = []
    for rows in args.rows:
        if not (args.keep_data and present_rows(args.url, db) == rows):
            summary = demo.build(args.url, demo.DemoShape(rows=rows))
            print(f"built {rows:,} demo rows in {summary['seconds']} s", flush=True)
        drop_indexes(args.url, db)
        with psycopg.connect(args.url, autocommit=True) as conn:  # warm the cache for both
            conn.execute(sql.SQL("SELECT count(execution_id) FROM {}").format(db.weeks))
        bare_s = bare(args.url, db)
        print(f"{rows:,} rows: bare statements {bare_s:.2f} s", flush=True)
        job(args.url)  # warm-up: imports and Dagster's first run; finds both, changes nothing
        drop_indexes(args.url, db)
        job_s, metadata = job(args.url)
        print(f"{rows:,} rows: job {job_s:.2f} s (build {metadata['build_seconds']} s)", flush=True)
        drop_indexes(args.url, db)
        with InsertLoop(args.url, db) as idle:
            time.sleep(3)
        with InsertLoop(args.url, db) as loaded:
            loaded_s, _ = job(args.url)
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DELETE FROM {} WHERE status = 'bench'").format(db.weeks))
        results.append(
            {
                "rows": rows,
                "bare_s": round(bare_s, 2),
                "job_s": round(job_s, 2),
                "build_s": metadata["build_seconds"],
                "ratio": round(job_s / bare_s, 3),
                "wal_mb": round(metadata["wal_bytes"] / 2**20, 1),
                "index_mb": round(metadata["index_bytes"] / 2**20, 1),
                "idle_p99_ms": round(idle.percentile(99), 2),
                "job_under_load_s": round(loaded_s, 2),
                "inserts": len(loaded.latencies),
                "insert_p50_ms": round(loaded.percentile(50), 2),
                "insert_p99_ms": round(loaded.percentile(99), 2),
                "insert_max_ms": round(max(loaded.latencies, default=float("nan")), 2),
            }
        )
    return results
