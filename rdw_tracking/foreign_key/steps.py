"""Each step's statement, run as the index builds run their DDL: not started behind an
idle session, watched for blockers, retried after a lock wait."""

from psycopg import sql

from rdw_tracking.contract import add_constraint_ddl, validate_ddl
from rdw_tracking.foreign_key.apply import GaveUp, Log, RunStep
from rdw_tracking.foreign_key.plan import Step
from rdw_tracking.indexes.existing import equivalent_of, lookup
from rdw_tracking.indexes.sessions import LockWait, describe, raise_if_stuck
from rdw_tracking.indexes.specs import IndexSpec
from rdw_tracking.indexes.watch import run_watched, with_lock_retries
from rdw_tracking.resources import TargetDatabase


def index_to_build(db: TargetDatabase, spec: IndexSpec) -> bool:
    """Whether `build_index(spec)` would create or rebuild an index (as it decides it)."""
    named, on_table = lookup(db, spec)
    if named is not None:
        return not named.valid
    return equivalent_of(spec, on_table) is None


def statement(db: TargetDatabase, step: Step, on_delete: str) -> sql.Composed:
    """The step's DDL, as the schema check lists it."""
    if step.phase == "validate":
        return validate_ddl(step.table, step.constraint)
    not_valid = step.phase == "add"  # "attach": the parent's plain ADD
    return add_constraint_ddl(db, step.table, on_delete, step.constraint, not_valid=not_valid)


def step_runner(
    db: TargetDatabase, on_delete: str, lock_retries: int, backoff_s: float, log: Log
) -> RunStep:
    """Runs one step in its own transaction and returns its seconds; `GaveUp` once the
    lock retries are spent."""

    def attempt(step: Step) -> float:
        if step.blocks_writers:  # its lock conflicts with writers; VALIDATE's does not
            raise_if_stuck(db, list(step.tables), step.what, snapshots=False)
        return run_watched(db, statement(db, step, on_delete), step.what, log)

    def run(step: Step) -> float:
        try:
            return with_lock_retries(lambda: attempt(step), step.what, log, lock_retries, backoff_s)
        except LockWait as wait:
            raise GaveUp(wait.what, describe(wait.blockers)) from None

    return run
