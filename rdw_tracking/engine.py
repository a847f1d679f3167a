"""Where a run's steps execute: in the launching process (the default), or on Dagster's
celery executor, chosen by env `RDW_EXECUTOR` where the definitions load.

    RDW_EXECUTOR        unset (or `default`): each job's own executor, as before;
                        `celery`: dagster-celery's executor;
                        `k8s`: dagster-k8s's, each step in a Kubernetes Job (the `k8s`
                        extra; settings in deploy/k8s/executor.yaml)
    RDW_CELERY_BROKER   the broker's URL (default: RabbitMQ on 127.0.0.1:5672, guest)
    RDW_CELERY_QUEUE    the celery queue the steps go to (default: `dagster`)
    RDW_CELERY_WORKER_WAIT_S  how long a run's steps may wait while no worker consumes
                        their queue before the run fails (default: 60)

The executor and the workers must agree on broker and queue: `worker_config()` is the
`execution: config:` block both take (`dagster-celery worker start -y` reads it), and
it names the broker's env var rather than holding its URL. Results come back over
`rpc://` (the broker itself): no second server. Steps are acknowledged only once done
(`task_acks_late`), so a step whose worker dies mid-step is delivered again to another
worker rather than lost; steps must therefore be safe to run twice, as every asset here
is (read-only, or idempotent and guarded by the write lock).

The celery workers load the same code and need the same Dagster instance: a persistent
`DAGSTER_HOME` with the project's dagster.yaml (runs and events in PostgreSQL) and the
same `RDW_DAGSTER_STORAGE_URL`, since each step writes its events there itself.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import dagster as dg

EXECUTOR_ENV = "RDW_EXECUTOR"
BROKER_ENV = "RDW_CELERY_BROKER"
QUEUE_ENV = "RDW_CELERY_QUEUE"
# RabbitMQ's stock account, which it accepts from localhost only.
DEFAULT_BROKER = "pyamqp://guest:guest@127.0.0.1:5672//"
DEFAULT_QUEUE = "dagster"
# Results travel back over the broker's own connection: no result server to run.
BACKEND = "rpc://"
# dagster-celery's run loop sleeps TICK_SECONDS (1 s) between polls of its steps'
# results: every level of a run's step graph then waits up to a second, 3-5 s for
# verify_execution_tracking. A tenth of a second makes that near nothing; a poll is a
# look at the rpc:// reply queue already open, not a new request.
POLL_SECONDS = 0.1
_BROKER_SCHEMES = re.compile(r"^(py)?amqps?://|^rediss?://|^sqs://", re.IGNORECASE)
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
CHOICES = ("default", "celery", "k8s")


class EngineConfigError(ValueError):
    """An executor setting that cannot work; the message names the variable and the fix."""


def choice(environ: Mapping[str, str] | None = None) -> str:
    """`default` or `celery`, from env `RDW_EXECUTOR`."""
    environ = os.environ if environ is None else environ
    value = (environ.get(EXECUTOR_ENV) or "default").strip().lower()
    if value not in CHOICES:
        # Not quoted: whatever was pasted there is not ours to print.
        raise EngineConfigError(
            f"{EXECUTOR_ENV} must be `celery`, `k8s` or unset (each job's own executor), "
            "not another value; fix it where the code location and the workers run"
        )
    return value


def executor(
    default: dg.ExecutorDefinition = dg.multiprocess_executor,
    environ: Mapping[str, str] | None = None,
) -> dg.ExecutorDefinition:
    """The executor for a job: `default`, unless `RDW_EXECUTOR` picks celery or k8s."""
    chosen = choice(environ)
    if chosen == "celery":
        return celery_executor(environ)
    if chosen == "k8s":
        return k8s_executor()
    return default


def worker_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The celery executor's config: the `execution: config:` block of a worker's
    `-y` file, and what `celery_executor()` is configured with.

    The broker is `{env: RDW_CELERY_BROKER}` when that is set, so neither the YAML nor
    the job's snapshot holds a broker password; else RabbitMQ's localhost default.
    """
    environ = os.environ if environ is None else environ
    broker_url = (environ.get(BROKER_ENV) or "").strip()
    if broker_url and not _BROKER_SCHEMES.match(broker_url):
        raise EngineConfigError(
            f"{BROKER_ENV} is not a celery broker URL; set it to e.g. "
            "pyamqp://user:password@rabbitmq:5672// (or redis://host:6379/0)"
        )
    queue = (environ.get(QUEUE_ENV) or DEFAULT_QUEUE).strip()
    if not _QUEUE_NAME.fullmatch(queue):
        raise EngineConfigError(
            f"{QUEUE_ENV} must be a queue name of letters, digits, '_', '.' or '-'; "
            f"fix it (default: {DEFAULT_QUEUE})"
        )
    return {
        "broker": {"env": BROKER_ENV} if broker_url else DEFAULT_BROKER,
        "backend": BACKEND,
        "config_source": {
            "task_default_queue": queue,
            # A step is acknowledged when it ends, not when it starts: a worker killed
            # mid-step leaves it on the queue for another worker.
            "task_acks_late": True,
            # ...and so does a pool process killed under a living worker.
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
            "broker_connection_retry_on_startup": True,
        },
    }


