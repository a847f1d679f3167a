"""What a run checks before it changes anything: the table's layout, and the rights it
needs on the table, its partitions and children, and the backup and state tables."""

from rdw_tracking import catalog
from rdw_tracking.errors import refuse
from rdw_tracking.layout import Layout, table_layout
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.rollback import RESTORE_JOB, ROLLBACK_JOB
from rdw_tracking.rollback.backup import BackupTables
from rdw_tracking.rollback.progress import Log
from rdw_tracking.writes import Need, missing_grants, refuse_without_grants, weeks_need

# UPDATE on just these columns is enough for the rollback and the restore.
CLEARED_COLUMNS = ("execution_id", "updated_at")


def backup_needs(
    tables: BackupTables,
    backup_rights: tuple[str, ...],
    state_rights: tuple[str, ...],
    create: bool,
) -> list[Need]:
    """What a job needs on the backup and state tables (or, `create`: on their schema)."""
    field = (
        "backup_schema (create that schema first, or leave backup_schema unset)"
        if create
        else "backup_schema, backup_table and state_table: they name the rollback's "
        "backup, which a real rollback creates"
    )
    return [
        Need(
            tables.schema, tables.backup_name, backup_rights, create_if_missing=create, field=field
        ),
        Need(tables.schema, tables.state_name, state_rights, create_if_missing=create, field=field),
    ]


def leaf_needs(layout: Layout, *rights: str) -> list[Need]:
    """The batches change each partition or child directly (a ctid means something only
    inside its own table), and PostgreSQL checks a table's own grants when it is named:
    the rights granted on the parent must be granted on each of them too."""
    return [
        Need(
            leaf.schema,
            leaf.name,
            rights,
            CLEARED_COLUMNS if "UPDATE" in rights else (),
            field=f"the grants on {layout.label}'s partitions and child tables",
        )
        for leaf in layout.leaves
        if leaf.oid != layout.root.oid
    ]


def rollback_needs(db: TargetDatabase, tables: BackupTables, layout: Layout) -> list[Need]:
    """A real rollback's rights: change the table, write the backup (or create it)."""
    return [
        weeks_need(db, "SELECT", "UPDATE", update_columns=CLEARED_COLUMNS),
        *leaf_needs(layout, "SELECT", "UPDATE"),
        *backup_needs(tables, ("SELECT", "INSERT"), ("SELECT", "INSERT", "UPDATE"), create=True),
    ]


def restore_needs(db: TargetDatabase, tables: BackupTables) -> list[Need]:
    """A real restore's rights: change the table back, read the backup, mark the state."""
    return [
        weeks_need(db, "SELECT", "UPDATE", update_columns=CLEARED_COLUMNS),
        *backup_needs(tables, ("SELECT",), ("SELECT", "UPDATE"), create=False),
    ]


def layout_or_refuse(db: TargetDatabase, job: str) -> Layout:
    """The weeks table's layout; refuses a view, a foreign table or rules before any change."""
    with db.cursor() as cur:
        layout = table_layout(cur, db.schema_name, db.weeks_table)
    if layout is None:
        raise refuse(
            f"table {db.qualified(db.weeks_table)} does not exist; check "
            "target_db.schema_name and target_db.weeks_table"
        )
    refusal = layout.refusal(job)
    if refusal:
        raise refuse(refusal)
    return layout


