"""Validation that scales: one collection run's verdict, the full pass and the one-run backfill.

For each size and data shape (`demo`: about 15% of rows stamped; `stamped`: about 70%,
with ~900,000 workflow_executions at 5M rows), with the opt-in created_at index and
then without it, in a fresh child process:

- `per_run`: a collection run writes 50 stamped rows under a new workflow_executions
  row, then post_collection_validation judges that execution (as the sensors request
  it); the database time of the validation, median of `--repeat` runs;
- `full_pass`: verify_execution_tracking's population work and the reconcile check
  (execution_id_population + execution_id_daily_history_matches), with the tally left
  by the previous run (`full_pass`) and with none (`full_count`);
- `spec`: the spec's three data-quality queries by hand, on the same table and indexes;
- `backfill`: execution_id_daily_population for every day of the data, as one run.

Database time is the time inside psycopg (statements, results, connecting).
"""

import multiprocessing
import statistics
import time

import harness
from bench_validation import _DatabaseClock, _spec_by_hand

TITLE = "Validation that scales (per-run verdict, full pass, backfill)"
NOTES = (
    "Targets (issue 15): per-run database time <= 100 ms at every size and 20M within 2x "
    "of 1M; full pass <= 0.6x the spec's three queries on both shapes; the one-run "
    "backfill <= 1.0x one full pass. full_pass uses the tally of the previous run "
    "(the steady state); full_count is the same work with no tally (the first run, or "
    "after anything the counters cannot explain). Spec queries run on the same indexes."
)
SHAPES = {"demo": {}, "stamped": {"cutover_days": 255, "collections_per_run": 6}}
INDEXES = [
    "CREATE INDEX IF NOT EXISTS idx_report_data_weeks_execution_id ON report_data_weeks "
    "(execution_id) WHERE execution_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS idx_report_data_weeks_collection_execution ON "
    "report_data_weeks (collection_id, execution_id) WHERE execution_id IS NOT NULL",
]
CREATED_AT = (
    "CREATE INDEX IF NOT EXISTS idx_report_data_weeks_created_at ON report_data_weeks "
    "(created_at, execution_id)"
)


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per figure")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["indexed", "plain"],
        choices=["indexed", "plain"],
        help="with the opt-in created_at index, without it, or both",
    )


def run(args) -> list[dict]:
    import psycopg

    from rdw_tracking import demo

    results = []
    spawn = multiprocessing.get_context("spawn")
    for rows in args.rows:
        for shape in args.shapes:
            summary = demo.build(args.url, demo.DemoShape(rows=rows, **SHAPES[shape]))
            print(f"built {rows:,} rows ({shape}) in {summary['seconds']} s", flush=True)
            with psycopg.connect(args.url, autocommit=True) as conn:
                conn.execute("SET maintenance_work_mem = '512MB'")
                for statement in [*INDEXES, CREATED_AT]:
                    conn.execute(statement)
                conn.execute("VACUUM ANALYZE report_data_weeks")
                conn.execute("VACUUM ANALYZE workflow_executions")
            for indexed in [v == "indexed" for v in args.variants]:
                if not indexed:
                    with psycopg.connect(args.url, autocommit=True) as conn:
                        conn.execute("DROP INDEX idx_report_data_weeks_created_at")
                harness.settle(args.url)
                pool = spawn.Pool(1)
                figures = pool.apply(measure, (args.url, args.repeat))
                pool.close()
                pool.join()
                row = {"rows": rows, "shape": shape, "created_at_index": indexed, **figures}
                results.append(row)
                print(row, flush=True)
    return results


