"""Running the steps to the end: each its own transaction, failures told as refusals."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import psycopg

from rdw_tracking.contract import SchemaReport, inspect_schema
from rdw_tracking.errors import refuse
from rdw_tracking.foreign_key import FOREIGN_KEY_JOB
from rdw_tracking.foreign_key.plan import Step, next_steps
from rdw_tracking.resources import TargetDatabase


class Log(Protocol):
    """Where a run reports: a `logging.Logger`, Dagster's `context.log`, or a test's list."""

    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...  # the lock retries' (see `RunStep`)


class GaveUp(Exception):
    """A step's lock waits outlasted its retries; `blocking` names the sessions in the way."""

    def __init__(self, what: str, blocking: str):
        self.what = what
        self.blocking = blocking
        super().__init__(f"{what}: waiting for {blocking}")


# Runs one step in its own transaction, retrying lock waits, and returns its seconds;
# raises `GaveUp` once the retries are spent (`steps.step_runner`).
RunStep = Callable[[Step], float]


@dataclass(frozen=True)
class Request:
    on_delete: str
    name: str  # the constraint's: the existing one's, else FK_NAME
    native: bool  # PostgreSQL 18+: NOT VALID on the partitioned parent itself
    lock_retries: int  # for the message when a step gives up


@dataclass(frozen=True)
class Done:
    """One statement run: what it was, its phase, its partition ("" for the table)."""

    statement: str
    phase: str
    table: str
    seconds: float


@dataclass
class Added:
    """What a run did, statement by statement."""

    done: list[Done] = field(default_factory=list)

    def seconds(self, phase: str) -> float:
        return sum((d.seconds for d in self.done if d.phase == phase), 0.0)  # 0.0: a float

    @property
    def partitions_validated(self) -> int:
        return sum(1 for d in self.done if d.phase == "validate" and d.table)


def add(
    db: TargetDatabase,
    report: SchemaReport,
    request: Request,
    run: RunStep,
    log: Log,
) -> Added:
    """Runs `next_steps` until none is left, reading the catalog again after each pass: a
    partition attached meanwhile is seen. Refuses, naming what stays in place, when a
    step gives up on a lock or fails."""
    existed = report.foreign_key is not None or any(report.member_foreign_keys)
    added = Added()
    try:
        # A few passes more than the tree has tables; a tree that keeps changing is refused.
        for _ in range(len(report.layout.members) + 3):
            steps = next_steps(report, db, request.on_delete, request.name, request.native)
            if not steps:
                return added
            for step in steps:
                added.done.append(_run(step, run, log))
            report = inspect_schema(db)
        raise refuse(
            f"the partitions of {db.qualified(db.weeks_table)} kept changing while the "
            "foreign key was added; the constraints added so far stay in place: run the job "
            "again"
        )
    except GaveUp as gave_up:
        raise _gave_up(db, gave_up, request, existed or bool(added.done)) from None
    except psycopg.Error as err:
        raise _refusal(db, err, existed or bool(added.done)) from None


def _run(step: Step, run: RunStep, log: Log) -> Done:
    took = run(step)
    log.info(f"{step.what}: done in {took:.2f} s")
    return Done(step.what, step.phase, step.partition or "", took)


def _state(changed: bool) -> str:
    if changed:
        return (
            "the constraints added so far stay in place (NOT VALID ones already check new "
            "writes); run the job again to continue"
        )
    return "nothing was changed"


def _gave_up(db: TargetDatabase, gave_up: GaveUp, request: Request, changed: bool) -> Exception:
    return refuse(
        f"gave up on the foreign key of {db.qualified(db.weeks_table)}.execution_id at "
        f"{gave_up.what} after {request.lock_retries + 1} attempts, each waiting "
        f"{db.lock_timeout_ms} ms at most for a lock held by {gave_up.blocking}; "
        f"{_state(changed)}",
        blocking_sessions=gave_up.blocking,
    )


def _refusal(db: TargetDatabase, err: psycopg.Error, changed: bool) -> Exception:
    weeks, state = db.qualified(db.weeks_table), _state(changed)
    if isinstance(err, psycopg.errors.ForeignKeyViolation):
        return refuse(
            f"VALIDATE found orphaned {weeks}.execution_id values written since the orphan "
            f"check; {state}. Clear them, then run {FOREIGN_KEY_JOB} again"
        )
    if isinstance(err, psycopg.errors.InsufficientPrivilege):
        return refuse(
            f"adding the foreign key needs the owner of {weeks} (and of its partitions) and "
            f"REFERENCES on {db.qualified(db.executions_table)}; {state}. Run the job as that "
            "role"
        )
    return refuse(f"adding the foreign key on {weeks} failed ({state}): {err}")
