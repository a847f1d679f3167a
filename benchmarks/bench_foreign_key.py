"""Foreign key on a partitioned table: add_execution_id_foreign_key against one plain ADD.

For each server (the benchmark's database, then each `--also` URL) and each size: builds
the demo data with every row carrying an execution_id, lays report_data_weeks out (`--layout`, monthly range partitions by
default), clears the orphans and builds idx_report_data_weeks_execution_id. Then, while
a writer updates a random existing row's execution_id and inserts a row, one statement
per transaction, as fast as they go:
1. the writer alone (baseline),
2. the `add_execution_id_foreign_key` job (per version: NOT VALID and VALIDATE per
   partition before 18, the parent's NOT VALID then VALIDATE per partition on 18+),
3. the constraint dropped, then one plain `ALTER TABLE ... ADD CONSTRAINT ... FOREIGN
   KEY` on the parent: what the job avoids (it validates every partition under SHARE ROW
   EXCLUSIVE, which blocks writers).
Reports the writer's longest wait and p99 in each, and the job's own statement times.
"""

import multiprocessing
import os
import random
import statistics
import time

import dagster as dg
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from rdw_tracking import demo
from rdw_tracking.contract import FK_NAME
from rdw_tracking.demo_layouts import relayout
from rdw_tracking.indexes.specs import EXECUTION_ID_INDEX

TITLE = "Foreign key on a partitioned table: a concurrent writer's longest wait"
NOTES = (
    "`writer_max_ms`: the longest single-row UPDATE or INSERT (autocommit) while the step "
    "ran; `baseline`: the writer alone. `plain ADD` is one `ALTER TABLE ... ADD CONSTRAINT "
    "... FOREIGN KEY` on the parent, which validates every partition under SHARE ROW "
    "EXCLUSIVE: writers wait for the whole scan. `statements_s`: the job's longest "
    "statement (a partition's VALIDATE, which lets writers through)."
)

DELETE_ORPHANS = (
    "DELETE FROM report_data_weeks w WHERE execution_id IS NOT NULL AND NOT EXISTS "
    "(SELECT 1 FROM workflow_executions e WHERE e.id = w.execution_id)"
)


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--layout", default="range")
    parser.add_argument(
        "--also", nargs="*", default=[], help="more servers' database URLs to measure on"
    )
    parser.add_argument("--baseline-s", type=float, default=3.0)


def _write(url: str, rows: list, executions: list, stop, out) -> None:
    pick, latencies = random.Random(7), []
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            execution = pick.choice(executions)
            started = time.perf_counter()
            if len(latencies) % 2:
                row_id, created_at = pick.choice(rows)
                conn.execute(
                    "UPDATE report_data_weeks SET execution_id = %s, updated_at = now() "
                    "WHERE id = %s AND created_at = %s",
                    [execution, row_id, created_at],
                )
            else:
                conn.execute(
                    "INSERT INTO report_data_weeks (collection_id, week_start_date, "
                    "week_end_date, status, execution_id) SELECT id, current_date, "
                    "current_date, 'bench', %s FROM report_data_collections LIMIT 1",
                    [execution],
                )
            latencies.append((time.perf_counter() - started) * 1000)
            if latencies[-1] > 50:  # when, to match it with the job's statements
                print(f"writer waited {latencies[-1]:.0f} ms at {time.time():.3f}", flush=True)
    out.send(latencies)


class Writer:
    """Single-row UPDATEs of random existing rows and INSERTs, alternating, timing each.

    A process of its own: in this one, Dagster's Python would hold the GIL and show up
    as waits that PostgreSQL never made."""

    def __init__(self, url: str):
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT id, created_at FROM report_data_weeks TABLESAMPLE SYSTEM (1) LIMIT 2000"
            ).fetchall()
            executions = [
                r[0] for r in conn.execute("SELECT id FROM workflow_executions LIMIT 200")
            ]
        context = multiprocessing.get_context("spawn")
        self.stop, (self.receive, send) = context.Event(), context.Pipe(duplex=False)
        self.process = context.Process(
            target=_write, args=(url, rows, executions, self.stop, send), daemon=True
        )
        self.latencies: list[float] = []

    def __enter__(self) -> "Writer":
        self.process.start()
        time.sleep(1.0)  # connected and writing before the step starts
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.latencies = self.receive.recv()
        self.process.join()

    def row(self) -> dict:
        p99 = (
            statistics.quantiles(self.latencies, n=100, method="inclusive")[98]
            if len(self.latencies) > 1
            else float("nan")
        )
        return {
            "writes": len(self.latencies),
            "writer_p99_ms": round(p99, 2),
            "writer_max_ms": round(max(self.latencies, default=float("nan")), 1),
        }


