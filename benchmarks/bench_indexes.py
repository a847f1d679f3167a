"""Index build: create_execution_id_indexes against bare CREATE INDEX CONCURRENTLY.

For each size: builds the demo data (104 weeks), warms the cache, then for each layout:

`ordinary` (the plain table), timing
1. the two bare `CREATE INDEX CONCURRENTLY` statements run by hand on one connection,
2. the `create_execution_id_indexes` job (in process, wall time including Dagster's own
   cost; an untimed warm-up run first takes the imports and first-run setup out),
3. the job again while a single-row insert loop writes to the table: insert latencies,
   against the same loop on the idle table (no build) as a baseline;

`range` (the same rows relaid out in monthly range partitions, about 24, plus DEFAULT),
timing
1. bare: the two `CREATE INDEX CONCURRENTLY` statements on every partition, one after the
   other on one connection, no parent index (the floor of any online route),
2. the job: `ON ONLY` parent indexes, each partition's built concurrently and attached
   (an untimed run first attaches the bare indexes: `attach_s`, the reuse path),
3. the job again under the insert loop.
Indexes are dropped between runs.
"""

import os
import statistics
import threading
import time

import dagster as dg
import harness
import psycopg
from psycopg import sql

from rdw_tracking import demo
from rdw_tracking.demo_layouts import relayout
from rdw_tracking.indexes.specs import contract_indexes
from rdw_tracking.layout import table_layout
from rdw_tracking.resources import TargetDatabase

TITLE = "Index build: create_execution_id_indexes vs bare CREATE INDEX CONCURRENTLY"
NOTES = (
    "Targets: job/bare ratio ≤ 1.10 at 5M rows on the plain table, ≤ 1.20 on 24 monthly "
    "range partitions (issue 14). Best of `--repeat` runs (2), bare and job alternating. "
    "`bare_s`: the statements by hand (on the partitioned "
    "table: both indexes on every partition, summed); `job_s`: the job's wall time in "
    "process (Dagster's own cost included); `build_s`: the job's own build seconds; "
    "`attach_s` (partitioned): the job attaching indexes the partitions already have. "
    "Insert latencies (ms) are of a single-row autocommit INSERT loop: `idle_p99_ms` "
    "with no build, the others during the job. `load_avg`: the machine's 1-minute load "
    "when the row was measured (shared machine)."
)
WEEKS = 104  # two years: 24 monthly partitions


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["ordinary", "range"],
        choices=["ordinary", "range"],
        help="the plain table, then the same rows in monthly range partitions",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="time the bare statements and the job this many times each, keep the best",
    )
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
    """The contract's indexes, and on a partitioned table every partition's with them."""
    with psycopg.connect(url, autocommit=True) as conn:
        for name in contract_indexes(db):
            conn.execute(
                sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(db.schema_name, name))
            )
        layout = table_layout(conn, db.schema_name, db.weeks_table)
        for leaf in layout.leaves if layout.kind == "partitioned" else []:
            for spec in contract_indexes(db).values():
                name = spec.on_member(leaf).name
                conn.execute(
                    sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(leaf.schema, name))
                )


def bare(url: str, db: TargetDatabase) -> float:
    """Both indexes by hand: on the table, or on every partition of a partitioned one."""
    with psycopg.connect(url, autocommit=True) as conn:
        layout = table_layout(conn, db.schema_name, db.weeks_table)
        leaves = layout.leaves if layout.kind == "partitioned" else []
        statements = [spec.create(db) for spec in contract_indexes(db).values()]
        if leaves:
            statements = [
                spec.on_member(leaf).create(db)
                for spec in contract_indexes(db).values()
                for leaf in leaves
            ]
        started = time.perf_counter()
        for statement in statements:
            conn.execute(statement)
        return time.perf_counter() - started


def job(url: str) -> tuple[float, dict]:
    # The job's run-config check accepts a url on RDW_DATABASE_URL's server only.
    os.environ["RDW_DATABASE_URL"] = url
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


