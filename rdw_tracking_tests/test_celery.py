"""Runs on Dagster's celery executor, on the RabbitMQ of 127.0.0.1:5672, with two real
`dagster-celery` workers: steps spread over both, and a worker killed mid-step has its
step run again by the other.

This test session gives its steps a queue of their own, so no stray worker on the same
broker ever takes them; each test deletes it afterwards (the next test's workers declare
it again). One queue per session, not per test: the executor's queue is fixed when the
job is first built, and Dagster keeps loaded jobs for the life of the process. Workers run in process groups of
their own and are killed by those groups' ids.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

from rdw_tracking import engine

REPO = Path(__file__).resolve().parents[1]
BROKER_HOST, BROKER_PORT = "127.0.0.1", 5672
WORKER_READY_S = 45
QUEUE = f"rdw_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
pytestmark = [
    pytest.mark.timeout(120),
    # dagster-celery builds its task anew for every step it submits; celery warns that
    # the name is taken (by the same task), which we cannot change from here.
    pytest.mark.filterwarnings("ignore:Task name 'execute_plan' is already registered"),
]


def broker_answers() -> bool:
    try:
        with socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def celery_setup(dagster_home, tmp_path, monkeypatch) -> Iterator[dict]:
    """The session's queue, the workers' `-y` file and their environment."""
    if not broker_answers():
        pytest.skip(f"no RabbitMQ answers on {BROKER_HOST}:{BROKER_PORT}: celery tests need one")
    queue = QUEUE
    monkeypatch.setenv(engine.EXECUTOR_ENV, "celery")
    monkeypatch.setenv(engine.QUEUE_ENV, queue)
    monkeypatch.delenv(engine.BROKER_ENV, raising=False)
    config = tmp_path / "celery.yaml"
    # What a deployment runs: `rdw-tracking celery-yaml > celery.yaml`.
    printed = subprocess.run(
        [sys.executable, "-m", "rdw_tracking.cli", "celery-yaml"],
        capture_output=True, text=True, check=True, env=dict(os.environ),
    ).stdout  # fmt: skip
    assert yaml.safe_load(printed) == {"execution": {"config": engine.worker_config()}}
    config.write_text(printed)
    env = dict(os.environ)
    # The workers import the job from this checkout's test package, and run `celery`.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Dagster's tables exist before the workers start: two workers opening a fresh
    # storage at once both try to create them, and one dies on "already exists".
    with dg.DagsterInstance.get():
        pass
    setup = {"queue": queue, "config": config, "env": env, "logs": tmp_path}
    try:
        yield setup
    finally:
        _delete_queue(queue)


def _app():
    """A bare celery app on the broker: enough to ping workers."""
    from celery import Celery

    return Celery("rdw_test_control", broker=engine.broker_url(), backend=engine.BACKEND)


def _delete_queue(queue: str) -> None:
    from kombu import Connection

    with Connection(engine.broker_url(), connect_timeout=5) as conn:
        conn.default_channel.queue_delete(queue)


class Workers:
    """`dagster-celery worker start` processes, one per name, each in its own group."""

    def __init__(self, setup: dict):
        self.setup = setup
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = {}  # name -> celery node name, as events report it

    def start(self, *names: str) -> None:
        for name in names:
            log = open(self.setup["logs"] / f"worker_{name}.log", "wb")
            self.procs[name] = subprocess.Popen(
                engine.worker_command(self.setup["queue"], name),
                env=self.setup["env"],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            self.node[name] = f"{name}@{socket.gethostname()}"
        self._wait_ready()

    def _wait_ready(self) -> None:
        app = _app()
        wanted = set(self.node.values())
        deadline = time.monotonic() + WORKER_READY_S
        while True:
            answered = {n for reply in app.control.ping(timeout=1.0) for n in reply}
            if wanted <= answered:
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {name} exited: {self.log(name)[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(wanted - answered)} did not answer a ping")

    def log(self, name: str) -> str:
        return (self.setup["logs"] / f"worker_{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL to the worker's whole group: the CLI, celery and its pool process, as
        when the machine under them is lost."""
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def workers(celery_setup) -> Iterator[Workers]:
    started = Workers(celery_setup)
    try:
        yield started
    finally:
        started.stop_all()


