"""The spec's "Index Considerations" as Dagster runs them: the run config, the
`execution_id_indexes` asset and its `execution_id_indexes_valid` check.

Building the indexes online (specs, catalog lookup, lock waits, partition trees) is the
package `rdw_tracking.indexes`, callable without Dagster; this module picks the indexes
the run asked for and turns what was built into the asset's metadata.
"""

from typing import Any

import dagster as dg
from pydantic import Field, field_validator, model_validator

from rdw_tracking import catalog
from rdw_tracking.assets import GROUP, READ_RETRY, WRITE_POOL
from rdw_tracking.assets.tables import report_data_weeks, workflow_executions
from rdw_tracking.indexes.existing import ExistingIndex, member_indexes, table_indexes
from rdw_tracking.indexes.online import build_index
from rdw_tracking.indexes.preflight import refuse_before_building, refuse_conflicts
from rdw_tracking.indexes.problems import WeeksIndexes, weeks_table_problems
from rdw_tracking.indexes.specs import (
    COLLECTION_EXECUTION_INDEX,
    COMPLETED_AT_INDEX,
    CREATED_AT_INDEX,
    EXECUTION_ID_INDEX,
    IndexSpec,
    completed_at_index,
    contract_indexes,
    created_at_index,
)
from rdw_tracking.indexes.table import IndexBuild
from rdw_tracking.indexes.watch import Log
from rdw_tracking.layout import Layout, table_layout
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.writes import exclusive_write

# No `from __future__ import annotations` here: Dagster reads the Config annotation at runtime.


class IndexConfig(dg.Config):
    indexes: list[str] = Field(
        default=[EXECUTION_ID_INDEX, COLLECTION_EXECUTION_INDEX],
        description="Which of the two recommended indexes to build (default: both).",
    )
    workflow_executions_completed_at: bool = Field(
        default=False,
        description=f"Also build {COMPLETED_AT_INDEX} on workflow_executions(completed_at), "
        "for the polling sensor.",
    )
    report_data_weeks_created_at: bool = Field(
        default=False,
        description=f"Also build {CREATED_AT_INDEX} on the weeks table (created_at, "
        "execution_id), so per-run verdicts and daily history read only their own rows.",
    )
    lock_retries: int = Field(
        default=3, ge=0, le=20, description="Retries after a lock wait times out."
    )
    retry_backoff_s: float = Field(
        default=2.0, ge=0, le=600, description="First back-off (s); doubles each retry."
    )
    progress_every_s: float = Field(
        default=5.0, gt=0, description="How often build progress is logged (s)."
    )

    @field_validator("indexes")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        known = [EXECUTION_ID_INDEX, COLLECTION_EXECUTION_INDEX]
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown index {', '.join(unknown)}; choose from {', '.join(known)}")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _something(self) -> "IndexConfig":
        if not (
            self.indexes
            or self.workflow_executions_completed_at
            or self.report_data_weeks_created_at
        ):
            raise ValueError(
                "indexes is empty and both opt-in indexes are off: nothing to build; leave "
                "indexes unset to build both"
            )
        return self


def weeks_layout(db: TargetDatabase) -> Layout | None:
    with db.cursor() as cur:
        return table_layout(cur, db.schema_name, db.weeks_table)


def wal_lsn(db: TargetDatabase) -> str | None:
    with db.connect(autocommit=True) as conn:
        return catalog.wal_lsn(conn)


def chosen_indexes(db: TargetDatabase, config: IndexConfig) -> list[IndexSpec]:
    specs = [contract_indexes(db)[name] for name in config.indexes]
    if config.report_data_weeks_created_at:
        specs.append(created_at_index(db))
    return specs + ([completed_at_index(db)] if config.workflow_executions_completed_at else [])


def indexes_table(
    indexes: list[ExistingIndex], builds: dict[str, IndexBuild]
) -> dg.TableMetadataValue:
    """Every index on the tables the run touched, and what this run did to each."""
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {
                    "index_name": i.name,
                    "table_name": i.table,
                    "definition": i.definition,
                    "valid": i.valid,
                    "bytes": i.bytes,
                    "action": builds[i.name].action if i.name in builds else "",
                    "build_seconds": builds[i.name].seconds if i.name in builds else 0.0,
                }
            )
            for i in indexes
        ],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("index_name", "string"),
                dg.TableColumn("table_name", "string"),
                dg.TableColumn("definition", "string"),
                dg.TableColumn("valid", "bool"),
                dg.TableColumn("bytes", "int"),
                dg.TableColumn("action", "string"),
                dg.TableColumn("build_seconds", "float"),
            ]
        ),
    )


