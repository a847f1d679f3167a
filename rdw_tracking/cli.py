"""The `rdw-tracking` command: the embedded database, the demo and the UI."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path

from rdw_tracking import demo, deploy, devserver, embedded

warnings.filterwarnings("ignore", module="platformdirs")


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
    """
    started = embedded.start()
    demo_url = demo_database_url()
    ignored = [name for name in _DEPLOYMENT_ENV if os.environ.get(name) and name != "DAGSTER_HOME"]
    if URL_ENV in ignored and os.environ[URL_ENV] == demo_url:
        ignored.remove(URL_ENV)
    if ignored:
        print(
            f"ignoring {', '.join(ignored)}: the demo and the UI use only "
            f"{'$' + DEMO_URL_ENV if os.environ.get(DEMO_URL_ENV) else 'the embedded server'}",
            file=sys.stderr,
        )
    os.environ.pop("RDW_FLEET_FILE", None)
    os.environ[URL_ENV] = demo_url
    os.environ["DAGSTER_HOME"] = str(dagster_home())
    os.environ["RDW_DAGSTER_STORAGE_URL"] = embedded.dagster_storage_url()
    return started


def cmd_db(args: argparse.Namespace) -> int:
    if args.action == "start":
        started = embedded.start()
        print(("started" if started else "already running") + f": {embedded.server_url()}")
    elif args.action == "stop":
        print("stopped" if embedded.stop() else "not running")
    elif args.action == "url":
        print(embedded.database_url(args.database))
    elif args.action == "status":
        print("running" if embedded.is_running() else "stopped")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rdw_tracking import walkthrough

    started = use_embedded_environment()
    try:
        if args.fleet:
            from rdw_tracking import fleet_walkthrough

            return fleet_walkthrough.run(args.fleet, rows=args.rows)
        return walkthrough.run(rows=args.rows)
    except demo.NotDemoTables as err:
        print(f"rdw-tracking demo: {err}", file=sys.stderr)
        return 2
    finally:
        if started and not args.keep_running:
            embedded.stop()


def cmd_ui(args: argparse.Namespace) -> int:
    from rdw_tracking import walkthrough

    started = use_embedded_environment()
    try:
        if args.fleet:
            from rdw_tracking import fleet_walkthrough

            # The databases of `demo --fleet`, kept if there; the UI's processes
            # inherit RDW_FLEET_FILE and the URL variables.
            fleet_walkthrough.prepare(args.fleet, rows=args.rows, rebuild=False)
        else:
            walkthrough.ensure_demo_data(rows=args.rows)
    except demo.NotDemoTables as err:
        print(f"rdw-tracking ui: {err}", file=sys.stderr)
        if started:
            embedded.stop()
        return 2
    print(f"Dagster UI on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    proc = devserver.start(deploy.WORKSPACE_YAML, args.port, host=args.host)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        devserver.stop(proc)
        if started:
            embedded.stop()


def cmd_dagster_yaml(args: argparse.Namespace) -> int:
    sys.stdout.write(deploy.DAGSTER_YAML.read_text())
    return 0


def cmd_celery_yaml(args: argparse.Namespace) -> int:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rdw-tracking", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="the embedded PostgreSQL")
    db.add_argument("action", choices=["start", "stop", "url", "status"])
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

    args = parser.parse_args(argv)
    if getattr(args, "rows", 1) < 1:
        parser.error("--rows must be at least 1")
    if not 0 <= getattr(args, "fleet", 0) <= MAX_FLEET:
        parser.error(f"--fleet must be between 1 and {MAX_FLEET}")
    try:
        return args.func(args)
    except embedded.NotInstalled as err:
        print(f"rdw-tracking {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
