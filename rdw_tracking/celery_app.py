"""The celery app of `rdw-tracking celery-worker`: dagster-celery's tasks, configured
from the environment as the executor is (`engine.worker_config()`), in memory.

`dagster-celery worker start` writes the resolved broker URL, password included, to a
world-readable `$DAGSTER_HOME/dagster_celery/config/<uuid>/dagster_celery_config.py`
at every start and never removes it. This app reads `RDW_CELERY_BROKER` where the
worker runs instead, so no file holds the password at all.

A step's task runs only while its run is still going. Cancelling a run revokes its
queued tasks by a broadcast that only the workers up at that moment hear: with none up,
the steps used to run when workers came back, for a run already cancelled (or failed
for want of a worker). Each task now looks at its run first and skips it when the run
is over, saying so in the run's events.
"""

from celery import Task
from dagster import DagsterInstance, DagsterRunStatus
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import unpack_value
from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task, create_task

from rdw_tracking import engine

OVER = frozenset(
    {
        DagsterRunStatus.CANCELING,
        DagsterRunStatus.CANCELED,
        DagsterRunStatus.FAILURE,
        DagsterRunStatus.SUCCESS,
    }
)


class StepOfALiveRun(Task):
    """dagster-celery's step task, run only if the step's run is not over."""

    def __call__(self, execute_step_args_packed, executable_dict):
        args = unpack_value(execute_step_args_packed, as_type=ExecuteStepArgs)
        instance = DagsterInstance.from_ref(args.instance_ref)
        run = instance.get_run_by_id(args.run_id)
        if run is not None and run.status in OVER:
            steps = ", ".join(args.step_keys_to_execute or [])
            instance.report_engine_event(
                f"celery worker {self.request.hostname} did not run step(s) {steps}: the run "
                f"is {run.status.value}",
                run,
                cls=CeleryExecutor,
            )
            return []
        return super().__call__(execute_step_args_packed, executable_dict)


app = make_app(
    CeleryExecutor.for_cli(**{**engine.worker_config(), "broker": engine.broker_url()}).app_args()
)
# The tasks dagster-celery's own app module registers (dagster_celery.app).
execute_plan = create_task(app, base=StepOfALiveRun)
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