def partitions_table(
    builds: list[IndexBuild], tree: dict[int, list[ExistingIndex]]
) -> dg.TableMetadataValue:
    """Each partition (or child table) of the weeks table, per contract index: the index
    serving it, and what this run did there."""
    found = {(f"{i.schema}.{i.table}", i.name): i for indexes in tree.values() for i in indexes}
    records = []
    for build in builds:
        for done in build.partitions:
            index = found.get((done.partition, done.partition_index))
            records.append(
                dg.TableRecord(
                    {
                        "index_name": done.index,
                        "partition": done.partition,
                        "partition_index": done.partition_index,
                        "action": done.action,
                        "valid": bool(index and index.valid),
                        "bytes": index.bytes if index else 0,
                        "build_seconds": done.seconds,
                    }
                )
            )
    return dg.MetadataValue.table(
        records=records,
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("index_name", "string"),
                dg.TableColumn("partition", "string"),
                dg.TableColumn("partition_index", "string"),
                dg.TableColumn("action", "string"),
                dg.TableColumn("valid", "bool"),
                dg.TableColumn("bytes", "int"),
                dg.TableColumn("build_seconds", "float"),
            ]
        ),
    )


def build_metadata(
    db: TargetDatabase,
    specs: list[IndexSpec],
    builds: list[IndexBuild],
    wal_bytes: int | None,
    layout: Layout | None = None,
) -> dict[str, Any]:
    with db.cursor() as cur:
        found = table_indexes(
            cur, db.schema_name, sorted({s.table for s in specs} | {db.weeks_table})
        )
        tree = member_indexes(cur, layout) if layout is not None and layout.is_tree else {}
    by_name = {i.name: i for i in found}
    kept = [by_name.get(b.equivalent or b.name) for b in builds]
    partitions = [p for b in builds for p in b.partitions]
    on_partitions = {
        (f"{i.schema}.{i.table}", i.name): i.bytes for indexes in tree.values() for i in indexes
    }
    metadata: dict[str, Any] = {
        "created": sum(b.action == "created" for b in builds),
        "rebuilt": sum(b.action in ("rebuilt", "completed") for b in builds),
        "unchanged": sum(b.action in ("unchanged", "equivalent") for b in builds),
        # a partitioned index has no storage of its own: its partitions' indexes hold it
        "index_bytes": sum(i.bytes for i in kept if i is not None)
        + sum(on_partitions.get((p.partition, p.partition_index), 0) for p in partitions),
        "indexes": indexes_table(found, {b.name: b for b in builds} | _equivalents(builds)),
        "build_seconds": round(sum(b.seconds for b in builds), 3),
        "wal_bytes": wal_bytes,
    }
    for build in builds:
        metadata[f"build_seconds/{build.name}"] = build.seconds
    equivalents = {b.name: b.equivalent for b in builds if b.equivalent}
    if equivalents:
        metadata["equivalent"] = equivalents
    if layout is not None and layout.is_tree:
        metadata["layout"] = layout.describe()
        metadata["partitions"] = partitions_table(builds, tree)
        metadata["partitions_built"] = sum(p.action in ("created", "rebuilt") for p in partitions)
        metadata["partitions_attached"] = sum(p.action == "attached" for p in partitions)
        metadata["partitions_unchanged"] = sum(
            p.action in ("unchanged", "equivalent") for p in partitions
        )
    return metadata


def _equivalents(builds: list[IndexBuild]) -> dict[str, IndexBuild]:
    return {b.equivalent: b for b in builds if b.equivalent}


