"""Build the demo dataset at given sizes and time it (target: 5M rows under 180 s)."""

from __future__ import annotations

from rdw_tracking import demo

TITLE = "Demo data build"
NOTES = "Target: 5,000,000 rows in under 180 s on 2 cores. Server-side `INSERT ... SELECT generate_series`, 2 parallel slices, constraints added after the load."


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])


def run(args) -> list[dict]:
    results = []
    for rows in args.rows:
        summary = demo.build(args.url, demo.DemoShape(rows=rows))
        print(f"built {rows:,} rows in {summary['seconds']} s", flush=True)
        results.append(
            {
                "rows": summary["rows"],
                "with_execution_id": summary["with_execution_id"],
                "workflow_executions": summary["workflow_executions"],
                "seconds": summary["seconds"],
                "rows_per_s": int(summary["rows"] / summary["seconds"]),
            }
        )
    return results
