"""Every test gets its own real PostgreSQL database.

The server is the embedded one (its own data folder under `.rdw/test`, started for the
session and stopped after it, fsync off) or the one in RDW_TEST_DATABASE_URL. A template
database holding a small demo dataset is built once per session, and one per layout of
report_data_weeks on first use; each test's database is a `CREATE DATABASE ... TEMPLATE`
copy of one, which takes milliseconds. Where they were measured:
docs/tests-and-benchmarks.md.

One session per server at a time: a session that started the embedded server stops it
when it ends, under any other session still using it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

warnings.filterwarnings("ignore", module="platformdirs")

# `primary_and_standby`: a primary and its streaming standby of a test's own.
pytest_plugins = ["rdw_tracking_tests.standby"]

# Dagster's test instances (sqlite) and the IO manager's files live in temporary folders,
# and sqlite syncs every commit: on a RAM disk that costs nothing (a backfill test of 400
# days: 75 s -> 29 s, docs/tests-and-benchmarks.md). Only when TMPDIR is not set, and the
# RAM disk has room; subprocesses (dg, the wheel's venv) inherit it.
_RAM_DISK = Path("/dev/shm")
if (
    "TMPDIR" not in os.environ
    and _RAM_DISK.is_dir()
    and os.access(_RAM_DISK, os.W_OK)
    and shutil.disk_usage(_RAM_DISK).free > 2**31
):
    os.environ["TMPDIR"] = str(_RAM_DISK)
    tempfile.tempdir = str(_RAM_DISK)

TEST_ENV = "RDW_TEST_DATABASE_URL"
TEMPLATE_ROWS = 2_600  # 50 collections x 52 weeks
_counter = itertools.count()


def with_database(url: str, database: str) -> str:
    """`url` pointing at another database on the same server."""
    params = conninfo_to_dict(url)
    params["dbname"] = database
    return make_conninfo("", **params)


def _embedded_admin_url() -> Iterator[str]:
    os.environ["RDW_HOME"] = str(Path(__file__).resolve().parents[1] / ".rdw" / "test")
    from rdw_tracking import embedded

    started = embedded.start()
    url = embedded.server_url("postgres")
    # The suite's own server (.rdw/test, never the demo's): its databases are thrown away,
    # so it skips fsync. Each test drops its database, and with fsync that DROP waits
    # ~0.3 s for the disk (docs/tests-and-benchmarks.md). Settings that change what a
    # test sees (synchronous_commit, WAL positions) stay as they are.
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SHOW fsync").fetchone()[0] != "off":
            conn.execute("ALTER SYSTEM SET fsync = off")
            conn.execute("SELECT pg_reload_conf()")
    try:
        yield url
    finally:
        if started:
            embedded.stop()


@pytest.fixture(scope="session")
def admin_url() -> Iterator[str]:
    """A superuser connection to the server the suite runs against."""
    if os.environ.get(TEST_ENV):
        yield os.environ[TEST_ENV]
    else:
        yield from _embedded_admin_url()


def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(statement)
    return with_database(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def template_name(admin_url: str) -> Iterator[str]:
    from rdw_tracking import demo

    name = f"rdw_test_template_{os.getpid()}"
    url = create_database(admin_url, name)
    demo.build(url, demo.DemoShape(rows=TEMPLATE_ROWS, orphan_every=100))
    try:
        yield name
    finally:
        drop_database(admin_url, name)


@pytest.fixture(scope="session")
def layout_templates(admin_url: str, template_name: str) -> Iterator[Callable[[str], str]]:
    """template(layout) -> a template database holding the demo data with
    report_data_weeks rebuilt in `layout` (built on first use, once per session)."""
    from rdw_tracking.demo_layouts import relayout

    made = {"ordinary": template_name}

    def template(layout: str) -> str:
        if layout not in made:
            name = f"{template_name}_{layout}"
            relayout(create_database(admin_url, name, template=template_name), layout)
            made[layout] = name
        return made[layout]

    try:
        yield template
    finally:
        for name in made.values():
            if name != template_name:
                drop_database(admin_url, name)


@pytest.fixture
def database_url(admin_url: str, layout_templates, monkeypatch, request) -> Iterator[str]:
    """A fresh database holding the demo tables and data; RDW_DATABASE_URL points at it.

    In a test parametrized by `layout`, report_data_weeks is already in that layout: a
    copy of that layout's template, rather than the relayout done again per test."""
    layout = request.getfixturevalue("layout") if "layout" in request.fixturenames else "ordinary"
    name = f"rdw_test_{os.getpid()}_{next(_counter)}"
    url = create_database(admin_url, name, template=layout_templates(layout))
    monkeypatch.setenv("RDW_DATABASE_URL", url)
    try:
        yield url
    finally:
        drop_database(admin_url, name)


