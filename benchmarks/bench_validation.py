"""Time post_collection_validation and verify_execution_tracking against the spec's queries by hand.

For each size: build the demo data, then in a fresh child process (so its peak RSS is
its own) run the spec's data-quality queries one after another on one connection
(population count, 7-day breakdown, recent-orphan anti-join), and each job in process.
Database time of a job is the time spent inside psycopg's `execute` (statements and
their results) plus connecting; Dagster's overhead is the rest of the job's wall time.
Each figure is the median of `--repeat` rounds (spec queries, then each job) after
one warm-up run of everything.
"""

import multiprocessing
import os
import resource
import statistics
import time

import harness

TITLE = "Validation jobs vs the spec's queries"
NOTES = (
    "Targets: db_ratio = post_collection_validation's database time / the spec's three "
    "queries by hand <= 1.0; Dagster overhead < 2 s; peak RSS flat as rows grow. The job "
    "does more than the spec's queries: the orphan anti-join over the whole table (the "
    "spec's covers the last day), the 5 latest rows, every day of the window."
)

# The spec's own queries, verbatim.
SPEC_QUERIES = {
    "population_count": """
        SELECT COUNT(*) AS total_records, COUNT(execution_id) AS records_with_execution_id,
               ROUND(COUNT(execution_id) * 100.0 / COUNT(*), 2) AS population_percentage
        FROM report_data_weeks""",
    "daily_7d": """
        SELECT DATE(created_at) AS creation_date, COUNT(*) AS total_records,
               COUNT(execution_id) AS with_execution_id,
               ROUND(COUNT(execution_id) * 100.0 / COUNT(*), 2) AS population_rate
        FROM report_data_weeks
        WHERE created_at >= CURRENT_DATE - INTERVAL '7 days'
        GROUP BY DATE(created_at) ORDER BY creation_date DESC""",
    "orphans": """
        SELECT COUNT(*) AS orphaned_records
        FROM report_data_weeks rdw LEFT JOIN workflow_executions we ON rdw.execution_id = we.id
        WHERE rdw.execution_id IS NOT NULL AND we.id IS NULL
          AND rdw.created_at >= CURRENT_DATE - INTERVAL '1 day'""",
}
JOBS = ("post_collection_validation", "verify_execution_tracking")


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per figure")


def run(args) -> list[dict]:
    from rdw_tracking import demo

    results = []
    spawn = multiprocessing.get_context("spawn")
    for rows in args.rows:
        summary = demo.build(args.url, demo.DemoShape(rows=rows))
        print(f"built {rows:,} rows in {summary['seconds']} s", flush=True)
        harness.settle(args.url)  # right after a build, the job ran a third slower
        pool = spawn.Pool(1)
        figures = pool.apply(measure, (args.url, args.repeat))
        pool.close()
        pool.join()
        results.append({"rows": summary["rows"], **figures})
        print(figures, flush=True)
    return results


class _DatabaseClock:
    """Seconds spent inside psycopg (execute, connect) while installed."""

    def __init__(self) -> None:
        import psycopg

        self.seconds = 0.0
        self._originals = (psycopg.Cursor.execute, psycopg.connect)
        clock = self

        def execute(cursor, *a, **k):
            started = time.perf_counter()
            try:
                return clock._originals[0](cursor, *a, **k)
            finally:
                clock.seconds += time.perf_counter() - started

        def connect(*a, **k):
            started = time.perf_counter()
            try:
                return clock._originals[1](*a, **k)
            finally:
                clock.seconds += time.perf_counter() - started

        psycopg.Cursor.execute = execute
        psycopg.connect = connect  # TargetDatabase.connect looks it up at call time


def _spec_by_hand(url: str) -> dict[str, float]:
    import psycopg

    times = {}
    with psycopg.connect(url, autocommit=True, options="-c TimeZone=UTC") as conn:
        for name, query in SPEC_QUERIES.items():
            started = time.perf_counter()
            conn.execute(query).fetchall()
            times[name] = time.perf_counter() - started
    return times


def measure(url: str, repeat: int) -> dict:
    """One size, in a child process: spec queries by hand, then each job in process."""
    os.environ["RDW_DATABASE_URL"] = url
    import dagster as dg

    from rdw_tracking.definitions import defs

    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    instance = dg.DagsterInstance.ephemeral()

    def run_job(name: str) -> tuple[float, float]:
        clock.seconds = 0.0
        started = time.perf_counter()
        result = defs.resolve_job_def(name).execute_in_process(
            instance=instance, run_config=quiet, raise_on_error=False
        )
        wall = time.perf_counter() - started
        assert result.success, f"{name} failed"
        return wall, clock.seconds

    _spec_by_hand(url)  # warm-up: the same cache for both sides
    clock = _DatabaseClock()
    for name in JOBS:
        run_job(name)
    # Rounds of (spec queries, each job), so that both sides meet the same machine: a
    # side measured all in a row can catch a slow minute (the OS writing back, another
    # process) that the other side missed, which swung the ratio by 20%.
    spec, runs = [], {name: [] for name in JOBS}
    for _ in range(repeat):
        spec.append(_spec_by_hand(url))
        for name in JOBS:
            runs[name].append(run_job(name))
    figures: dict = {
        f"spec_{name}_s": statistics.median(t[name] for t in spec) for name in SPEC_QUERIES
    }
    spec_total = statistics.median(sum(t.values()) for t in spec)
    figures["spec_total_s"] = spec_total
    for name, short in zip(JOBS, ("post", "verify"), strict=True):
        figures[f"{short}_wall_s"] = statistics.median(w for w, _ in runs[name])
        figures[f"{short}_db_s"] = statistics.median(d for _, d in runs[name])
        figures[f"{short}_overhead_s"] = statistics.median(w - d for w, d in runs[name])
    figures["db_ratio"] = figures["post_db_s"] / spec_total
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures
