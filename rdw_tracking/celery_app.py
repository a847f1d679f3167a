"""The celery app of `rdw-tracking celery-worker`: dagster-celery's tasks, configured
from the environment as the executor is (`engine.worker_config()`), in memory.

`dagster-celery worker start` writes the resolved broker URL, password included, to a
world-readable `$DAGSTER_HOME/dagster_celery/config/<uuid>/dagster_celery_config.py`
at every start and never removes it. This app reads `RDW_CELERY_BROKER` where the
worker runs instead, so no file holds the password at all.
"""

from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task, create_task

from rdw_tracking import engine

app = make_app(
    CeleryExecutor.for_cli(**{**engine.worker_config(), "broker": engine.broker_url()}).app_args()
)
# The tasks dagster-celery's own app module registers (dagster_celery.app).
execute_plan = create_task(app)
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