@pytest.fixture
def empty_database_url(admin_url: str, monkeypatch) -> Iterator[str]:
    """A fresh database with no tables at all; RDW_DATABASE_URL points at it."""
    name = f"rdw_test_{os.getpid()}_{next(_counter)}"
    url = create_database(admin_url, name)
    monkeypatch.setenv("RDW_DATABASE_URL", url)
    try:
        yield url
    finally:
        drop_database(admin_url, name)


@pytest.fixture
def db(database_url: str):
    from rdw_tracking.resources import TargetDatabase

    return TargetDatabase(url=database_url)


@pytest.fixture
def sql_exec():
    """Run SQL on this test's database (RDW_DATABASE_URL, autocommit); returns rows, if any."""

    def run(statement, params=None, url: str | None = None):
        with psycopg.connect(url or os.environ["RDW_DATABASE_URL"], autocommit=True) as conn:
            conn.execute("SET TimeZone = 'UTC'")
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else None

    return run


@pytest.fixture
def run_job():
    """Execute a job of the project's Definitions in process, on an ephemeral instance."""
    import dagster as dg

    from rdw_tracking.definitions import defs

    def run(name: str, run_config: dict | None = None, resources: dict | None = None, **kwargs):
        job = defs.resolve_job_def(name)
        return job.execute_in_process(
            run_config=run_config or {},
            instance=kwargs.pop("instance", None) or dg.DagsterInstance.ephemeral(),
            raise_on_error=False,
            resources=resources,
            **kwargs,
        )

    return run


def check_results(result) -> dict:
    """{check name: AssetCheckEvaluation} of a job result."""
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def materialization_metadata(result, asset: str) -> dict:
    """Plain values of the metadata of the last materialization of `asset` in a result."""
    events = [
        e
        for e in result.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key.to_user_string() == asset
    ]
    assert events, f"{asset} was not materialized"
    metadata = events[-1].event_specific_data.materialization.metadata
    return {key: getattr(value, "value", value) for key, value in metadata.items()}


def step_failure_messages(result) -> list[str]:
    return [
        e.event_specific_data.error.message
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE" and e.event_specific_data.error
    ]


PASSWORD_ROLE = "rdw_password_user"
PASSWORD = "s3cret-Pa55word"


@pytest.fixture
def password_url(admin_url: str, database_url: str) -> Iterator[str]:
    """URL of the test database for a role that must authenticate with PASSWORD.

    Prepends one pg_hba line for that role alone (the servers here trust everyone else),
    reloads, and takes it out again afterwards. Skips when the hba file is not writable.
    """
    with psycopg.connect(admin_url, autocommit=True) as conn:
        hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
        if not os.access(hba, os.W_OK):
            pytest.skip(f"{hba} is not writable: cannot require a password for a test role")
        exists = conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", [PASSWORD_ROLE]
        ).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            sql.SQL(verb + " ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(PASSWORD_ROLE), sql.Literal(PASSWORD)
            )
        )
        original = hba.read_text()
        marker = f"# rdw_tracking test {os.getpid()}\n"
        lines = (
            f"{marker}local all {PASSWORD_ROLE} scram-sha-256\n"
            f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
            f"host all {PASSWORD_ROLE} ::1/128 scram-sha-256\n"
        )
        hba.write_text(lines + original)
        conn.execute("SELECT pg_reload_conf()")
    params = conninfo_to_dict(database_url)
    params.update(user=PASSWORD_ROLE, password=PASSWORD)
    try:
        yield make_conninfo("", **params)
    finally:
        current = hba.read_text()
        hba.write_text(current.replace(lines, ""))
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")


def launch_refusal(run_job, name: str, run_config: dict, **kwargs) -> str:
    """Launch `name` with a bad run config; assert it is refused before any run starts.

    Returns the refusal's message (which names the field).
    """
    import dagster as dg

    from rdw_tracking.jobs import RunConfigError

    with pytest.raises((dg.DagsterInvalidConfigError, dg.DagsterUserCodeExecutionError)) as err:
        run_job(name, run_config=run_config, **kwargs)
    cause = getattr(err.value, "user_exception", None) or err.value.__cause__
    if isinstance(err.value, dg.DagsterInvalidConfigError):
        return str(err.value)
    assert isinstance(cause, RunConfigError), repr(err.value)
    return str(cause)


# -- database fingerprints: "nothing changed" as two checksums ---------------------------

_USER_SCHEMA = (
    "n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'"
)
SCHEMA_CHECKSUM = f"""
SELECT md5(coalesce(string_agg(line, E'\\n' ORDER BY line), '')) FROM (
    SELECT 'schema ' || n.nspname || ' ' || pg_get_userbyid(n.nspowner)
           || ' ' || coalesce(n.nspacl::text, '')
    FROM pg_namespace n WHERE {_USER_SCHEMA}
    UNION ALL
    SELECT 'relation ' || n.nspname || '.' || c.relname || ' ' || c.relkind::text || ' '
           || pg_get_userbyid(c.relowner) || ' ' || coalesce(c.relacl::text, '')
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {_USER_SCHEMA}
    UNION ALL
    SELECT 'column ' || n.nspname || '.' || c.relname || '.' || a.attname || ' '
           || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull || ' '
           || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attnum > 0 AND NOT a.attisdropped AND {_USER_SCHEMA}
    UNION ALL
    SELECT 'index ' || pg_get_indexdef(x.indexrelid) || ' ' || x.indisvalid || ' ' || x.indisready
    FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {_USER_SCHEMA}
    UNION ALL
    SELECT 'constraint ' || n.nspname || '.' || c.relname || ' ' || con.conname || ' '
           || pg_get_constraintdef(con.oid) || ' ' || con.convalidated
    FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {_USER_SCHEMA}
) AS catalog(line)
"""
USER_TABLES = f"""
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND {_USER_SCHEMA} ORDER BY 1, 2
"""