def run_config(**sleeps: float) -> dict:
    return {
        "ops": {
            f"probe_{op}": {"config": {"sleep_s": sleeps.get(op, 0.0)}}
            for op in ("a", "b", "c", "d")
        }
    }


def execute(instance: dg.DagsterInstance, config: dict) -> dg.ExecuteJobResult:
    from rdw_tracking_tests.celery_jobs import probe_job

    return dg.execute_job(
        dg.reconstructable(probe_job), instance=instance, run_config=config, raise_on_error=False
    )


def events_of(instance: dg.DagsterInstance, run_id: str, kind: dg.DagsterEventType) -> list:
    return [
        record.dagster_event
        for record in instance.all_logs(run_id, of_type=kind)
        if record.dagster_event is not None
    ]


def worker_of_steps(instance: dg.DagsterInstance, run_id: str) -> list[tuple[str, str]]:
    """(step, celery worker node) of each 'Executing steps ... in celery worker' event."""
    found = []
    for event in events_of(instance, run_id, dg.DagsterEventType.ENGINE_EVENT):
        metadata = event.event_specific_data.metadata if event.event_specific_data else {}
        node = metadata.get("Celery worker")
        if node is not None:
            found.append((event.step_key, node.value))
    return found


def step_pids(instance: dg.DagsterInstance, run_id: str) -> dict[str, int]:
    return {
        event.step_key: event.pid
        for event in events_of(instance, run_id, dg.DagsterEventType.STEP_SUCCESS)
    }


def test_executor_is_chosen_by_environment():
    assert engine.executor(dg.in_process_executor, environ={}) is dg.in_process_executor
    assert engine.executor(environ={"RDW_EXECUTOR": "default"}) is dg.multiprocess_executor
    assert engine.executor(environ={"RDW_EXECUTOR": " Celery "}).name == "celery"
    with pytest.raises(
        engine.EngineConfigError, match="RDW_EXECUTOR must be `celery`, `k8s` or unset"
    ):
        engine.executor(environ={"RDW_EXECUTOR": "kubernetes"})


def test_celery_run_loop_polls_faster_than_once_a_second():
    import dagster_celery.core_execution_loop as run_loop

    engine.celery_executor(environ={})
    assert run_loop.TICK_SECONDS == engine.POLL_SECONDS < 1


def test_worker_config_names_the_broker_variable_not_its_url():
    secret = "pyamqp://rdw:hunter22@rabbitmq.internal:5672//"
    config = engine.worker_config({"RDW_CELERY_BROKER": secret, "RDW_CELERY_QUEUE": "eu.runs"})
    assert config["broker"] == {"env": "RDW_CELERY_BROKER"} and "hunter22" not in str(config)
    assert config["backend"] == "rpc://"
    assert config["config_source"]["task_default_queue"] == "eu.runs"
    assert config["config_source"]["task_acks_late"] is True
    assert engine.worker_config({})["broker"] == engine.DEFAULT_BROKER
    # dagster-celery's own validation accepts the block a worker's -y file holds.
    from dagster._config import validate_config
    from dagster_celery import celery_executor

    checked = validate_config(celery_executor.config_schema.config_type, config)
    assert checked.success, checked.errors
    with pytest.raises(engine.EngineConfigError, match="not a celery broker URL") as err:
        engine.worker_config({"RDW_CELERY_BROKER": "rdw:hunter22@rabbitmq"})
    assert "hunter22" not in str(err.value)
    with pytest.raises(engine.EngineConfigError, match="RDW_CELERY_QUEUE must be a queue name"):
        engine.worker_config({"RDW_CELERY_QUEUE": "eu runs"})


