"""`build_index`: the one safe way this project builds an index, whatever the layout of
the table (ordinary, partitioned, inheritance) it goes on."""

from rdw_tracking.errors import refuse
from rdw_tracking.indexes.partitioned import build_inherited_index, build_partitioned_index
from rdw_tracking.indexes.specs import IndexSpec
from rdw_tracking.indexes.table import IndexBuild, build_table_index
from rdw_tracking.indexes.watch import Log
from rdw_tracking.layout import table_layout
from rdw_tracking.resources import TargetDatabase


def build_index(
    db: TargetDatabase,
    spec: IndexSpec,
    log: Log,
    retries: int = 3,
    backoff_s: float = 2.0,
    progress_every_s: float = 5.0,
) -> IndexBuild:
    """Make `spec` exist and be valid on its table, whatever the table's layout, without
    ever blocking the table's writers for longer than `lock_timeout_ms`.

    An ordinary table: `build_table_index`. A partitioned table: the parent's index
    `ON ONLY`, each partition's built concurrently and attached (`build_partitioned_index`).
    An inheritance parent: the parent's and each child's (`build_inherited_index`).
    A view, a foreign table or a table with rules is refused before any change.
    """
    with db.cursor() as cur:
        layout = table_layout(cur, spec.schema_of(db), spec.table)
    if layout is None or layout.kind == "ordinary":
        return build_table_index(db, spec, log, retries, backoff_s, progress_every_s)
    refusal = layout.refusal(f"building index {spec.where(db)}")
    if refusal:
        raise refuse(refusal)
    build = build_partitioned_index if layout.kind == "partitioned" else build_inherited_index
    return build(db, spec, layout, log, retries, backoff_s, progress_every_s)