def measure(url: str, repeat: int) -> dict:
    import os

    os.environ["RDW_DATABASE_URL"] = url
    import dagster as dg
    import psycopg

    from rdw_tracking.assets import daily
    from rdw_tracking.assets.tallying import tally_key
    from rdw_tracking.definitions import defs
    from rdw_tracking.resources import TargetDatabase

    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    instance = dg.DagsterInstance.ephemeral()
    clock = _DatabaseClock()
    global_job = defs.resolve_implicit_global_asset_job_def()
    reconcile_key = dg.AssetCheckKey(dg.AssetKey(daily.ASSET), daily.RECONCILE_CHECK)
    full_pass_job = global_job.get_subset(
        asset_selection={dg.AssetKey("execution_id_population")},
        asset_check_selection={
            reconcile_key,
            *(
                dg.AssetCheckKey(dg.AssetKey("execution_id_population"), name)
                for name in (
                    "execution_id_recent_population_rate",
                    "execution_ids_exist",
                    "execution_id_population_trend",
                    "execution_id_run_stamped",
                )
            ),
        },
    )

    def timed(run) -> tuple[float, float]:
        clock.seconds = 0.0
        started = time.perf_counter()
        result = run()
        assert result.success
        return time.perf_counter() - started, clock.seconds

    def collection_run() -> str:
        """A collection run that wrote 50 rows, stamped, as the fix does."""
        with psycopg.connect(url, autocommit=True, options="-c TimeZone=UTC") as conn:
            execution = conn.execute(
                "INSERT INTO workflow_executions (status, created_at) VALUES ('running', now()) "
                "RETURNING id::text"
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date, "
                "status, execution_id) SELECT collection_id, week_start_date, week_end_date, "
                "'completed', %s FROM report_data_weeks LIMIT 50",
                [execution],
            )
            conn.execute(
                "UPDATE workflow_executions SET status = 'completed', completed_at = now() "
                "WHERE id = %s",
                [execution],
            )
        return execution

    def validate(execution: str):
        config = {"ops": {"execution_id_population": {"config": {"execution_ids": [execution]}}}}
        return defs.resolve_job_def("post_collection_validation").execute_in_process(
            instance=instance, run_config=config | quiet, raise_on_error=False
        )

    def full_pass():
        return full_pass_job.execute_in_process(
            instance=instance, run_config=quiet, raise_on_error=False
        )

    def forget_tally():
        db = TargetDatabase(url=url)
        with db.cursor() as cur:
            key = tally_key(db, cur)
        instance.run_storage.set_cursor_values({key: ""})

    def backfill():
        with psycopg.connect(url, options="-c TimeZone=UTC") as conn:
            first, last = conn.execute(
                "SELECT min(created_at)::date, CURRENT_DATE FROM report_data_weeks"
            ).fetchone()
        return global_job.get_subset(asset_selection={dg.AssetKey(daily.ASSET)}).execute_in_process(
            instance=instance,
            run_config=quiet,
            raise_on_error=False,
            tags={
                "dagster/asset_partition_range_start": max(
                    first, dt_date(daily.history_start())
                ).isoformat(),
                "dagster/asset_partition_range_end": last.isoformat(),
            },
        )

    _spec_by_hand(url)  # warm-up: the same cache for both sides
    timed(full_pass)  # the first tally (a whole-table count)
    spec, per_run, passes, counts = [], [], [], []
    for _ in range(repeat):
        spec.append(sum(_spec_by_hand(url).values()))
        execution = collection_run()
        per_run.append(timed(lambda execution=execution: validate(execution)))
        passes.append(timed(full_pass))
    for _ in range(max(1, repeat // 2)):
        forget_tally()
        counts.append(timed(full_pass))
    backfill_wall, backfill_db = timed(backfill)
    spec_total = statistics.median(spec)
    figures = {
        "spec_s": round(spec_total, 3),
        "per_run_db_ms": round(statistics.median(d for _, d in per_run) * 1000, 1),
        "per_run_wall_s": round(statistics.median(w for w, _ in per_run), 2),
        "full_pass_db_s": round(statistics.median(d for _, d in passes), 3),
        "full_count_db_s": round(statistics.median(d for _, d in counts), 3),
        "backfill_db_s": round(backfill_db, 3),
        "backfill_wall_s": round(backfill_wall, 1),
    }
    figures["full_pass_ratio"] = round(figures["full_pass_db_s"] / spec_total, 2)
    figures["full_count_ratio"] = round(figures["full_count_db_s"] / spec_total, 2)
    figures["backfill_vs_full_count"] = round(backfill_db / figures["full_count_db_s"], 2)
    return figures


def dt_date(text: str):
    import datetime as dt

    return dt.date.fromisoformat(text)
