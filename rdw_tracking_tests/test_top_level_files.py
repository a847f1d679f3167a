"""Issue 26.1: `workspace.yaml` and `dagster.yaml` at the top of a clone are the files the
wheel ships (`rdw_tracking/deploy/`), not copies that can drift.

That they work as they are from a clone (`dg dev` from the repository root, no
DAGSTER_HOME) is test_ui_e2e.py's fixture; that the wheel ships them, test_packaging.py.
"""

from pathlib import Path

import pytest
import yaml

from rdw_tracking import deploy

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"workspace.yaml": deploy.WORKSPACE_YAML, "dagster.yaml": deploy.DAGSTER_YAML}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_top_level_file_is_the_shipped_one(name):
    top = ROOT / name
    assert top.is_file(), f"{name} missing at the top of the repository"
    # A symlink into the package: one file, so an edit at the top is what the wheel ships.
    assert top.resolve() == SHIPPED[name].resolve(), f"{name} is not {SHIPPED[name]}"
    assert top.read_text() == SHIPPED[name].read_text()


def test_the_wheel_ships_the_deploy_folders_yaml():
    """pyproject's package data names the folder the top-level files point into."""
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    assert package_data["rdw_tracking.deploy"] == ["*.yaml"]
    assert {p.parent for p in SHIPPED.values()} == {ROOT / "rdw_tracking" / "deploy"}


def test_top_level_workspace_loads_the_project_code_location():
    [entry] = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"]
    assert entry == {
        "python_module": {
            "module_name": "rdw_tracking.definitions",
            "location_name": "rdw_tracking",
        }
    }
