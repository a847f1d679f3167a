"""The `rdw-tracking` command: the embedded database, the demo and the UI."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path

from rdw_tracking import devserver, embedded

warnings.filterwarnings("ignore", module="platformdirs")


def dagster_home() -> Path:
    """DAGSTER_HOME for the embedded setup: the project's dagster.yaml, under `.rdw/`."""
    home = embedded.state_dir() / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(embedded.PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def use_embedded_environment() -> bool:
    """Point this process (and its children) at the embedded server; True when it started it.

    A `RDW_DATABASE_URL` or `DAGSTER_HOME` already set is respected.
    """
    started = embedded.start()
    os.environ.setdefault("RDW_DATABASE_URL", embedded.database_url())
    if "DAGSTER_HOME" not in os.environ:
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
        return walkthrough.run(rows=args.rows)
    finally:
        if started and not args.keep_running:
            embedded.stop()


def cmd_ui(args: argparse.Namespace) -> int:
    from rdw_tracking import walkthrough

    started = use_embedded_environment()
    walkthrough.ensure_demo_data(rows=args.rows)
    print(f"Dagster UI on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    proc = devserver.start(embedded.PROJECT_ROOT / "workspace.yaml", args.port, host=args.host)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        devserver.stop(proc)
        if started:
            embedded.stop()


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
    demo.set_defaults(func=cmd_demo)

    ui = sub.add_parser("ui", help="dagster dev (webserver + daemon) on the embedded database")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.add_argument("--rows", type=int, default=20_000, help="demo rows if none exist yet")
    ui.set_defaults(func=cmd_ui)

    args = parser.parse_args(argv)
    if getattr(args, "rows", 1) < 1:
        parser.error("--rows must be at least 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
