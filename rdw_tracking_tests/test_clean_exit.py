"""Issue 26.3: a green run prints no `Exception ignored ... sqlite3.ProgrammingError:
Cannot operate on a closed database` after its summary.

Those tracebacks came from sensor contexts built with resources and no instance
(`dg.build_sensor_context(resources=...)`) and never entered: their resources are built
by a generator holding an in-memory (sqlite) ephemeral instance. A context that outlived
its test (kept by an exception's traceback, say) was closed only at interpreter exit,
after sqlite's connections were gone. Entered with `with`, each is closed at once.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Dagster's context builders whose result holds resources or an instance until exited.
BUILDERS = {
    "build_sensor_context",
    "build_schedule_context",
    "build_asset_context",
    "build_op_context",
    "build_init_resource_context",
    "build_resources",
}


def unentered_builds(path: Path) -> list[str]:
    """`file:line name` of each builder call that is not the expression of a `with` item
    (or returned, to be entered by the caller)."""
    tree = ast.parse(path.read_text())
    entered = {
        id(item.context_expr)
        for node in ast.walk(tree)
        if isinstance(node, ast.With | ast.AsyncWith)
        for item in node.items
    }
    # a small factory's `return build_...(...)`, entered where it is called
    entered |= {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Return) and n.value}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in entered:
            continue
        name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
        if name not in BUILDERS:
            continue
        given = {k.arg for k in node.keywords}
        # nothing to release: no resources built, or only a schedule's time
        if name == "build_schedule_context" and "resources" not in given:
            continue
        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return found


def test_every_dagster_context_with_resources_is_entered():
    files = [
        *(ROOT / "rdw_tracking").rglob("*.py"),
        *(ROOT / "rdw_tracking_tests").rglob("*.py"),
        *(ROOT / "benchmarks").rglob("*.py"),
    ]
    found = [hit for path in files for hit in unentered_builds(path)]
    # A script inside a string (test_env_url.py's) is checked by the same rule below.
    assert found == []


def test_the_scripts_run_in_subprocesses_enter_theirs_too():
    from rdw_tracking_tests import test_env_url

    tree = ast.parse(test_env_url.SCRIPT)
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "attr", None) in BUILDERS
    ]
    entered = {
        id(i.context_expr) for n in ast.walk(tree) if isinstance(n, ast.With) for i in n.items
    }
    assert calls and all(id(c) in entered for c in calls)
