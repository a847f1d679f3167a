"""`TargetDatabase`: the reporting database that rdw_tracking looks after.

Every connection is UTC, names itself (`application_name`) and carries a statement and
a lock timeout, so nothing the pipeline runs can hold a production table for long.
Identifiers reach SQL only through `psycopg.sql.Identifier`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import urlsplit

import dagster as dg
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from pydantic import ConfigDict, Field, field_validator

from rdw_tracking.errors import NotRetryable, StatementTimeout, TargetDatabaseError

URL_ENV = "RDW_DATABASE_URL"
APPLICATION_NAME = "rdw_tracking"
# A worker whose host dies inside a transaction leaves its row locks held: the server
# ends such a session after this long idle in its transaction, and both ends probe a
# silent TCP peer after 30 s idle, every 10 s, 3 times (not the kernel's ~2 h).
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
# Data sent and not acknowledged for this long ends the connection (libpq and server
# side): without it a dropped route kept a write job waiting for the kernel's
# retransmission limit (214-940 s measured), keepalives being for idle connections only.
TCP_USER_TIMEOUT_MS = 60_000
# A peer can also go silent while acknowledging everything (a proxy or NAT that stopped
# forwarding): no TCP setting sees that, and the server never gets the statement, so its
# statement_timeout never fires. So every wait for an answer is bounded on the client
# too: a statement's own timeout plus this margin; past it the connection is closed.
DEADLINE_MARGIN_S = 30.0
# Statements of the write path that are short by design (a batch, a write-lock check)
# run under this statement_timeout at most: with the margin, a write job fails within
# about 60 s of its peer going silent.
SHORT_STATEMENT_TIMEOUT_MS = 30_000
# RFC 3986 allows none of these unencoded in a URI's user or password; libpq then reads
# the rest of the password as host, port or database and quotes it back in errors.
_RESERVED_IN_USERINFO = "/?#@"
_URI_PREFIX = re.compile(r"^\s*postgres(?:ql)?://", re.IGNORECASE)
_MAX_IDENTIFIER = 63
# libpq's words for a login the server refused, as opposed to a server not there.
_REFUSED_LOGIN = re.compile(
    r"authentication failed|no password supplied|no pg_hba\.conf entry|"
    r'(database|role) "[^"]*" does not exist',
    re.IGNORECASE,
)


# The write lock of the job running in this context (writes.WriteLock), if any: every
# connection opened under it first checks the lock is still held.
WRITE_GUARD: ContextVar = ContextVar("rdw_tracking_write_lock", default=None)


class ServerSilent(psycopg.OperationalError):
    """No answer from the server within a connection's deadline: the connection was
    closed, as one whose peer is gone (`conn.broken`)."""


def _within(gen, seconds: float, conn: psycopg.Connection):
    """`gen` (one of psycopg's waits on a connection), raising `ServerSilent` once it has
    run `seconds`. psycopg's wait loop wakes it every tick of its interval even when the
    socket stays quiet, so the deadline is checked a few times a second."""
    deadline = time.monotonic() + seconds
    try:
        state = next(gen)
        while True:
            ready = yield state
            if time.monotonic() > deadline:
                conn.pgconn.finish()  # its state is unknown: never reuse it
                raise ServerSilent(
                    f"no answer from the server within {seconds:.0f} s, so the connection "
                    "was closed (a network fault or a proxy that stopped forwarding?)"
                )
            state = gen.send(ready)
    except StopIteration as done:
        return done.value


class BoundedConnection(psycopg.Connection):
    """A connection whose every wait for the server (a statement, BEGIN, COMMIT) is
    bounded by `deadline_s` (None: unbounded): past it the connection is closed and
    the statement raises `ServerSilent`, a lost connection."""

    deadline_s: float | None = None

    def wait(self, gen, *args, **kwargs):  # type: ignore[override]
        if self.deadline_s is not None:
            gen = _within(gen, self.deadline_s, self)
        return super().wait(gen, *args, **kwargs)

    def bound(self, statement_timeout_ms: int) -> None:
        """Bound each wait by `statement_timeout_ms` (0: none) plus the margin."""
        self.deadline_s = (
            statement_timeout_ms / 1000 + DEADLINE_MARGIN_S if statement_timeout_ms else None
        )


def short_statements(conn: psycopg.Connection, statement_timeout_ms: int) -> int:
    """Put `conn` (autocommit, a write path's own session) under the short statement
    timeout, at most `statement_timeout_ms`, its waits bounded to match; the timeout."""
    short = min(SHORT_STATEMENT_TIMEOUT_MS, statement_timeout_ms or SHORT_STATEMENT_TIMEOUT_MS)
    conn.execute("SELECT set_config('statement_timeout', %s, false)", [f"{short}ms"])
    if isinstance(conn, BoundedConnection):
        conn.bound(short)
    return short


@contextmanager
def long_statements(conn: psycopg.Connection, statement_timeout_ms: int) -> Iterator[None]:
    """Lift a `short_statements` session to `statement_timeout_ms` (target_db's) for a
    scan of the whole table, its waits bounded to match; short again afterwards."""
    conn.execute("SELECT set_config('statement_timeout', %s, false)", [f"{statement_timeout_ms}ms"])
    if isinstance(conn, BoundedConnection):
        conn.bound(statement_timeout_ms)
    try:
        yield
    finally:
        if not conn.closed:
            short_statements(conn, statement_timeout_ms)


def current_step() -> str | None:
    """Name of the Dagster op/asset/check running this code, if any."""
    try:
        return dg.OpExecutionContext.get().op.name
    except Exception:
        return None


@dataclass(frozen=True)
class Endpoint:
    """Where a URL points, without its secret: safe to log."""

    host: str
    port: str
    database: str
    user: str

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.database}"


def raw_userinfo(url: str) -> str | None:
    """The `user:password` of a libpq URI as written, up to its last `@`, before any
    parsing (which a stray `/` or `@` in the password would lead astray)."""
    match = _URI_PREFIX.match(url or "")
    if not match:
        return None
    rest = url[match.end() :]
    return rest[: rest.rfind("@")] if "@" in rest else None


def ambiguous_userinfo(url: str) -> str | None:
    """Why `url` must be refused without quoting it, or None: an unencoded `/ ? # @`
    in its user or password."""
    userinfo = raw_userinfo(url)
    if userinfo and any(ch in userinfo for ch in _RESERVED_IN_USERINFO):
        return (
            "the database URL has an unencoded '/', '?', '#' or '@' in its user or "
            "password, so libpq would read part of the password as host, port or database; "
            "percent-encode them (%2F, %3F, %23, %40), or leave the password out of the URL "
            "and put it in ~/.pgpass or PGPASSWORD"
        )
    return None


def endpoint(url: str) -> Endpoint:
    problem = ambiguous_userinfo(url)
    if problem:
        raise NotRetryable(f"{problem} (check {URL_ENV} or target_db.url)")
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError as err:
        raise NotRetryable(
            f"the database URL is not a valid libpq URI ({redact(str(err), url)}); "
            f"set {URL_ENV} or target_db.url to postgresql://user@host:port/database"
        ) from None
    return Endpoint(
        host=str(info.get("host") or os.environ.get("PGHOST") or "localhost"),
        port=str(info.get("port") or os.environ.get("PGPORT") or "5432"),
        database=str(info.get("dbname") or info.get("user") or "postgres"),
        user=str(info.get("user") or os.environ.get("PGUSER") or "postgres"),
    )


def redact(text: str, url: str | None) -> str:
    """`text` with any password of `url` (and any password-looking URL part) masked."""
    if url:
        secrets = set()
        userinfo = raw_userinfo(url)
        if userinfo and ":" in userinfo:
            # The password as written, and each piece libpq may have taken for a host,
            # port or database when it holds a stray `/` or `@`.
            password = userinfo.split(":", 1)[1]
            secrets.add(password)
            secrets.update(p for p in re.split(r"[/?#@:]", password) if len(p) >= 2)
        try:
            secrets.add(urlsplit(url).password or "")
        except ValueError:
            pass
        try:
            secrets.add(str(conninfo_to_dict(url).get("password") or ""))
        except psycopg.Error:
            pass
        for secret in sorted(filter(None, secrets), key=len, reverse=True):
            text = text.replace(secret, "***")
    text = re.sub(r"(postgres(?:ql)?(?:\+\w+)?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", text, flags=re.IGNORECASE)


def server_of(url: str) -> tuple[str, str, str, str]:
    """(host, hostaddr, port, service) a URL sends libpq to, with libpq's env defaults."""
    info = conninfo_to_dict(url)
    return (
        str(info.get("host") or os.environ.get("PGHOST") or ""),
        str(info.get("hostaddr") or os.environ.get("PGHOSTADDR") or ""),
        str(info.get("port") or os.environ.get("PGPORT") or "5432"),
        str(info.get("service") or os.environ.get("PGSERVICE") or ""),
    )


def run_config_url_problem(url: str) -> str | None:
    """Why a `url` given in run config may not be used, or None; the reason quotes
    nothing of the URL.

    Run config is written by whoever launches a run and stored with it, and libpq hands
    the worker's `PGPASSWORD` (or a `~/.pgpass` line that matches) to whatever server a
    URL names. So a URL from run config carries no password and names the server of
    `RDW_DATABASE_URL` (host, hostaddr, port and service): it may pick another database
    or user there, never another server.
    """
    problem = ambiguous_userinfo(url)
    if problem:
        return problem
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "url is not a valid libpq URI; write it as postgresql://user@host:port/database"
    if info.get("password"):
        return (
            "url carries a password, and run config is stored with the run for anyone who "
            f"can see it: leave url unset and put the URL in env {URL_ENV}, or the password "
            "in ~/.pgpass or PGPASSWORD"
        )
    env_url = os.environ.get(URL_ENV)
    try:
        same_server = bool(env_url) and server_of(url) == server_of(env_url)
    except psycopg.ProgrammingError:
        same_server = False
    if not same_server:
        return (
            f"url names another server than env {URL_ENV} (or {URL_ENV} is unset), and "
            "libpq would send the worker's PGPASSWORD or ~/.pgpass password there; in run "
            "config, url may only pick another database or user on the same host and port. "
            f"To look after another server, set {URL_ENV} where the code runs"
        )
    return None


def _refuse_without_embedded() -> None:
    """No URL was given: without the `embedded` extra (a production install) that is one
    error naming the variable, never an embedded server started in a run or sensor pod."""
    from rdw_tracking import embedded

    if not embedded.installed():
        raise NotRetryable(
            f"{URL_ENV} is not set: set it to the libpq URI of the database to look after, "
            "e.g. postgresql://rdw_reader@db.example.internal:5432/reporting (or set "
            "target_db.url in code). Only the demo, the tests and the UI run without it, on "
            f"an embedded PostgreSQL that this install lacks: {embedded.EXTRA} for them"
        )


def _url_from_run_config(context: dg.InitResourceContext, url: str) -> bool:
    """Whether `url` came from the run's config (launchpad, sensor, API), not from code."""
    try:
        run = context.run
    except Exception:
        return False
    resources = ((run.run_config if run else None) or {}).get("resources") or {}
    return any(
        isinstance(entry, dict) and (entry.get("config") or {}).get("url") == url
        for entry in resources.values()
    )


def _check_identifier(value: str, field: str) -> str:
    """A name as PostgreSQL stores it. Any character is allowed (it reaches SQL quoted),
    but not ones that only a typo or a paste puts there."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be a non-empty name")
    if len(value.encode()) > _MAX_IDENTIFIER:
        raise ValueError(f"{field} {value!r} is longer than PostgreSQL's 63-byte names")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"{field} {value!r} contains a control character")
    if value != value.strip():
        raise ValueError(f"{field} {value!r} starts or ends with a space; remove it")
    return value


class TargetDatabase(dg.ConfigurableResource):
    """The PostgreSQL database holding `report_data_weeks` and `workflow_executions`."""

    # A refused value may be a URL with a password in it: never quote it in errors.
    model_config = ConfigDict(hide_input_in_errors=True)

    url: str | None = Field(
        default=None,
        description=(
            f"libpq URI of the database; default: env {URL_ENV} (required unless the "
            "`embedded` extra is installed: demo, tests, UI). "
            f"Given in run config, it must name the server of {URL_ENV} (same host and port) "
            "and carry no password: it may pick another database or user there, never send "
            "the worker's credentials elsewhere."
        ),
    )
    fleet_name: str | None = Field(
        default=None,
        description="The database's name in the fleet file (set by the fleet, named in errors).",
    )
    schema_name: str = Field(default="public", description="Schema holding the three tables.")
    weeks_table: str = Field(default="report_data_weeks")
    executions_table: str = Field(default="workflow_executions")
    collections_table: str = Field(default="report_data_collections")
    statement_timeout_ms: int = Field(
        default=300_000, description="Longest any one statement may run (ms), 0 = no limit."
    )
    lock_timeout_ms: int = Field(
        default=5_000, description="Longest any statement waits for a lock (ms)."
    )
    idle_in_transaction_timeout_ms: int = Field(
        default=IDLE_IN_TRANSACTION_TIMEOUT_MS,
        description=(
            "The server ends a session idle this long inside a transaction (ms), so a "
            "worker that died mid-batch does not keep its row locks: 100 ms to 1 day."
        ),
    )

    @field_validator("schema_name", "weeks_table", "executions_table", "collections_table")
    @classmethod
    def _names(cls, value: str, info) -> str:
        return _check_identifier(value, info.field_name)

    @field_validator("statement_timeout_ms", "lock_timeout_ms")
    @classmethod
    def _timeouts(cls, value: int, info) -> int:
        if not 0 <= value <= 86_400_000:
            raise ValueError(f"{info.field_name} must be between 0 and 86400000 ms, got {value}")
        return value

    @field_validator("idle_in_transaction_timeout_ms")
    @classmethod
    def _idle_timeout(cls, value: int) -> int:
        if not 100 <= value <= 86_400_000:
            raise ValueError(
                f"idle_in_transaction_timeout_ms must be between 100 and 86400000 ms, got {value}"
            )
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value == URL_ENV:
            # dg.EnvVar(URL_ENV) in code reaches validators as its name; Dagster validates
            # again with the variable's value when the resource is built for a run.
            return value
        if value is not None and not value.strip():
            raise ValueError("url must not be empty; leave it unset to use env " + URL_ENV)
        if value is not None:
            problem = ambiguous_userinfo(value)
            if problem:
                raise ValueError(problem)
            try:
                port = str(conninfo_to_dict(value).get("port") or "")
            except psycopg.ProgrammingError as err:
                raise ValueError(
                    f"url is not a valid libpq URI ({redact(str(err).strip(), value)}); write it as "
                    "postgresql://user@host:port/database"
                ) from None
            # libpq only finds a bad port when it connects; say so now, not after retries.
            if port and not all(p.strip().isdigit() for p in port.split(",")):
                raise ValueError(
                    "url has a port that is not a number; write it as "
                    "postgresql://user@host:5432/database"
                )
        return value

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Refuse a run-config URL that could send credentials elsewhere, in every run:
        launched as a job (checked at launch too) or from the asset graph (not); and a
        missing URL on an install without the embedded server, before any query."""
        if not (self.url or os.environ.get(URL_ENV)):
            _refuse_without_embedded()
        if self.url is not None and _url_from_run_config(context, self.url):
            problem = run_config_url_problem(self.url)
            if problem:
                raise NotRetryable(f"run config resources.target_db.config: {problem}")

    # -- where --------------------------------------------------------------------

    def resolved_url(self) -> str:
        """`url`, else env `RDW_DATABASE_URL`, else (with the `embedded` extra installed:
        demo, tests, UI) the embedded server's demo database. A production install has
        no such extra, so there a missing URL is one error, not a server started in the
        run's or sensor's own pod."""
        url = self.url or os.environ.get(URL_ENV)
        if url:
            return url
        _refuse_without_embedded()
        from rdw_tracking import embedded

        return embedded.database_url()

    def endpoint(self) -> Endpoint:
        return endpoint(self.resolved_url())

    def describe(self) -> str:
        where = f"{self.endpoint()} schema {self.schema_name}"
        return f"fleet database {self.fleet_name} ({where})" if self.fleet_name else where

    # -- names --------------------------------------------------------------------

    def table(self, name: str) -> sql.Identifier:
        """Schema-qualified identifier of one of the configured tables."""
        return sql.Identifier(self.schema_name, name)

    @property
    def weeks(self) -> sql.Identifier:
        return self.table(self.weeks_table)

    @property
    def executions(self) -> sql.Identifier:
        return self.table(self.executions_table)

    @property
    def collections(self) -> sql.Identifier:
        return self.table(self.collections_table)

    def qualified(self, name: str, column: str | None = None) -> str:
        """Human-readable `schema.table[.column]` for messages."""
        parts = [self.schema_name, name] + ([column] if column else [])
        return ".".join(parts)

    # -- connections --------------------------------------------------------------

    @contextmanager
    def connect(
        self, autocommit: bool = False, check_schema: bool = True
    ) -> Iterator[psycopg.Connection]:
        """A connection with UTC, application_name, both timeouts, a limit on time idle
        in a transaction and TCP keepalives (client and server side) set.

        Connection failures become one `TargetDatabaseError` naming host, database and
        schema, never the password.
        """
        conn = self._open(autocommit)
        try:
            if check_schema:
                self._check_schema(conn, autocommit)
            guard = WRITE_GUARD.get()
            if guard is not None:
                guard.check()  # a write job's lock session may have been terminated
            yield conn
        except psycopg.errors.QueryCanceled as err:
            if "statement timeout" not in str(err):
                raise
            raise self._timed_out() from None
        finally:
            conn.close()

    def _open(self, autocommit: bool) -> psycopg.Connection:
        url = self.resolved_url()
        # Refuses a URL libpq would misread (an unencoded '@' in the password) before
        # libpq sees it, and quotes it in no traceback.
        where = self.describe()
        options = (
            f"-c TimeZone=UTC -c statement_timeout={self.statement_timeout_ms} "
            f"-c lock_timeout={self.lock_timeout_ms} "
            f"-c idle_in_transaction_session_timeout={self.idle_in_transaction_timeout_ms} "
            f"-c tcp_keepalives_idle={KEEPALIVES['keepalives_idle']} "
            f"-c tcp_keepalives_interval={KEEPALIVES['keepalives_interval']} "
            f"-c tcp_keepalives_count={KEEPALIVES['keepalives_count']} "
            f"-c tcp_user_timeout={TCP_USER_TIMEOUT_MS}"
        )
        try:
            conn = BoundedConnection.connect(
                url,
                autocommit=autocommit,
                application_name=APPLICATION_NAME,
                options=options,
                connect_timeout=10,
                tcp_user_timeout=TCP_USER_TIMEOUT_MS,
                **KEEPALIVES,
            )
        except psycopg.OperationalError as err:
            raise self._cannot_connect(err, url, where) from None
        conn.bound(self.statement_timeout_ms)
        return conn

    def _cannot_connect(
        self, err: psycopg.OperationalError, url: str, where: str
    ) -> TargetDatabaseError:
        reason = redact(str(err).strip().splitlines()[-1] if str(err).strip() else "", url)
        # A refused login stays refused: fail once rather than after every retry
        # (a down or restarting server is worth retrying, and still is).
        error = NotRetryable if _REFUSED_LOGIN.search(str(err)) else TargetDatabaseError
        # In a fleet the URL comes from the entry's own env var, not RDW_DATABASE_URL.
        source = (
            f"the env var named by url_env of {self.fleet_name!r} in the fleet file"
            if self.fleet_name
            else f"{URL_ENV} (or target_db.url)"
        )
        return error(
            f"cannot connect to PostgreSQL at {where}: {reason}; "
            f"check {source} and that the server accepts connections"
        )

    def _check_schema(self, conn: psycopg.Connection, autocommit: bool) -> None:
        found = conn.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = %s", [self.schema_name]
        ).fetchone()
        if not autocommit:
            conn.rollback()
        if not found:
            where = self.endpoint()
            raise NotRetryable(
                f"schema {self.schema_name!r} does not exist in database "
                f"{where.database} at {where.host}:{where.port}; "
                "set target_db.schema_name to the schema holding report_data_weeks"
            )

    def _timed_out(self) -> StatementTimeout:
        step = current_step()
        return StatementTimeout(
            f"{step + ': ' if step else ''}a query on {self.describe()} was cancelled by "
            f"statement_timeout after {self.statement_timeout_ms} ms; raise "
            "target_db.statement_timeout_ms (run config "
            "resources.target_db.config.statement_timeout_ms, 0 = no limit) "
            "or run it when the table is less busy"
        )

    @contextmanager
    def cursor(self) -> Iterator[psycopg.Cursor]:
        """A cursor in a read-only-by-intent transaction that is rolled back at the end."""
        with self.connect() as conn:
            try:
                with conn.cursor() as cur:
                    yield cur
            finally:
                conn.rollback()

    def fetch_all(self, query: sql.Composable | str, params=None) -> list[tuple]:
        with self.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall()

    def fetch_one(self, query: sql.Composable | str, params=None) -> tuple | None:
        with self.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchone()