def job(url: str) -> tuple[float, dict]:
    # The job's run-config check accepts a url on RDW_DATABASE_URL's server only.
    os.environ["RDW_DATABASE_URL"] = url
    from rdw_tracking.definitions import defs

    run_config = {
        "resources": {"target_db": {"config": {"url": url}}},
        "loggers": {"console": {"config": {"log_level": "WARNING"}}},
    }
    started = time.perf_counter()
    result = defs.resolve_job_def("add_execution_id_foreign_key").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), run_config=run_config
    )
    seconds = time.perf_counter() - started
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = event.event_specific_data.metadata
    return seconds, {key: getattr(value, "value", value) for key, value in metadata.items()}


def prepare(url: str, rows: int, layout: str) -> None:
    # Every row tracked (cutover before the first week): VALIDATE has every row to check.
    summary = demo.build(url, demo.DemoShape(rows=rows, cutover_days=10_000))
    print(f"built {rows:,} demo rows in {summary['seconds']} s", flush=True)
    relayout(url, layout)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(DELETE_ORPHANS)
        conn.execute(
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {} ON report_data_weeks (execution_id) "
                "WHERE execution_id IS NOT NULL"
            ).format(sql.Identifier(EXECUTION_ID_INDEX))
        )
        conn.execute("VACUUM ANALYZE report_data_weeks")
        conn.execute("CHECKPOINT")


def drop_fk(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER TABLE report_data_weeks DROP CONSTRAINT IF EXISTS {}").format(
                sql.Identifier(FK_NAME)
            )
        )
        conn.execute("DELETE FROM report_data_weeks WHERE status = 'bench'")


def measure(url: str, rows: int, args) -> list[dict]:
    prepare(url, rows, args.layout)
    with psycopg.connect(url) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0].split()[0]
        partitions = conn.execute(
            "SELECT count(*) FROM pg_partition_tree('report_data_weeks') WHERE isleaf"
        ).fetchone()[0]
    common = {"server": version, "rows": rows, "partitions": partitions}
    results = []
    with Writer(url) as alone:
        time.sleep(args.baseline_s)
    results.append({**common, "step": "baseline", "seconds": args.baseline_s, **alone.row()})
    with Writer(url) as writer:
        seconds, metadata = job(url)
    longest = max(metadata["statements"].records, key=lambda r: r.data["seconds"]).data
    results.append(
        {
            **common,
            "step": "job",
            "seconds": round(seconds, 2),
            **writer.row(),
            "statements_s": f"{longest['seconds']:.2f} ({longest['statement']})",
            "route": metadata["route"],
        }
    )
    print(results[-1], flush=True)
    drop_fk(url)
    plain = sql.SQL(
        "ALTER TABLE report_data_weeks ADD CONSTRAINT {} FOREIGN KEY (execution_id) "
        "REFERENCES workflow_executions (id)"
    ).format(sql.Identifier(FK_NAME))
    with Writer(url) as writer, psycopg.connect(url, autocommit=True) as conn:
        time.sleep(0.5)
        started = time.perf_counter()
        conn.execute(plain)
        seconds = time.perf_counter() - started
        time.sleep(0.5)
    results.append({**common, "step": "plain ADD", "seconds": round(seconds, 2), **writer.row()})
    print(results[-1], flush=True)
    drop_fk(url)
    return results


def run(args) -> list[dict]:
    results = []
    for url in [args.url, *args.also]:
        print(f"measuring on {conninfo_to_dict(url).get('host', '')}", flush=True)
        for rows in args.rows:
            results += measure(url, rows, args)
    return results
