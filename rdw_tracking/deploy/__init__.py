"""The Dagster files that ship with the package: the instance's `dagster.yaml` and the
`workspace.yaml` of the code location, found beside this module in a checkout and in an
installed wheel alike."""

from pathlib import Path

DAGSTER_YAML = Path(__file__).with_name("dagster.yaml")
WORKSPACE_YAML = Path(__file__).with_name("workspace.yaml")