def worker_command(queue: str, name: str) -> list[str]:
    """`rdw-tracking celery-worker` as this Python runs it: one worker `name` on `queue`,
    one step at a time. Its pid is the celery worker itself (the command execs it), so
    stopping that pid stops the worker; its settings come from the environment, as the
    executor's do, and no file holds the broker's password."""
    return [
        sys.executable, "-m", "rdw_tracking.cli", "celery-worker", "-q", queue, "-n", name,
        "-l", "WARNING",
        # Celery's own options: one step per worker, no chatter between workers.
        "--", "--concurrency=1", "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def worker_exec(queue: str, name: str, loglevel: str, extra: list[str]) -> list[str]:
    """The `celery worker` command line that `rdw-tracking celery-worker` becomes."""
    if not _QUEUE_NAME.fullmatch(queue):
        raise EngineConfigError(
            "the worker's queue must be a name of letters, digits, '_', '.' or '-'; fix -q"
        )
    return [
        sys.executable, "-m", "celery", "-A", "rdw_tracking.celery_app", "worker",
        "--prefetch-multiplier=1", "--loglevel", loglevel, "-Q", queue, "-n", f"{name}@%h",
        *extra,
    ]  # fmt: skip


def broker_url(environ: Mapping[str, str] | None = None) -> str:
    """The broker's URL itself, for a process that talks to the broker directly."""
    environ = os.environ if environ is None else environ
    return (environ.get(BROKER_ENV) or "").strip() or DEFAULT_BROKER


def celery_executor(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """dagster-celery's executor, configured by `worker_config()`, its runs failing
    when no worker consumes their queue (`WatchedCeleryExecutor`)."""
    import dagster_celery.core_execution_loop as run_loop
    from dagster_celery import celery_executor as dagster_celery_executor

    # Read at every turn of the loop, so setting it here reaches every run this process
    # orchestrates; test_celery.py fails if an upgrade drops the name.
    run_loop.TICK_SECONDS = POLL_SECONDS

    def watched(init_context) -> dg.Executor:
        base = dagster_celery_executor.executor_creation_fn(init_context)
        return watched_celery_executor(base)

    definition = dg.ExecutorDefinition(
        name="celery",
        config_schema=dagster_celery_executor.config_schema,
        requirements=dagster_celery_executor.get_requirements,
        executor_creation_fn=watched,
        description=dagster_celery_executor.description,
    )
    return definition.configured(worker_config(environ), name="celery")


# How long a run's steps may wait while no worker consumes their queue before the run
# fails (env RDW_CELERY_WORKER_WAIT_S): with every worker stopped, or all of them on
# another broker, a run would otherwise stay STARTED, silently, for ever.
WORKER_WAIT_ENV = "RDW_CELERY_WORKER_WAIT_S"
DEFAULT_WORKER_WAIT_S = 60.0
# A step pending this long makes the run ask whether any worker consumes its queue.
_ASK_AFTER_S = 3.0


def worker_wait_s(environ: Mapping[str, str] | None = None) -> float:
    environ = os.environ if environ is None else environ
    value = (environ.get(WORKER_WAIT_ENV) or "").strip()
    try:
        wait = float(value) if value else DEFAULT_WORKER_WAIT_S
    except ValueError:
        wait = -1.0
    if not wait > 0:
        raise EngineConfigError(
            f"{WORKER_WAIT_ENV} must be a number of seconds above 0; fix it or unset it "
            f"(default {DEFAULT_WORKER_WAIT_S:.0f})"
        )
    return wait


def broker_host(url: str) -> str:
    """`host:port` of a broker URL: safe to log, no user or password."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        return f"{parts.hostname or 'localhost'}:{parts.port or ''}".rstrip(":")
    except ValueError:
        return "the broker"


class NoWorker(Exception):
    """No celery worker consumed a run's queue for the whole wait."""


def watched_celery_executor(base):
    """`base` (dagster-celery's CeleryExecutor), whose steps fail, and with them the run,
    when no worker has consumed their queue for `worker_wait_s()`: each pending step's
    result reports ready with a NoWorker error, and its task is revoked."""
    from dagster_celery.executor import CeleryExecutor, _submit_task

    class WatchedCeleryExecutor(CeleryExecutor):
        def execute(self, plan_context, execution_plan):
            from dagster_celery.core_execution_loop import core_celery_execution_loop

            watch = WorkerWatch(self.broker, worker_wait_s())

            def submit(app, context, step, queue, priority, known_state):
                result = _submit_task(app, context, step, queue, priority, known_state)
                return watch.watched(app, queue, result)

            return core_celery_execution_loop(plan_context, execution_plan, submit)

    return WatchedCeleryExecutor(
        retries=base.retries,
        broker=base.broker,
        backend=base.backend,
        include=base.include,
        config_source=dict(vars(base.config_source)),
    )


class WorkerWatch:
    """Whether any worker consumes a queue, asked at most every few seconds and only
    while a step has been pending a while (a busy queue is not a dead one)."""

    def __init__(self, broker: str, wait_s: float):
        self.broker, self.wait_s = broker, wait_s
        self.seen: dict[str, float] = {}  # queue -> when a worker last consumed it
        self.asked: dict[str, float] = {}

    def watched(self, app, queue: str, result) -> WatchedResult:
        now = time.monotonic()
        self.seen.setdefault(queue, now)
        return WatchedResult(result, self, app, queue, now)

    def gone(self, app, queue: str, pending_since: float) -> bool:
        now = time.monotonic()
        if now - pending_since < _ASK_AFTER_S or now - self.asked.get(queue, 0.0) < _ASK_AFTER_S:
            return now - self.seen[queue] > self.wait_s
        self.asked[queue] = now
        try:
            replies = app.control.inspect(timeout=1.0).active_queues() or {}
        except Exception:  # the broker itself unreachable: no worker can be there either
            replies = {}
        if any(q.get("name") == queue for queues in replies.values() for q in queues or []):
            self.seen[queue] = now
        return now - self.seen[queue] > self.wait_s

    def message(self, queue: str) -> str:
        return (
            f"no celery worker consumed queue {queue!r} on broker {broker_host(self.broker)} "
            f"for {self.wait_s:.0f} s, so this step was never run; start one there "
            "(rdw-tracking celery-worker) or check RDW_CELERY_BROKER and RDW_CELERY_QUEUE "
            "where the workers run"
        )


class WatchedResult:
    """A step's celery result that reports ready, failing with NoWorker, once no worker
    has consumed its queue for the whole wait; its task is then revoked."""

    def __init__(self, result, watch: WorkerWatch, app, queue: str, since: float):
        self.result, self.watch, self.app, self.queue, self.since = result, watch, app, queue, since

    def ready(self) -> bool:
        return self.result.ready() or self.watch.gone(self.app, self.queue, self.since)

    def get(self):
        if not self.result.ready():
            self.result.revoke()
            raise NoWorker(self.watch.message(self.queue))
        return self.result.get()

    def revoke(self, *args, **kwargs):
        return self.result.revoke(*args, **kwargs)


def k8s_executor() -> dg.ExecutorDefinition:
    """dagster-k8s's `k8s_job_executor`: each step in a Kubernetes Job, with the run
    launcher's image, namespace and env unless the run's `execution: config:` says
    otherwise (deploy/k8s/executor.yaml)."""
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError:
        raise EngineConfigError(
            f"{EXECUTOR_ENV}=k8s needs dagster-k8s, which this install lacks; install the "
            "`k8s` extra (pip install 'rdw_tracking[k8s]') or unset it"
        ) from None
    return k8s_job_executor
