"""The job bench_fleet.py times, importable by celery workers from this file's path:
the fleet's `verify_execution_tracking` (fleet file and URLs from the environment, as a
code location and its workers read them), on the executor `RDW_EXECUTOR` picks."""

import dagster as dg

from rdw_tracking import engine


def verify_on_engine() -> dg.JobDefinition:
    from rdw_tracking import definitions, fleet

    job = definitions.fleet_databases(fleet.load()).resolve_job_def("verify_execution_tracking")
    return job.with_executor_def(engine.executor(job.executor_def))