def quiet(url: str, db: TargetDatabase) -> None:
    """Vacuumed and analyzed, dirty pages written: an autovacuum or ANALYZE of a fresh
    partition holds a snapshot every concurrent build waits out, and write-back stalls
    whatever runs next; neither side of the comparison should pay for them."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(db.weeks))
    harness.settle(url)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def measure(args, db: TargetDatabase, rows: int, layout: str) -> dict:
    drop_indexes(args.url, db)
    with psycopg.connect(args.url, autocommit=True) as conn:  # warm the cache for both
        conn.execute(sql.SQL("SELECT count(execution_id) FROM {}").format(db.weeks))
        partitions = len(table_layout(conn, db.schema_name, db.weeks_table).leaves)
    quiet(args.url, db)
    load = load_avg()
    bares = [bare(args.url, db)]
    print(f"{rows:,} rows, {layout}: bare statements {bares[-1]:.2f} s", flush=True)
    if layout == "ordinary":
        job(args.url)  # warm-up: imports and Dagster's first run; finds both, changes nothing
        attach_s = None
    else:  # warm-up that measures the reuse path: attaches what bare built
        attach_s, _ = job(args.url)
        print(f"{rows:,} rows, {layout}: job attaching existing {attach_s:.2f} s", flush=True)
    jobs = []
    for number in range(args.repeat):  # alternating, so both sides meet the same weather
        drop_indexes(args.url, db)
        quiet(args.url, db)
        jobs.append(job(args.url))
        print(
            f"{rows:,} rows, {layout}: job {jobs[-1][0]:.2f} s "
            f"(build {jobs[-1][1]['build_seconds']} s)",
            flush=True,
        )
        if number < args.repeat - 1:
            drop_indexes(args.url, db)
            quiet(args.url, db)
            bares.append(bare(args.url, db))
            print(f"{rows:,} rows, {layout}: bare statements {bares[-1]:.2f} s", flush=True)
    bare_s = min(bares)
    job_s, metadata = min(jobs, key=lambda run: run[0])
    drop_indexes(args.url, db)
    with InsertLoop(args.url, db) as idle:
        time.sleep(3)
    with InsertLoop(args.url, db) as loaded:
        loaded_s, _ = job(args.url)
    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DELETE FROM {} WHERE status = 'bench'").format(db.weeks))
    return {
        "rows": rows,
        "layout": layout,
        "partitions": partitions,
        "bare_s": round(bare_s, 2),
        "job_s": round(job_s, 2),
        "build_s": metadata["build_seconds"],
        "ratio": round(job_s / bare_s, 3),
        "attach_s": round(attach_s, 2) if attach_s is not None else "",
        "wal_mb": round(metadata["wal_bytes"] / 2**20, 1),
        "index_mb": round(metadata["index_bytes"] / 2**20, 1),
        "idle_p99_ms": round(idle.percentile(99), 2),
        "job_under_load_s": round(loaded_s, 2),
        "inserts": len(loaded.latencies),
        "insert_p50_ms": round(loaded.percentile(50), 2),
        "insert_p99_ms": round(loaded.percentile(99), 2),
        "insert_max_ms": round(max(loaded.latencies, default=float("nan")), 2),
        "load_avg": load,
    }


def kept(args, db: TargetDatabase) -> bool:
    """Whether the data in place serves every layout asked (an ordinary table can be
    relaid out, a partitioned one not back)."""
    with psycopg.connect(args.url) as conn:
        kind = table_layout(conn, db.schema_name, db.weeks_table).kind
    return kind == "ordinary" or args.layouts == ["range"]


def run(args) -> list[dict]:
    db = TargetDatabase(url=args.url)
    results = []
    for rows in args.rows:
        if not (args.keep_data and present_rows(args.url, db) == rows and kept(args, db)):
            summary = demo.build(args.url, demo.DemoShape(rows=rows, weeks=WEEKS))
            print(f"built {rows:,} demo rows in {summary['seconds']} s", flush=True)
        for layout in args.layouts:
            if layout == "range":
                with psycopg.connect(args.url) as conn:
                    kind = table_layout(conn, db.schema_name, db.weeks_table).kind
                if kind != "partitioned":
                    drop_indexes(args.url, db)
                    started = time.perf_counter()
                    relayout(args.url, "range")
                    print(f"relaid out in {time.perf_counter() - started:.1f} s", flush=True)
            results.append(measure(args, db, rows, layout))
    return results
