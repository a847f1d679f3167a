"""A fleet job's run in a process of its own, for test_fleet_mode.py, as a run launcher
starts each run: the definitions load from RDW_FLEET_FILE in that process.

Two runs in threads of one process are not an option: every run start reconfigures
Python logging (`logging.config.dictConfig`, in `DagsterInstance.get_handlers`), which
deadlocks against a run emitting events in another thread.
"""

from __future__ import annotations

from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context


def failures(result) -> list[str]:
    """Each step failure's message with its whole cause chain, one string per step."""
    found = []
    for event in result.all_events:
        if event.event_type_value != "STEP_FAILURE" or not event.event_specific_data.error:
            continue
        chain, error = [], event.event_specific_data.error
        while error is not None:
            chain.append(error.message.strip())
            error = error.cause or error.context
        found.append(" <- ".join(chain))
    return found


def run_partition(job: str, database: str, run_config: dict | None = None) -> dict:
    """Run `job` for one database of the fleet in this process; a plain summary."""
    import time

    import dagster as dg

    from rdw_tracking import definitions, fleet

    defs = definitions.fleet_databases(fleet.load())
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    started = time.time()
    result = defs.resolve_job_def(job).execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        partition_key=database,
        run_config={**quiet, **(run_config or {})},
        raise_on_error=False,
    )
    metadata = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        metadata[materialization.asset_key.to_user_string()] = {
            key: getattr(value, "value", value)
            for key, value in materialization.metadata.items()
            if isinstance(getattr(value, "value", value), (int, float, str, bool))
        }
    return {
        "success": result.success,
        "tags": dict(result.dagster_run.tags),
        "failures": failures(result),
        "metadata": metadata,
        "started": started,
        "ended": time.time(),
    }


def launch(pool: ProcessPoolExecutor, job: str, database: str, run_config=None) -> Future:
    return pool.submit(run_partition, job, database, run_config)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """Fresh interpreters (spawn): each loads the definitions as a run's process does."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