def database_checksums(target: str | psycopg.Connection) -> tuple[str, str]:
    """(schema checksum, data checksum) of every non-system schema of the database
    (a URL, or an open autocommit connection to it).

    The schema one covers schemas, relations (with owners and grants), columns, indexes
    (with validity) and constraints; the data one every table's rows, ordered.
    """
    if isinstance(target, str):
        with psycopg.connect(target, autocommit=True) as conn:
            return database_checksums(conn)
    schema = target.execute(SCHEMA_CHECKSUM).fetchone()[0]
    per_table = [
        sql.SQL(
            "SELECT {label}, (SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text),"
            " '')) FROM {table} t)"
        ).format(label=sql.Literal(f"{nspname}.{relname}"), table=sql.Identifier(nspname, relname))
        for nspname, relname in target.execute(USER_TABLES).fetchall()
    ]
    rows = target.execute(sql.SQL(" UNION ALL ").join(per_table)).fetchall() if per_table else []
    data = "\n".join(f"{label} {digest}" for label, digest in rows)
    return schema, hashlib.md5(data.encode()).hexdigest()


# -- roles with chosen grants ------------------------------------------------------------

_roles = itertools.count()


@pytest.fixture
def role_url(database_url):
    """make(*grants) -> URL of a fresh LOGIN role on this test's database.

    Each grant is SQL with `{role}` where the role's name goes, e.g.
    "GRANT SELECT ON report_data_weeks TO {role}". Roles are dropped afterwards.
    """
    made: list[str] = []

    def make(*grants: str, name: str | None = None) -> str:
        role = name or f"rdw_role_{os.getpid()}_{next(_roles)}"
        ident = sql.Identifier(role)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
            made.append(role)
            for grant in grants:
                conn.execute(sql.SQL(grant).format(role=ident))
        params = conninfo_to_dict(database_url)
        params["user"] = role
        params.pop("password", None)
        return make_conninfo("", **params)

    yield make
    with psycopg.connect(database_url, autocommit=True) as conn:
        for role in reversed(made):
            ident = sql.Identifier(role)
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(ident))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
            conn.execute(sql.SQL("DROP ROLE {}").format(ident))


SELECT_ONLY_GRANTS = (
    "GRANT USAGE ON SCHEMA public TO {role}",
    "GRANT SELECT ON report_data_weeks, workflow_executions, report_data_collections TO {role}",
)


@pytest.fixture
def select_only_url(role_url, monkeypatch) -> str:
    """RDW_DATABASE_URL for a role holding only USAGE on the schema and SELECT on the
    three tables."""
    url = role_url(*SELECT_ONLY_GRANTS)
    monkeypatch.setenv("RDW_DATABASE_URL", url)
    return url


# -- layouts: the same demo rows as a partitioned or inheritance table --------------------

# Every layout a job must handle exactly (CONTRACT.md): "ordinary" is the template as is.
LAYOUTS = ("ordinary", "range", "list", "hash", "multilevel", "inheritance")


@pytest.fixture(params=LAYOUTS)
def layout(request) -> str:
    """Each supported layout of report_data_weeks in turn (use with `layout_url`)."""
    return request.param


@pytest.fixture
def layout_url(database_url: str, layout: str) -> str:
    """This test's database with report_data_weeks rebuilt in `layout`, same rows
    (`database_url` copied it from that layout's template)."""
    return database_url


# -- a Dagster instance on the test server, for the CLI (`dg launch`) ----------------------


@pytest.fixture
def dagster_home(tmp_path, admin_url, monkeypatch) -> Iterator[dict[str, str]]:
    """Environment for a Dagster CLI process: DAGSTER_HOME holding the package's
    dagster.yaml, its runs and events in a fresh database of the test server. Set in
    this process too (`dg.DagsterInstance.get()` reads the same instance); yields the
    environment for a subprocess."""
    from rdw_tracking import deploy
    from rdw_tracking.devserver import sqlalchemy_url

    name = f"rdw_test_dagster_{os.getpid()}_{next(_counter)}"
    storage = create_database(admin_url, name)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(deploy.DAGSTER_YAML.read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("RDW_DAGSTER_STORAGE_URL", sqlalchemy_url(storage))
    try:
        yield dict(os.environ)
    finally:
        drop_database(admin_url, name)
