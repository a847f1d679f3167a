"""The README and `docs/` as written: every fenced block, relative link and repository path.

- ```yaml: parses; run config (`ops:`/`resources:` at the top) names its job on its first
  line, `# job: <name>`, and validates against that job's run config schema, config
  mapping included (the checks a launch runs); a fleet file (`databases:`) loads.
- ```sh: each command is run where that is cheap and read-only (RUN, `make -n`), otherwise
  checked to exist: a subcommand and the options it accepts, a job of the definitions, a
  module, a file. What is neither is in SKIPPED, with why.
- ```sql: runs in a transaction on a test database, rolled back (the grants).
- ```python: parses, and its imports from rdw_tracking resolve.
- Relative links (anchors included), backticked repository paths and `rdw_tracking.*`
  names resolve; the README names every asset, check, job, sensor and schedule.
Repository paths in commands are checked to exist even where the command is skipped.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

import click
import dagster as dg
import psycopg
import pytest
import yaml

from rdw_tracking.devserver import sqlalchemy_url

from .conftest import create_database, drop_database

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent  # the virtualenv running the tests: rdw-tracking, dg, ...
LANGUAGES = {"yaml", "sh", "bash", "sql", "python"}

# Commands run as written (output redirects dropped): each cheap and read-only.
# (`dg list defs` would load the definitions a second time: it is checked to exist, and the
# README is checked against the same definitions, loaded in process.)
RUN = {
    "dg check defs",  # loads the definitions
    "rdw-tracking dagster-yaml",  # prints YAML
    "rdw-tracking celery-yaml",  # prints YAML
}
# Commands neither run nor checked, and why.
SKIPPED = [
    (r"^export ", "sets a variable (its name is checked to be one the project reads)"),
    (r"^pip ", "installs packages; test_packaging.py builds and installs the wheel"),
    (r"^docker ", "no Docker daemon here; test_k8s.py checks deploy/k8s/Dockerfile"),
    (r"^kubectl ", "no cluster here; test_k8s.py validates deploy/k8s"),
]
# Documented commands that fail today. Each is still run: once it works, the test says so.
KNOWN_BROKEN: dict[str, str] = {}
# The contract's factory and component, named in docs/reference.md under a "(planned)"
# heading until they exist (test_reference.py keeps that heading honest).
PLANNED = {"rdw_tracking.build_defs", "rdw_tracking.ExecutionTrackingComponent"}
REPO_PREFIXES = ("rdw_tracking/", "rdw_tracking_tests/", "benchmarks/", "deploy/", "docs/", ".ci/")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def read_blocks() -> list[Block]:
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        start = None
        for number, line in enumerate(lines, 1):
            if line.startswith("```") and start is None:
                start, lang = number, line[3:].strip()
            elif line.startswith("```"):
                found.append(Block(page, start, lang, "\n".join(lines[start : number - 1])))
                start = None
    return found


BLOCKS = read_blocks()


def of(lang: str) -> list:
    return [pytest.param(b, id=b.where) for b in BLOCKS if b.lang == lang]


def test_every_block_has_a_language_this_test_reads():
    assert [b.where for b in BLOCKS if b.lang not in LANGUAGES] == []


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A documented command, from the repository root, with the virtualenv's programs."""
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    elif (BIN / argv[0]).exists():
        argv = [str(BIN / argv[0]), *argv[1:]]
    environ = {k: v for k, v in os.environ.items() if k != "RDW_FLEET_FILE"} | (env or {})
    return subprocess.run(argv, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)


# -- yaml ------------------------------------------------------------------------------------


@cache
def definitions() -> dg.Definitions:
    from rdw_tracking.definitions import defs

    return defs


