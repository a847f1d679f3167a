"""Validate a fleet of databases: in process vs the celery executor with 1 and 2 workers.

Builds `--databases` copies of a demo database on one server (the embedded one unless
`--url`) and a fleet file naming them (each URL in an env var), then runs the fleet's
`verify_execution_tracking` once per database partition, one run after the other,
through a Dagster instance whose runs and events live in PostgreSQL (as celery needs):
first with the job's own in-process executor, then on celery (RabbitMQ at
127.0.0.1:5672) with one worker, then with two. Each run is launched as the UI launches
a partition: with the partition's tags (`dagster/partition`, `rdw/database`,
`rdw/reads`), and its `target_db` is that database's fleet entry. Workers are started
(and answer a ping) before the clock starts; their start-up is reported apart.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

TITLE = "Fleet validation: in process vs celery (1 and 2 workers)"
NOTES = (
    "Target: the celery path adds under 2 s per run (`overhead_per_run_s` = its "
    "`per_run_s` minus in process's). One run of the fleet's verify_execution_tracking "
    "per database partition (definitions loaded from the fleet file, each run's "
    "target_db its partition's entry), runs one after another; steps of a run spread "
    "over the workers (concurrency 1 each). `worker_start_s`: from starting the workers "
    "to both answering a ping, not in the wall time. `load_avg`: the machine's 1-minute load before the row "
    "(shared machine). With dagster-celery's own 1 s poll of step results (before "
    "engine.POLL_SECONDS = 0.1) the overhead was 4.2-5.4 s per run (2 databases x 5,000 "
    "rows, same machine)."
)
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def add_arguments(parser) -> None:
    parser.add_argument("--databases", type=int, default=6, help="databases in the fleet")
    parser.add_argument("--rows", type=int, default=20_000, help="report_data_weeks rows each")


def run(args) -> list[dict]:
    import yaml

    from rdw_tracking import demo, deploy
    from rdw_tracking.devserver import sqlalchemy_url

    admin = with_database(args.url, "postgres")
    template = f"rdw_bench_fleet_template_{os.getpid()}"
    names = [f"rdw_bench_fleet_{i}" for i in range(args.databases)]
    storage = f"rdw_bench_fleet_dagster_{os.getpid()}"
    demo.build(create_database(admin, template), demo.DemoShape(rows=args.rows))
    urls = [create_database(admin, name, template=template) for name in names]
    home = Path(tempfile.mkdtemp(prefix="rdw_bench_fleet_home_"))
    queue = f"rdw_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    (home / "dagster.yaml").write_text(deploy.DAGSTER_YAML.read_text())
    fleet_file = home / "fleet.yaml"
    partitions = [f"db_{i}" for i in range(args.databases)]
    fleet_file.write_text(
        yaml.safe_dump(
            {"databases": [{"name": p, "url_env": url_env(p)} for p in partitions]},
            sort_keys=False,
        )
    )
    os.environ.update(
        DAGSTER_HOME=str(home),
        RDW_DAGSTER_STORAGE_URL=sqlalchemy_url(create_database(admin, storage)),
        RDW_FLEET_FILE=str(fleet_file),
        RDW_CELERY_QUEUE=queue,
        **{url_env(p): url for p, url in zip(partitions, urls, strict=True)},
    )
    os.environ.pop("RDW_DATABASE_URL", None)  # a fleet reads only its entries' variables
    rows: list[dict] = []
    try:
        rows.append(measure("in process", partitions, workers=0, args=args))
        for count in (1, 2):
            rows.append(measure("celery", partitions, workers=count, args=args))
    finally:
        for name in [template, *names, storage]:
            drop_database(admin, name)
        _delete_queue(queue)
        shutil.rmtree(home, ignore_errors=True)
    global NOTES
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    NOTES = f"{NOTES} `uptime` after the runs: {uptime}."
    base = rows[0]["per_run_s"]
    for row in rows:
        row["overhead_per_run_s"] = round(row["per_run_s"] - base, 3)
    return rows


def url_env(partition: str) -> str:
    return f"RDW_BENCH_FLEET_URL_{partition.upper()}"


def with_database(url: str, database: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(url)
    params["dbname"] = database
    return make_conninfo("", **params)


def create_database(admin: str, name: str, template: str | None = None) -> str:
    import psycopg
    from psycopg import sql

    drop_database(admin, name)
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(statement)
    return with_database(admin, name)


def drop_database(admin: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def measure(engine_name: str, partitions: list[str], workers: int, args) -> dict:
    load = os.getloadavg()[0]
    if engine_name == "celery":
        os.environ["RDW_EXECUTOR"] = "celery"
    else:
        os.environ.pop("RDW_EXECUTOR", None)
    procs, started = [], time.monotonic()
    worker_start_s = 0.0
    try:
        if workers:
            procs = start_workers(workers)
            worker_start_s = time.monotonic() - started
        # A fresh process per engine: Dagster keeps a job once loaded, executor and all.
        pool = multiprocessing.get_context("spawn").Pool(1)
        wall, failures, worker_steps = pool.apply(orchestrate, (partitions,))
        pool.close()
        pool.join()
        if failures:
            raise RuntimeError(f"{failures} of {len(partitions)} runs on {engine_name} failed")
    finally:
        stop_workers(procs)
    return {
        "engine": engine_name,
        "workers": workers,
        "databases": len(partitions),
        "rows_each": args.rows,
        "failed_runs": failures,
        "steps_on_workers": worker_steps,
        "wall_s": round(wall, 3),
        "per_run_s": round(wall / len(partitions), 3),
        "worker_start_s": round(worker_start_s, 3),
        "load_avg": round(load, 2),
    }


def orchestrate(partitions: list[str]) -> tuple[float, int, int]:
    """(wall seconds, failed runs, steps executed by celery workers) of one run per
    database partition, one after the other, in this process."""
    import dagster as dg

    sys.path.insert(0, str(BENCH_DIR))
    from fleet_job import verify_on_engine

    recon = dg.reconstructable(verify_on_engine)
    job = verify_on_engine()
    quiet = {"console": {"config": {"log_level": "WARNING"}}}
    failures, run_ids = 0, []
    with dg.DagsterInstance.get() as instance:
        started = time.monotonic()
        for partition in partitions:
            result = dg.execute_job(
                recon,
                instance=instance,
                run_config={"loggers": quiet},
                # What launching the partition from the UI gives the run.
                tags=job.get_tags_for_partition_key(partition, None),
                raise_on_error=False,
            )
            failures += not result.success
            run_ids.append(result.run_id)
        wall = time.monotonic() - started
        worker_steps = sum(
            1
            for run_id in run_ids
            for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
            if "in celery worker" in (record.dagster_event.message or "")
        )
    return wall, failures, worker_steps


def start_workers(count: int) -> list[subprocess.Popen]:
    import yaml

    from rdw_tracking import engine

    config = Path(os.environ["DAGSTER_HOME"]) / "celery.yaml"
    config.write_text(yaml.safe_dump({"execution": {"config": engine.worker_config()}}))
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # The workers load the job from fleet_job.py, beside this file.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    names = [f"rdw_bench_{i}_{os.getpid()}" for i in range(count)]
    procs = [
        subprocess.Popen(
            engine.worker_command(env["RDW_CELERY_QUEUE"], name),
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for name in names
    ]
    from celery import Celery

    app = Celery("rdw_bench_control", broker=engine.broker_url())
    wanted = {f"{name}@{socket.gethostname()}" for name in names}
    deadline = time.monotonic() + 60
    while not wanted <= {n for reply in app.control.ping(timeout=1.0) for n in reply}:
        if time.monotonic() > deadline:
            stop_workers(procs)
            raise TimeoutError("celery workers did not answer a ping within 60 s")
    return procs


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _delete_queue(queue: str) -> None:
    from kombu import Connection

    from rdw_tracking import engine

    with Connection(engine.broker_url(), connect_timeout=5) as conn:
        conn.default_channel.queue_delete(queue)