def test_celery_yaml_command_refuses_a_bad_broker_without_quoting_it(monkeypatch, capsys):
    from rdw_tracking import cli

    monkeypatch.setenv("RDW_CELERY_BROKER", "rdw:hunter22@rabbitmq")
    assert cli.main(["celery-yaml"]) == 2
    captured = capsys.readouterr()
    assert "RDW_CELERY_BROKER is not a celery broker URL" in captured.err
    assert "hunter22" not in captured.err + captured.out


def test_steps_are_executed_by_both_workers(workers):
    workers.start("rdw_a", "rdw_b")
    with dg.DagsterInstance.get() as instance:
        started = time.monotonic()
        result = execute(instance, run_config(a=2.0, b=2.0, c=2.0))
        elapsed = time.monotonic() - started
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        pids = step_pids(instance, result.run_id)
        nodes = {node for _, node in worker_of_steps(instance, result.run_id)}
        finished = {
            e.step_key: e.timestamp
            for e in instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
        }
        started_d = [
            e.timestamp
            for e in instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_START)
            if e.step_key == "probe_d"
        ]
    assert set(pids) == {"probe_a", "probe_b", "probe_c", "probe_d"}
    # Every step ran in a worker, none in this process, and both workers took steps.
    assert os.getpid() not in pids.values()
    assert len(set(pids.values())) == 2, pids
    assert nodes == set(workers.node.values())
    # The last step waited for the three before it, whichever worker ran them.
    assert started_d[0] > max(finished[s] for s in ("probe_a", "probe_b", "probe_c"))
    assert elapsed < 60


def test_a_worker_killed_mid_step_has_the_step_run_by_the_other(workers):
    workers.start("rdw_a", "rdw_b")
    victim: dict[str, str] = {}

    def kill_the_worker_running_probe_a() -> None:
        # Another instance object: this thread reads while the test's thread runs.
        with dg.DagsterInstance.get() as reader:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not victim:
                runs = reader.get_run_records(limit=1)
                if runs:
                    run_id = runs[0].dagster_run.run_id
                    started = {
                        e.step_key
                        for e in events_of(reader, run_id, dg.DagsterEventType.STEP_START)
                    }
                    if "probe_a" in started:
                        node = dict(worker_of_steps(reader, run_id))["probe_a"]
                        name = next(n for n, full in workers.node.items() if full == node)
                        time.sleep(1.0)  # well inside its 10 s sleep
                        workers.kill(name)
                        victim["name"] = name
                time.sleep(0.2)

    killer = threading.Thread(target=kill_the_worker_running_probe_a, daemon=True)
    killer.start()
    with dg.DagsterInstance.get() as instance:
        started = time.monotonic()
        result = execute(instance, run_config(a=10.0))
        elapsed = time.monotonic() - started
        killer.join(timeout=5)
        assert victim, "probe_a never started, so no worker was killed"
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        survivor = workers.node[({"rdw_a", "rdw_b"} - {victim["name"]}).pop()]
        runs_of_a = [
            node for step, node in worker_of_steps(instance, result.run_id) if step == "probe_a"
        ]
        starts_of_a = [
            e.pid
            for e in events_of(instance, result.run_id, dg.DagsterEventType.STEP_START)
            if e.step_key == "probe_a"
        ]
        pids = step_pids(instance, result.run_id)
    # probe_a started on the killed worker, was delivered again and finished on the other.
    assert runs_of_a == [workers.node[victim["name"]], survivor], runs_of_a
    assert len(starts_of_a) == 2 and starts_of_a[1] == pids["probe_a"] != starts_of_a[0]
    assert set(pids) == {"probe_a", "probe_b", "probe_c", "probe_d"}
    assert elapsed < 60