@dg.asset(
    key="execution_id_indexes",
    group_name=GROUP,
    pool=WRITE_POOL,  # one database write at a time, however it is launched
    deps=[report_data_weeks, workflow_executions],
    kinds={"postgres"},
)
def execution_id_indexes(
    context: dg.AssetExecutionContext, config: IndexConfig, target_db: TargetDatabase
) -> dg.MaterializeResult:
    """The spec's two partial indexes on `report_data_weeks`, built online.

    `idx_report_data_weeks_execution_id (execution_id)` and
    `idx_report_data_weeks_collection_execution (collection_id, execution_id)`, both
    `WHERE execution_id IS NOT NULL` so the legacy NULL rows cost nothing.

    **What it locks:** `CREATE INDEX CONCURRENTLY` takes only a SHARE UPDATE EXCLUSIVE
    lock on the table: inserts, updates, deletes and reads keep going throughout; only
    other DDL, VACUUM and ANALYZE of that table wait. The build waits for transactions
    already writing to the table to finish; each wait is capped at `lock_timeout_ms`,
    retried with back-off, and when it gives up it names the session in the way and
    leaves no INVALID index behind. Safe to run while collection runs are writing.

    **Partitioned tables** (range, list, hash, multi-level, DEFAULT partition): the index
    is created `ON ONLY` the parent (INVALID until complete), then built concurrently on
    each partition and attached (`ALTER INDEX ... ATTACH PARTITION`); the parent's index
    is valid once the last one is attached, and PostgreSQL gives every partition created
    later the index itself. A partition's own equivalent index is attached, not rebuilt.
    Interrupted, the next run continues with the partitions not yet attached. The
    contract's names belong to the parent's indexes; each partition's is named
    `idx_<partition>_execution_id` / `idx_<partition>_collection_execution`.
    **Inheritance:** the parent's indexes, and the same on every child table (a child
    added later needs a rerun; the check names it). Views, foreign partitions and tables
    with rules are refused before any change. Progress is logged per partition; metadata
    `partitions` lists what was done on each.

    Rerunning changes nothing. An INVALID index left by a failed build of the very index
    is dropped (`DROP INDEX CONCURRENTLY`, after checking by OID that it is still that
    index and no session is still building it) and rebuilt; a same-named index of another
    definition or table, valid or INVALID, is an error that touches nothing; an
    equivalent index under another name is kept.
    Needs the table's owner role and CREATE on its schema (checked before anything is
    built; for the opt-in index, on `workflow_executions` too). Progress is logged every few seconds.
    """
    specs = chosen_indexes(target_db, config)
    layout = weeks_layout(target_db)
    refuse_before_building(target_db, context.run.job_name, specs, layout)
    if layout is not None and layout.is_tree:
        context.log.info(layout.describe())
    with exclusive_write(target_db, context.run.job_name):
        builds, wal_bytes = _build_all(target_db, specs, config, context.log)
    metadata = build_metadata(target_db, specs, builds, wal_bytes, layout)
    return dg.MaterializeResult(metadata=metadata)


def _build_all(
    db: TargetDatabase, specs: list[IndexSpec], config: IndexConfig, log: Log
) -> tuple[list[IndexBuild], int | None]:
    """(what was done for each of `specs`, the WAL bytes the builds wrote)."""
    for spec in specs:  # refuse before building any, so a conflict changes nothing
        refuse_conflicts(db, spec)
    lsn = wal_lsn(db)
    builds = [
        build_index(
            db,
            spec,
            log,
            retries=config.lock_retries,
            backoff_s=config.retry_backoff_s,
            progress_every_s=config.progress_every_s,
        )
        for spec in specs
    ]
    return builds, catalog.wal_bytes(lsn, wal_lsn(db))


@dg.asset_check(
    asset="execution_id_indexes",
    name="execution_id_indexes_valid",
    retry_policy=READ_RETRY,
)
def execution_id_indexes_valid(target_db: TargetDatabase) -> dg.AssetCheckResult:
    """Each recommended index exists, is valid and ready, on the right columns, with the
    predicate `execution_id IS NOT NULL` (an equivalent index under another name counts).
    On a partitioned table, every partition at every level has its index attached to the
    parent's; on an inheritance parent, every child table has the index too: a failure
    names each partition or child that falls short.
    Read-only: runs in `verify_execution_tracking` without building anything."""
    judged = weeks_table_problems(target_db)
    return dg.AssetCheckResult(
        passed=not judged.problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description=_check_description(target_db, judged),
        metadata=_check_metadata(target_db, judged),
    )


def _check_description(db: TargetDatabase, judged: WeeksIndexes) -> str:
    """The first five problems, or which indexes passed and where."""
    problems = judged.problems
    found = {i.name for i in judged.indexes}
    opt_in = [name for name in (CREATED_AT_INDEX, COMPLETED_AT_INDEX) if name in found]
    names = ", ".join([*contract_indexes(db), *opt_in])
    shown = problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else [])
    description = "; ".join(shown) or f"{names}: valid, ready, expected definition"
    if judged.tree and not problems:
        partitions = len(judged.layout.partitions)
        description += f", on every one of the {partitions} partitions or children"
    if judged.equivalents and not problems:
        equivalents = judged.equivalents.items()
        description += " (" + ", ".join(f"{k} is {v}" for k, v in equivalents) + ")"
    return description


def _check_metadata(db: TargetDatabase, judged: WeeksIndexes) -> dict[str, Any]:
    layout, tree = judged.layout, judged.tree
    on_weeks = [i for i in judged.indexes if i.table == db.weeks_table]
    on_members = [i for oid, found in tree.items() if oid != layout.root.oid for i in found]
    metadata: dict[str, Any] = {
        "problems": judged.problems,
        "problem_count": len(judged.problems),
        "equivalent": judged.equivalents,
        "index_bytes": sum(i.bytes for i in on_weeks + on_members),
    }
    if tree:
        metadata["partitions_checked"] = len(layout.partitions)
    return metadata


index_assets = [execution_id_indexes]
index_checks = [execution_id_indexes_valid]
