"""The Kubernetes settings of deploy/k8s, checked with Dagster's own validation.

Nothing here reaches a cluster or builds an image (these machines have no Docker daemon
and no Kubernetes): the instance's dagster.yaml is validated and the instance built from
it, the executor's and the workspace's YAML are validated against their schemas, and
the Dockerfile is checked against the checkout and Dagster's CLI.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config, validate_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.workspace.config_schema import ensure_workspace_config
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_postgres import DagsterPostgresStorage

from rdw_tracking import engine

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as pip vendors it
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
FAKE_KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: test, user: {token: not-a-real-token}}]
contexts: [{name: test, context: {cluster: test, user: test}}]
current-context: test
"""


def instance_yaml() -> dict:
    return yaml.safe_load((K8S / "dagster.yaml").read_text())


def test_instance_config_passes_dagsters_validation(monkeypatch):
    monkeypatch.setenv("RDW_DAGSTER_STORAGE_URL", "postgresql+psycopg2://dagster@db/dagster")
    # The whole file, as the instance loads it ...
    config, custom_class = dagster_instance_config(str(K8S))
    assert custom_class is None
    # ... and each configurable class's block, against that class's own schema.
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    checked = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert checked.success, checked.errors
    storage = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert storage.success, storage.errors
    assert storage.value["postgres_url"] == "postgresql+psycopg2://dagster@db/dagster"


