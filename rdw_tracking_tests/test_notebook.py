"""Issue 26.4: the notebook path of docs/population-and-checks.md, run as written.

A validation run stores `execution_id_population`'s DataFrame on the instance of
DAGSTER_HOME (conftest's `dagster_home`: the project's dagster.yaml, its storage in a test
database); the page's ```python block, copied verbatim, then loads it in a fresh process
with that environment, as a notebook started from the same shell would.
"""

import re
import subprocess
import sys
from pathlib import Path

import dagster as dg

from rdw_tracking.definitions import defs

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "population-and-checks.md"


def notebook_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    [block] = [b for b in blocks if "load_asset_value" in b]
    return block


def test_documented_notebook_block_loads_the_stored_dataframe(dagster_home, database_url):
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("post_collection_validation").execute_in_process(
            instance=instance
        )
    assert result.success
    stored = result.output_for_node("execution_id_population")
    script = notebook_block() + "\nprint(len(daily), list(daily.columns))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=dagster_home,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, columns = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) == len(stored)
    assert columns == str(list(stored.columns))
