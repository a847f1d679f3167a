"""The job bench_fleet.py times, importable by celery workers from this file's path:
the project's `verify_execution_tracking`, on the executor `RDW_EXECUTOR` picks."""

import dagster as dg

from rdw_tracking import engine


def verify_on_engine() -> dg.JobDefinition:
    from rdw_tracking.definitions import defs

    job = defs.resolve_job_def("verify_execution_tracking")
    return job.with_executor_def(engine.executor(job.executor_def))
