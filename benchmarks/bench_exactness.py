"""Exact validation: post_collection_validation's first run and steady state against the spec's queries.

For each size and data shape (`demo`: about 15% of rows stamped; `stamped`: about 70%),
on the project's recommended indexes (the two partial indexes and the opt-in
`(created_at, execution_id)` index), in a fresh child process keeping one Dagster
instance across runs:

- `spec_s`: the spec's three data-quality queries by hand (median of `--repeat`);
- `first_run_s`: post_collection_validation with no earlier tally (database time);
- `steady_s`: the same after a collection run of 2,000 stamped rows, the tally present;

each for three settings: `exact` (the default: every day counted each run), `budget`
(`count_budget_hours: 24`), and `budget_fk` (the same with a validated foreign key, so
orphans are proven, not counted; the orphaned ids are cleared first). `--no-build`
measures the database at `--url` as it is.
"""

import multiprocessing
import os
import statistics
import time

import harness
from bench_scale import CREATED_AT, INDEXES, SHAPES
from bench_validation import _DatabaseClock, _spec_by_hand

TITLE = "Exact validation (first run and steady state against the spec's queries)"
NOTES = (
    "Targets (issue 24): at 5M rows, 70% stamped, with the recommended indexes, the first "
    "run within 1.2x the spec's three queries, the steady state (tally present, a "
    "collection run of 2,000 rows since) within 0.15x. exact: every run counts every day "
    "and every orphan (the default); budget: count_budget_hours 24 (opt-in); budget_fk: "
    "also a validated foreign key, which proves there is no orphan. Database time is the "
    "time inside psycopg; load is the 1-minute load average around the measurement."
)
FK = (
    "ALTER TABLE report_data_weeks ADD CONSTRAINT fk_report_data_weeks_execution_id "
    "FOREIGN KEY (execution_id) REFERENCES workflow_executions (id)"
)
CLEAR_ORPHANS = (
    "UPDATE report_data_weeks w SET execution_id = NULL WHERE execution_id IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id)"
)
ROWS_PER_RUN = 2_000
SETTINGS = {"exact": 0.0, "budget": 24.0, "budget_fk": 24.0}


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per figure")
    parser.add_argument("--no-build", action="store_true", help="measure --url as it is")


def run(args) -> list[dict]:
    import psycopg

    from rdw_tracking import demo

    results = []
    spawn = multiprocessing.get_context("spawn")
    for rows in args.rows:
        for shape in args.shapes:
            if not args.no_build:
                summary = demo.build(args.url, demo.DemoShape(rows=rows, **SHAPES[shape]))
                print(f"built {rows:,} rows ({shape}) in {summary['seconds']} s", flush=True)
            with psycopg.connect(args.url, autocommit=True) as conn:
                conn.execute("SET maintenance_work_mem = '512MB'")
                for statement in [*INDEXES, CREATED_AT]:
                    conn.execute(statement)
                conn.execute("ALTER TABLE report_data_weeks DROP CONSTRAINT IF EXISTS "
                             "fk_report_data_weeks_execution_id")  # fmt: skip
                conn.execute("VACUUM ANALYZE report_data_weeks")
                conn.execute("VACUUM ANALYZE workflow_executions")
            for setting, hours in SETTINGS.items():
                if setting == "budget_fk":
                    with psycopg.connect(args.url, autocommit=True) as conn:
                        conn.execute(CLEAR_ORPHANS)
                        conn.execute(FK)
                        conn.execute("VACUUM ANALYZE report_data_weeks")
                harness.settle(args.url)
                pool = spawn.Pool(1)
                figures = pool.apply(measure, (args.url, args.repeat, hours))
                pool.close()
                pool.join()
                row = {"rows": rows, "shape": shape, "setting": setting, **figures}
                results.append(row)
                print(row, flush=True)
    return results


def measure(url: str, repeat: int, budget_hours: float) -> dict:
    os.environ["RDW_DATABASE_URL"] = url
    import dagster as dg
    import psycopg

    from rdw_tracking.assets.tallying import tally_key
    from rdw_tracking.definitions import defs
    from rdw_tracking.resources import TargetDatabase

    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    instance = dg.DagsterInstance.ephemeral()
    clock = _DatabaseClock()
    job = defs.resolve_job_def("post_collection_validation")
    load = [os.getloadavg()[0]]

    def validate(execution: str | None = None) -> float:
        config = {"count_budget_hours": budget_hours}
        if execution:
            config["execution_ids"] = [execution]
        clock.seconds = 0.0
        result = job.execute_in_process(
            instance=instance,
            run_config={"ops": {"execution_id_population": {"config": config}}} | quiet,
            raise_on_error=False,
        )
        assert result.success
        return clock.seconds

    def collection_run() -> str:
        with psycopg.connect(url, autocommit=True, options="-c TimeZone=UTC") as conn:
            execution = conn.execute(
                "INSERT INTO workflow_executions (status, created_at) VALUES ('running', now()) "
                "RETURNING id::text"
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO report_data_weeks (collection_id, week_start_date, week_end_date, "
                "status, execution_id) SELECT collection_id, week_start_date, week_end_date, "
                "'completed', %s FROM report_data_weeks LIMIT %s",
                [execution, ROWS_PER_RUN],
            )
            conn.execute(
                "UPDATE workflow_executions SET status = 'completed', completed_at = now() "
                "WHERE id = %s",
                [execution],
            )
        return execution

    def forget_tally() -> None:
        db = TargetDatabase(url=url)
        with db.cursor() as cur:
            key = tally_key(db, cur)
        instance.run_storage.set_cursor_values({key: ""})

    _spec_by_hand(url)  # warm-up: the same cache for both sides
    validate()
    spec, first, steady = [], [], []
    for _ in range(repeat):
        spec.append(sum(_spec_by_hand(url).values()))
        forget_tally()
        first.append(validate())
        validate()  # the tally (and, under a budget, its counters) the steady state starts from
        time.sleep(1.5)  # the writers' counters reach the statistics
        steady.append(validate(collection_run()))
    load.append(os.getloadavg()[0])
    spec_s = statistics.median(spec)
    figures = {
        "spec_s": round(spec_s, 3),
        "first_run_s": round(statistics.median(first), 3),
        "steady_s": round(statistics.median(steady), 3),
    }
    figures["first_ratio"] = round(figures["first_run_s"] / spec_s, 2)
    figures["steady_ratio"] = round(figures["steady_s"] / spec_s, 2)
    figures["load"] = f"{min(load):.1f}-{max(load):.1f}"
    return figures
