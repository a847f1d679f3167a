"""With RDW_DATABASE_URL set, `target_db` reads it through `dg.EnvVar`, and still works.

The Definitions are loaded in a fresh process with the variable set, as a deployment's
code server loads them (the suite's own process imported them with it unset).
"""

import json
import os
import subprocess
import sys

SCRIPT = """
import json
import dagster as dg
from rdw_tracking import walkthrough
from rdw_tracking.definitions import defs
from rdw_tracking.sensors import workflow_executions_sensor

url = defs.resources["target_db"].url
result = defs.resolve_job_def("post_collection_validation").execute_in_process(
    instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
)
rows = [
    e.event_specific_data.materialization.metadata["total_rows"].value
    for e in result.get_asset_materialization_events()
    if e.event_specific_data.materialization.partition is None  # not the history's days
]
with dg.build_sensor_context(definitions=defs, resources=dict(defs.resources)) as context:
    tick = walkthrough.evaluate(workflow_executions_sensor, context)
print(json.dumps({
    "env_var": isinstance(url, dg.EnvVar), "name": url.env_var_name, "success": result.success,
    "rows": rows, "skip": tick.skip_message,
}))
"""


def load(env_url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RDW_DATABASE_URL": env_url}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )


def test_definitions_read_the_url_through_envvar(database_url):
    proc = load(database_url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["env_var"] is True and out["name"] == "RDW_DATABASE_URL"
    assert out["success"] is True and out["rows"] == [2600]
    assert out["skip"].startswith("first tick")


def test_a_malformed_url_in_the_variable_is_still_refused_without_quoting_it(database_url):
    proc = load("postgresql://rdw:pa/ss@db.example:5432/reporting")
    assert proc.returncode != 0 or '"success": false' in proc.stdout
    text = proc.stdout + proc.stderr
    assert "unencoded" in text
    assert "pa/ss" not in text