def row_security_refusal(
    db: TargetDatabase, layout: Layout, job: str, visible_rows_only: bool, log: Log
) -> None:
    """Refuse (or, with `visible_rows_only`, warn) when row-level security decides which
    rows of the table, or of any partition or child, the running role sees or changes.

    Under a policy the matched set, the batches and the sweep all see only the rows it
    lets through: a rollback then cleared the visible rows, left the hidden ones and
    reported success; a policy without UPDATE rights made every sweep miss, and one WITH
    CHECK failed the batch with PostgreSQL's own error. So a run refuses up front, dry
    run too (its count would be the visible rows' only)."""
    with db.cursor() as cur:
        found = catalog.row_security(cur, [m.oid for m in layout.members])
    if not found:
        return
    role = found[0].role
    where = ", ".join(
        f"{rls.table} (policy {', policy '.join(rls.policies)})"
        if rls.policies
        else f"{rls.table} (no policy for this role, so it sees no row there)"
        for rls in found
    )
    verb = "clear" if job == ROLLBACK_JOB else "restore"
    if visible_rows_only:
        log.warning(
            f"row-level security applies to role {role} on {where}: as visible_rows_only "
            f"asks, {job} will {verb} only the rows those policies let it see and update; "
            "the others keep their values"
        )
        return
    raise refuse(
        f"{job} refused: row-level security applies to role {role} on {where}, so the run "
        f"would {verb} only the rows those policies let it see and update and leave the "
        "others as they are; nothing was changed. Run it as a role with BYPASSRLS (or the "
        "table's owner, without FORCE ROW LEVEL SECURITY), or set visible_rows_only: true "
        f"to {verb} only the visible rows",
        row_security=where,
    )


def update_triggers(db: TargetDatabase, layout: Layout, job: str, log: Log) -> list[str]:
    """The BEFORE UPDATE row triggers on the table, its partitions and children, as
    `name on table`; a warning says what they make the restore unable to give back.

    Every batch of the rollback and the restore is an UPDATE: such a trigger fires on
    each row and writes what it writes (typically updated_at = now()) after the batch
    has set its values, so the rollback's updated_at and the restored updated_at are
    the trigger's, not the backup's."""
    with db.cursor() as cur:
        found = catalog.before_update_triggers(cur, [m.oid for m in layout.members])
    if not found:
        return []
    by_name: dict[str, list[str]] = {}
    for trigger in found:
        of = f" (UPDATE OF {', '.join(trigger.columns)})" if trigger.columns else ""
        by_name.setdefault(trigger.name + of, []).append(trigger.table)
    named = [
        f"{name} on {tables[0]}" if len(tables) == 1 else f"{name} on {len(tables)} tables"
        for name, tables in by_name.items()
    ]
    log.warning(
        f"{layout.label} has BEFORE UPDATE triggers ({'; '.join(named)}) that fire on every "
        f"row {job} updates: the restore gives back execution_id exactly, but not the "
        "columns those triggers set (updated_at, typically), which keep the value the "
        "trigger wrote at the restore"
    )
    return named


def check_rollback(
    db: TargetDatabase,
    tables: BackupTables,
    dry_run: bool,
    log: Log,
    visible_rows_only: bool = False,
) -> Layout:
    """The table's layout, once a rollback may read it; a real run is refused without
    every right it needs, a dry run warns what a real one would be refused."""
    # Before anything else: a refusal for want of a grant must leave nothing half done.
    refuse_without_grants(db, ROLLBACK_JOB, [weeks_need(db, "SELECT")])
    layout = layout_or_refuse(db, ROLLBACK_JOB)
    row_security_refusal(db, layout, ROLLBACK_JOB, visible_rows_only, log)
    needs = rollback_needs(db, tables, layout)
    if dry_run:
        role, missing = missing_grants(db, needs)
        if missing:
            log.warning(f"a real run as role {role} would be refused: " + "; ".join(missing))
    else:
        refuse_without_grants(db, ROLLBACK_JOB, needs)
    if layout.is_tree:
        log.info(f"{layout.describe()}: the run clears one physical table at a time")
    return layout


def check_restore(
    db: TargetDatabase,
    tables: BackupTables,
    dry_run: bool,
    log: Log,
    visible_rows_only: bool = False,
) -> Layout:
    """Refuse a restore without the rights it needs (a dry run needs only to read), on a
    table laid out as no write job may change, or under row-level security."""
    reads = [
        weeks_need(db, "SELECT"),
        *backup_needs(tables, ("SELECT",), ("SELECT",), create=False),
    ]
    refuse_without_grants(db, RESTORE_JOB, reads if dry_run else restore_needs(db, tables))
    layout = layout_or_refuse(db, RESTORE_JOB)
    row_security_refusal(db, layout, RESTORE_JOB, visible_rows_only, log)
    return layout