@pytest.mark.parametrize("block", of("yaml"))
def test_yaml_block(block: Block, monkeypatch):
    # Definitions imported earlier in the session with RDW_DATABASE_URL set read it through
    # dg.EnvVar: config validation then needs the variable, whatever it holds.
    monkeypatch.setenv(
        "RDW_DATABASE_URL",
        os.environ.get("RDW_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres",
    )
    config = yaml.safe_load(block.text)
    assert isinstance(config, dict), f"{block.where}: not a mapping"
    if "databases" in config:
        from rdw_tracking import fleet

        environ = {d["url_env"]: "postgresql://rdw@db/reporting" for d in config["databases"]}
        assert fleet.parse(block.page, block.text, environ).databases
        return
    assert set(config) <= {"ops", "resources", "execution"}, f"{block.where}: what is it for?"
    marker = re.match(r"#\s*job:\s*(\w+)", block.text)
    assert marker, f"{block.where}: run config without a `# job: <name>` first line"
    dg.validate_run_config(definitions().resolve_job_def(marker.group(1)), config)


# -- sh --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    where: str
    text: str  # as written, continuation lines joined
    env: tuple[tuple[str, str], ...]  # `NAME=value` words before the program
    argv: tuple[str, ...]  # program first; `.venv/bin/`, comments and `> file` dropped

    @property
    def line(self) -> str:
        return " ".join(self.argv)

    @property
    def parts(self) -> tuple[list[str], list[str], list[str]]:
        """(subcommand words, options, other words): `rdw-tracking demo [--rows N]` is
        (["demo"], ["--rows"], ["N"])."""
        words, options, rest = [], [], []
        for word in self.argv[1:]:
            if word.lstrip("[").startswith("-"):
                options.append(word.strip("[]"))
            elif not options and not rest and re.fullmatch(r"[\w.\-/]+", word):
                words.append(word)
            else:
                rest.append(word.strip("[]"))
        return words, options, rest

    def value_of(self, option: str) -> str:
        return self.argv[self.argv.index(option) + 1]


def read_commands() -> list[Command]:
    found = []
    for block in BLOCKS:
        if block.lang not in ("sh", "bash"):
            continue
        for text in block.text.replace("\\\n", " ").splitlines():
            words = shlex.split(text, comments=True)
            if not words:
                continue
            env = []
            while re.match(r"\w+=", words[0]) and len(words) > 1:
                env.append(tuple(words.pop(0).split("=", 1)))
            if ">" in words:
                words = words[: words.index(">")]
            words[0] = words[0].removeprefix(".venv/bin/")
            found.append(Command(block.where, text.strip(), tuple(env), tuple(words)))
    return found


COMMANDS = read_commands()


@cache
def accepted(program: str, *words: str) -> str:
    """The options and choices `program words...` accepts, as text to search."""
    if program != "python":
        (entry,) = entry_points(group="console_scripts", name=program)
        main = entry.load()
        command = main if isinstance(main, click.Command) else None
        command = command or getattr(sys.modules[main.__module__], "cli", None)
        if isinstance(command, click.Command):  # dg, dagster, dagster-celery: ask click
            for word in words:
                command = command.get_command(click.Context(command), word)
                assert command is not None, f"{program} {' '.join(words)}: no such command"
            return " ".join(o for p in command.params for o in (*p.opts, *p.secondary_opts))
    done = run([program, *words, "--help"])  # rdw-tracking, benchmarks/run.py: argparse
    assert done.returncode == 0, f"{program} {' '.join(words)} --help: {done.stderr[-2000:]}"
    return done.stdout


@cache
def benchmarks_parser() -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location("benchmarks_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parser()


def job_names() -> set[str]:
    return {job.name for job in definitions().resolve_all_job_defs()}


@cache
def project_source() -> str:
    """Where the project reads its environment: the package and the deployment files."""
    files = [*(ROOT / "rdw_tracking").rglob("*.py"), *(ROOT / "deploy").rglob("*")]
    return "\n".join(f.read_text(errors="replace") for f in files if f.is_file())


def fleet_url_envs() -> set[str]:
    fleets = [yaml.safe_load(b.text) for b in BLOCKS if b.lang == "yaml"]
    return {d["url_env"] for f in fleets if "databases" in f for d in f["databases"]}


def check_exists(command: Command) -> None:
    """The subcommand, each option, each `a|b` choice, a `--job` and a `-m` module."""
    program = command.argv[0]
    words, options, rest = command.parts
    if program == "python" and options[:1] == ["-m"]:
        assert importlib.util.find_spec(command.value_of("-m")), command.text
        return
    if program == "python" and words[:1] == ["benchmarks/run.py"]:
        try:  # the documented line, values and all, as run.py parses it
            benchmarks_parser().parse_args(command.argv[2:])
        except SystemExit:
            pytest.fail(f"{command.where}: benchmarks/run.py refuses `{command.text}`")
        return
    accepts = accepted(program, *words[:2])
    for option in options:
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", accepts), (
            f"`{command.text}`: {program} {' '.join(words[:2])} takes no {option}"
        )
    for choice in (c for word in rest if "|" in word for c in word.split("|")):
        assert re.search(rf"\b{choice}\b", accepts), f"`{command.text}`: no {choice}"
    if "--job" in options:
        assert command.value_of("--job") in job_names(), command.text
    if "-m" in options:
        assert importlib.util.find_spec(command.value_of("-m")), command.text


@pytest.fixture(scope="module")
def clone_storage_env(admin_url):
    """RDW_DAGSTER_STORAGE_URL for `dg` and `dagster` run from the repository root, where
    the top-level dagster.yaml keeps Dagster's storage in PostgreSQL (operating.md#dg)."""
    name = f"rdw_test_docs_dagster_{os.getpid()}"
    url = create_database(admin_url, name)
    try:
        yield {"RDW_DAGSTER_STORAGE_URL": sqlalchemy_url(url)}
    finally:
        drop_database(admin_url, name)


@pytest.mark.parametrize("command", [pytest.param(c, id=f"{c.where} {c.line}") for c in COMMANDS])
def test_sh_command(command: Command, request):
    program = command.argv[0]
    if command.text.startswith("export "):
        name = command.text.split()[1].split("=")[0]
        assert name in project_source() or name in fleet_url_envs(), f"nothing reads {name}"
    for word in command.argv[1:]:  # skipped or not: `docker build -f deploy/k8s/Dockerfile`
        path = word.split("=", 1)[-1]
        if path.startswith(REPO_PREFIXES):
            assert (ROOT / path).exists(), f"{command.where}: {path} does not exist"
    for pattern, reason in SKIPPED:
        if re.match(pattern, command.text):
            pytest.skip(reason)
    if program == "make":
        done = run(["make", "-n", *command.argv[1:]], dict(command.env))
    elif command.line in RUN:
        env = dict(command.env)
        if program in ("dg", "dagster") and not os.environ.get("DAGSTER_HOME"):
            # from the root, as a clone runs it: the top-level dagster.yaml needs its storage
            env |= request.getfixturevalue("clone_storage_env")
        done = run(list(command.argv), env)
    elif program in ("rdw-tracking", "dg", "dagster", "dagster-celery", "python"):
        return check_exists(command)
    else:
        pytest.fail(f"{command.where}: `{command.text}`: add a rule or a SKIPPED entry")
    if command.line in KNOWN_BROKEN:
        assert done.returncode != 0, f"`{command.line}` works now: drop it from KNOWN_BROKEN"
        pytest.xfail(KNOWN_BROKEN[command.line])
    assert done.returncode == 0, f"{command.where}: `{command.text}`: {done.stderr[-2000:]}"
    if program == "rdw-tracking":  # dagster-yaml, celery-yaml: files to be written
        assert isinstance(yaml.safe_load(done.stdout), dict), done.stdout[-2000:]


def test_readme_names_every_definition():
    """Every asset, check, job, sensor and schedule the UI shows is in the README's table."""
    readme = (ROOT / "README.md").read_text()
    defs = definitions()
    graph = defs.resolve_asset_graph()
    names = [
        *(key.to_user_string() for key in graph.get_all_asset_keys()),
        *(key.name for key in graph.asset_check_keys),
        *(name for name in job_names() if not name.startswith("__")),  # not __ASSET_JOB
        *(sensor.name for sensor in defs.sensors),
        *(schedule.name for schedule in defs.schedules),
    ]
    assert [n for n in names if f"`{n}`" not in readme] == []


# -- sql -------------------------------------------------------------------------------------

# The roles the grants name (the page says to replace them with yours: so does the test, so
# that same-named roles elsewhere on a shared server never collide). What the grants assume
# a deployment has, the roles and the tables (stand-ins: grants need only the names and
# the columns they name), is made in the same transaction, on an empty database.
ROLES = ("reporting_owner", "rdw_reader", "rdw_admin", "rdw_rollback", "rdw_collector")
GRANTS_SETUP = """
CREATE ROLE reporting_owner; CREATE ROLE rdw_admin; CREATE ROLE rdw_rollback;
CREATE ROLE rdw_collector;
CREATE TABLE public.report_data_collections (id uuid);
CREATE TABLE public.workflow_executions (id uuid);
CREATE TABLE public.report_data_weeks (id uuid, execution_id uuid, updated_at timestamptz);
CREATE TABLE public.report_data_weeks_p202501 (LIKE public.report_data_weeks);
CREATE TABLE public.execution_id_rollback_backup (id uuid);
CREATE TABLE public.execution_id_rollback_runs (id uuid)
"""
# Statements a block may hold to be run; a block with any other fails until given a rule.
RUNNABLE_SQL = re.compile(r"(GRANT|REVOKE|CREATE ROLE|SELECT)\b", re.I)


def statements(text: str) -> list[str]:
    return [s.strip() for s in re.sub(r"--[^\n]*", "", text).split(";") if s.strip()]


@pytest.mark.parametrize("block", of("sql"))
def test_sql_block(block: Block, empty_database_url: str):
    written = statements(block.text)
    assert all(RUNNABLE_SQL.match(s) for s in written), f"{block.where}: not runnable here"
    own = re.compile(r"\b(" + "|".join(ROLES) + r")\b")
    with psycopg.connect(empty_database_url) as conn:
        for statement in statements(GRANTS_SETUP) + written:
            conn.execute(own.sub(lambda m: f"{m.group()}_doc{os.getpid()}", statement))
        conn.rollback()


# -- python ----------------------------------------------------------------------------------


@pytest.mark.parametrize("block", of("python"))
def test_python_block(block: Block):
    for node in ast.parse(block.text, block.where).body:
        if isinstance(node, ast.ImportFrom) and node.module.startswith("rdw_tracking"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.where}: {node.module}.{alias.name}"


# -- links and names -------------------------------------------------------------------------


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation but `-` and `_` dropped, spaces `-`."""
    prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    headings = re.findall(r"^#+ (.*)$", prose, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def resolves(dotted: str) -> bool:
    """`rdw_tracking.a.b` names a module, or an attribute of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        value = module
        for attribute in parts[cut:]:
            if not hasattr(value, attribute):
                return False
            value = getattr(value, attribute)
        return True
    return False


@pytest.mark.parametrize("page", [pytest.param(p, id=p.name) for p in PAGES])
def test_links_and_names_resolve(page: Path):
    """Relative links and their anchors; backticked repository paths and rdw_tracking names."""
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    for name in re.findall(r"`([^`\s]+)`", text):
        if name.startswith(REPO_PREFIXES) and not (ROOT / name).exists():
            broken.append(name)
        if name in PLANNED:
            continue
        if re.fullmatch(r"rdw_tracking(\.\w+)+(\(\))?", name) and not resolves(
            name[:-2] if name.endswith("()") else name
        ):
            broken.append(name)
    assert broken == []