def test_instance_builds_with_the_k8s_run_launcher(dagster_home, tmp_path, monkeypatch):
    """The file as it ships, less in-cluster credentials (a kubeconfig instead): the
    instance Dagster builds has a K8sRunLauncher with these settings, on our storage."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(FAKE_KUBECONFIG)
    config = instance_yaml()
    config["run_launcher"]["config"].update(
        load_incluster_config=False, kubeconfig_file=str(kubeconfig)
    )
    home = tmp_path / "k8s_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, K8sRunLauncher)
        assert launcher.job_namespace == "rdw-tracking"
        assert launcher.instance_config_map == "rdw-tracking-instance"
        assert launcher.dagster_home == dockerfile_env()["DAGSTER_HOME"]
        assert launcher.env_secrets == ["rdw-tracking-env"]
        assert launcher.fail_pod_on_run_failure is True
        # The run queue keeps one write job at a time per database, as the package's
        # instance does, and two reads at a time per fleet database.
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
        per_value = {"applyLimitPerUniqueValue": True}
        assert {"key": "rdw/db-writes", "value": per_value, "limit": 1} in limits
        assert {"key": "rdw/reads", "value": per_value, "limit": 2} in limits
        assert instance.run_monitoring_enabled
        assert instance.get_runs() == []  # its storage answers


def shipped_dagster_yamls() -> list[Path]:
    """Every dagster.yaml in the repository (the top-level one is the package's)."""
    return sorted(
        {
            REPO / "dagster.yaml",
            *(REPO / "rdw_tracking").rglob("dagster.yaml"),
            *(REPO / "deploy").rglob("dagster.yaml"),
        }
    )


@pytest.mark.parametrize("path", shipped_dagster_yamls(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_dagster_yaml_has_the_tested_run_queue_and_pools(path, dagster_home):
    """Issue 26.6: the run queue (`concurrency.runs`: tag limits, max concurrent runs) and
    the pools (`concurrency.pools`) of each shipped dagster.yaml are those of the instance
    the suite runs its CLI and fleet tests under (conftest's `dagster_home`)."""
    tested = yaml.safe_load((Path(dagster_home["DAGSTER_HOME"]) / "dagster.yaml").read_text())
    shipped = yaml.safe_load(path.read_text())
    assert shipped["concurrency"] == tested["concurrency"]
    # no second place that sets the run queue
    assert "run_coordinator" not in shipped and "run_coordinator" not in tested


def test_executor_config_passes_the_k8s_job_executors_schema():
    run_config = yaml.safe_load((K8S / "executor.yaml").read_text())
    assert set(run_config) == {"execution"}
    schema = k8s_job_executor.config_schema.config_type
    checked = validate_config(schema, run_config["execution"]["config"])
    assert checked.success, checked.errors
    assert engine.executor(environ={"RDW_EXECUTOR": "k8s"}) is k8s_job_executor


def test_workspace_passes_dagsters_validation():
    path = K8S / "workspace.yaml"
    config = ensure_workspace_config(yaml.safe_load(path.read_text()), str(path))
    (server,) = config["load_from"]
    assert server["grpc_server"]["location_name"] == "rdw_tracking"
    assert str(server["grpc_server"]["port"]) == dockerfile_port()


# -- the Dockerfile ----------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (K8S / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction, args in dockerfile():
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def dockerfile_port() -> str:
    (port,) = [args for instruction, args in dockerfile() if instruction == "EXPOSE"]
    return port


def test_dockerfile_copies_files_that_exist():
    copies = [shlex.split(args) for instruction, args in dockerfile() if instruction == "COPY"]
    assert copies
    for *sources, _destination in copies:
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, not in the checkout"


def test_dockerfile_installs_declared_extras_on_a_supported_python():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (base,) = [args for instruction, args in dockerfile() if instruction == "FROM"]
    version = re.fullmatch(r"python:(\d+)\.(\d+)-slim", base)
    assert version, base
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", pyproject["project"]["requires-python"])
    assert tuple(map(int, version.groups())) >= tuple(map(int, minimum.groups()))
    installs = " ".join(args for instruction, args in dockerfile() if instruction == "RUN")
    extras = re.findall(r"'\.\[([a-z0-9_,]+)\]'", installs)
    assert extras == ["k8s"], installs
    declared = pyproject["project"]["optional-dependencies"]
    assert all(extra in declared for extra in extras[0].split(","))
    assert any(dep.startswith("dagster-k8s==") for dep in declared["k8s"])
    # Never the embedded server in a production image.
    assert "embedded" not in installs


def test_dockerfile_command_parses_under_dagsters_cli_and_serves_the_definitions():
    from dagster._cli.code_server import start_command

    (cmd,) = [json.loads(args) for instruction, args in dockerfile() if instruction == "CMD"]
    assert cmd[:3] == ["dagster", "code-server", "start"]
    context = start_command.make_context("start", cmd[3:])  # parses; starts nothing
    params = context.params
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert params["module_name"] == pyproject["tool"]["dagster"]["module_name"]
    assert params["location_name"] == pyproject["tool"]["dagster"]["code_location_name"]
    assert str(params["port"]) == dockerfile_port() and params["host"] == "0.0.0.0"
    assert params["module_name"] in sys.modules or __import__(params["module_name"])


@pytest.mark.parametrize("name", ["dagster.yaml", "executor.yaml", "workspace.yaml"])
def test_no_secret_in_the_shipped_files(name):
    text = (K8S / name).read_text()
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", text), f"{name} holds a URL with a password"


def test_the_run_pod_dagster_would_create(tmp_path):
    """The Kubernetes Job the launcher would submit for a run: secrets and config as
    env, the fleet file mounted, the image's DAGSTER_HOME, a non-root container with
    limits. (The instance's settings reach the pod with the run's own arguments.)"""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import construct_dagster_k8s_job

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(FAKE_KUBECONFIG)
    config = instance_yaml()["run_launcher"]["config"]
    config.update(load_incluster_config=False, kubeconfig_file=str(kubeconfig))
    checked = process_config(K8sRunLauncher.config_type(), config)
    assert checked.success, checked.errors
    launcher = K8sRunLauncher(**checked.value)
    run = dg.DagsterRun(job_name="verify_execution_tracking")
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=True)
    job_config = context.get_k8s_job_config(job_image="rdw-tracking:0.1.0", run_launcher=launcher)
    job = construct_dagster_k8s_job(
        job_config,
        ["dagster", "api", "execute_run"],
        "rdw-run-test",
        user_defined_k8s_config=context.run_k8s_config,
        labels={},
    )
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert pod.service_account_name == "rdw-tracking"
    assert container.image == "rdw-tracking:0.1.0"
    sources = {(s.secret_ref or s.config_map_ref).name for s in container.env_from}
    assert sources == {"rdw-tracking-env", "rdw-tracking-config"}
    mounts = {m.name: m for m in container.volume_mounts}
    assert mounts["fleet"].mount_path == "/opt/dagster/fleet" and mounts["fleet"].read_only
    volumes = {v.name: v for v in pod.volumes}
    assert volumes["fleet"].config_map.name == "rdw-tracking-fleet"
    env = {e.name: e.value for e in container.env}
    assert env["DAGSTER_HOME"] == dockerfile_env()["DAGSTER_HOME"]
    assert (
        container.security_context.run_as_non_root
        and container.security_context.run_as_user == 10001
    )
    assert container.resources.limits == {"memory": "1Gi"}