# -- issue 28: a worker an operator can stop, and no broker password left on disk ---------


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_killing_the_workers_pid_stops_the_worker(workers):
    """SIGKILL to the one pid a process manager records (not its group): the worker stops
    answering pings, and nothing it started is left running to take steps."""
    workers.start("rdw_stop_a")
    proc = workers.procs["rdw_stop_a"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(proc.pid), "a process of the killed worker is still running"
    answered = {n for reply in _app().control.ping(timeout=2.0) for n in reply}
    assert workers.node["rdw_stop_a"] not in answered


def test_no_file_holds_the_broker_password(celery_setup, monkeypatch):
    """The worker reads RDW_CELERY_BROKER from its environment: nothing under
    DAGSTER_HOME, nor its log, holds the broker URL or its password."""
    broker = "pyamqp://guest:guest@127.0.0.1:5672//"
    celery_setup["env"][engine.BROKER_ENV] = broker
    monkeypatch.setenv(engine.BROKER_ENV, broker)
    started = Workers(celery_setup)
    try:
        started.start("rdw_private_a")
        home = Path(os.environ["DAGSTER_HOME"])
        assert not (home / "dagster_celery").exists()
        for path in [*home.rglob("*"), celery_setup["logs"] / "worker_rdw_private_a.log"]:
            if path.is_file():
                assert b"guest:guest" not in path.read_bytes(), path
    finally:
        started.stop_all()


def run_text(instance: dg.DagsterInstance, run_id: str) -> str:
    """Every event message of a run, with each error's message and causes."""
    parts = []
    for record in instance.all_logs(run_id):
        parts.append(record.message or "")
        event = record.dagster_event
        data = getattr(event, "event_specific_data", None) if event else None
        error = getattr(data, "error", None)
        while error is not None:
            parts.append(error.message)
            error = error.cause
    return "\n".join(parts)


def test_a_run_with_no_worker_fails_naming_queue_and_broker(celery_setup, monkeypatch):
    """No worker consumes the queue (all stopped, or all on another broker): the run
    fails after RDW_CELERY_WORKER_WAIT_S, naming the queue and the broker's host, never
    its password, rather than staying STARTED for ever."""
    monkeypatch.setenv(engine.WORKER_WAIT_ENV, "4")
    started = time.monotonic()
    with dg.DagsterInstance.get() as instance:
        result = execute(instance, run_config())
        took = time.monotonic() - started
        assert not result.success
        assert instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.FAILURE
        text = run_text(instance, result.run_id)
    assert took < 40, took
    assert f"no celery worker consumed queue '{QUEUE}' on broker 127.0.0.1:5672 for 4 s" in text
    assert "guest:guest" not in text


def test_steps_of_a_run_that_is_over_never_run_when_workers_come_back(
    celery_setup, workers, monkeypatch
):
    """Steps queued while no worker was up: the run ends (here for want of a worker; a
    cancel is the same), the revoke broadcast reaches nobody, then a worker comes back
    and takes the queued tasks: it runs none of them, and says so in the run's events."""
    monkeypatch.setenv(engine.WORKER_WAIT_ENV, "4")
    # A worker declares the session's queue (the last test deleted it, and this process's
    # broker connection, having declared it once, would not again), then goes.
    workers.start("rdw_early_a")
    workers.stop_all()
    workers.procs.pop("rdw_early_a"), workers.node.pop("rdw_early_a")
    with dg.DagsterInstance.get() as instance:
        result = execute(instance, run_config())
        assert instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.FAILURE
        workers.start("rdw_late_a")
        deadline = time.monotonic() + 60
        skipped = []
        while len(skipped) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
            skipped = [
                e.step_key or e.message
                for e in events_of(instance, result.run_id, dg.DagsterEventType.ENGINE_EVENT)
                if "did not run step(s)" in (e.message or "")
            ]
        starts = events_of(instance, result.run_id, dg.DagsterEventType.STEP_START)
    assert len(skipped) == 3, skipped
    assert starts == []
