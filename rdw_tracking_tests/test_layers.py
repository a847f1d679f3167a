"""The package's layers, as its imports draw them: every arrow points down.

A module may import from its own layer or any layer below it, never above, lazy
imports included. A new module must be placed in a layer here, so where it sits in
the architecture is decided once, in review, rather than found later in a cycle.
"""

import ast
from pathlib import Path

# Bottom first. A name is a top-level module or subpackage of rdw_tracking.
LAYERS = (
    # Leaves: errors, catalog SQL, layouts, config files, the embedded server.
    ("errors", "catalog", "layout", "fleet", "engine", "devserver", "embedded", "demo"),
    ("celery_app",),  # the workers' celery app: engine's settings, dagster-celery's tasks
    ("resources",),  # TargetDatabase: connections, timeouts, identifiers
    ("writes",),  # the write lock every write job holds
    # Engines: plain functions over a TargetDatabase.
    (
        "premises",
        "counting",
        "contract",
        "tally",
        "population",
        "alerts",
        "rollback",
        "indexes",
        "foreign_key",
    ),
    ("assets", "collection"),  # Dagster assets, checks and the collection op
    ("jobs",),
    ("sensors", "schedules"),
    ("fleet_defs",),
    ("definitions",),
    ("walkthrough", "demo_layouts", "fleet_walkthrough", "cli", "deploy"),  # dev tooling
)
PACKAGE = Path(__file__).resolve().parent.parent / "rdw_tracking"


def _layer_of(name: str) -> int:
    for index, names in enumerate(LAYERS):
        if name in names:
            return index
    raise AssertionError(f"rdw_tracking.{name} is in no layer: add it to LAYERS in {__file__}")


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_units(tree: ast.AST, importer: Path) -> set[str]:
    units = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = importer.relative_to(PACKAGE).parts[: -node.level]
            module = ".".join((*base, *(node.module or "").split(".")))
            names = [module.strip(".")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
            if node.module == "rdw_tracking":
                names = [f"rdw_tracking.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "rdw_tracking" and len(parts) > 1:
                units.add(parts[1])
    return units


def test_every_import_points_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        unit = _unit(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        for imported in sorted(_imported_units(tree, path) - {unit}):
            if _layer_of(imported) > _layer_of(unit):
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports rdw_tracking.{imported}")
    assert not upward, "imports running back up the layers:\n" + "\n".join(upward)


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        if path.parent != PACKAGE or path.name != "__init__.py":
            _layer_of(_unit(path))
