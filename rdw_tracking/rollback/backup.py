"""The backup and state tables: their columns, creating them, and trusting a table found
under their names.

A table found under the expected name is used only if its columns are exactly the ones
the rollback creates, it belongs to the running role (or the weeks table's owner) and it
carries nothing that runs code or hides rows: no trigger, rule, row-level security, child
or parent table, and no write right for PUBLIC. Else a BEFORE INSERT trigger could drop
the backup of rows the rollback clears, or a forged state or backup row steer the next
run or the restore.
"""

from dataclasses import dataclass
from typing import NamedTuple

import psycopg
from psycopg import errors, sql
from psycopg.rows import class_row, namedtuple_row

from rdw_tracking.errors import refuse
from rdw_tracking.resources import TargetDatabase

DEFAULT_BACKUP_TABLE = "execution_id_rollback_backup"
DEFAULT_STATE_TABLE = "execution_id_rollback_runs"


@dataclass(frozen=True)
class BackupTables:
    """Where a rollback keeps its backup and its state: one schema, two table names."""

    schema: str
    backup_name: str
    state_name: str

    @property
    def backup(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.backup_name)

    @property
    def state(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.state_name)

    def label(self, name: str) -> str:
        return f"{self.schema}.{name}"


class Column(NamedTuple):
    """A column as the catalog shows it: the shape a trusted table's columns must have."""

    type: str
    not_null: bool
    default: str | None
    identity: str  # 'a' for GENERATED ALWAYS AS IDENTITY, else ''


TIMESTAMPTZ = "timestamp with time zone"
BACKUP_COLUMNS = {
    "seq": Column("bigint", True, None, "a"),
    "rollback_id": Column("uuid", True, None, ""),
    "id": Column("uuid", True, None, ""),
    "execution_id": Column("uuid", True, None, ""),
    "updated_at": Column(TIMESTAMPTZ, False, None, ""),
    "cleared_at": Column(TIMESTAMPTZ, True, None, ""),
    # the physical table (partition, child) the row was cleared in; NULL in backups
    # written before rdw_tracking knew partitions
    "relid": Column("oid", False, None, ""),
}
STATE_COLUMNS = {
    "rollback_id": Column("uuid", True, None, ""),
    "schema_name": Column("text", True, None, ""),
    "table_name": Column("text", True, None, ""),
    "cutoff_date": Column("date", True, None, ""),
    "upper_bound": Column(TIMESTAMPTZ, True, None, ""),
    "matched_rows": Column("bigint", True, None, ""),
    "phase": Column("text", True, None, ""),
    "next_block": Column("bigint", True, "0", ""),
    "cleared_rows": Column("bigint", True, "0", ""),
    "batches": Column("integer", True, "0", ""),
    "started_at": Column(TIMESTAMPTZ, True, "now()", ""),
    "finished_at": Column(TIMESTAMPTZ, False, None, ""),
    "restored_at": Column(TIMESTAMPTZ, False, None, ""),
    "restored_rows": Column("bigint", True, "0", ""),
}

# cleared_at is the updated_at the rollback wrote. The only index is on an ascending seq:
# cheap to append to, and the restore's walking order.
CREATE_BACKUP = """
CREATE TABLE IF NOT EXISTS {backup} (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rollback_id uuid NOT NULL,
    id uuid NOT NULL,
    execution_id uuid NOT NULL,
    updated_at timestamptz,
    cleared_at timestamptz NOT NULL,
    relid oid)
"""
CREATE_BACKUP_INDEX = "CREATE INDEX IF NOT EXISTS {name} ON {backup} (rollback_id, seq)"
# phase: walking (ctid batches, leaf by leaf) -> sweeping (rows the walk missed) ->
# finished; restored once restore_execution_id has put the values back.
CREATE_STATE = """
CREATE TABLE IF NOT EXISTS {state} (
    rollback_id uuid PRIMARY KEY,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    cutoff_date date NOT NULL,
    upper_bound timestamptz NOT NULL,
    matched_rows bigint NOT NULL,
    phase text NOT NULL,
    next_block bigint NOT NULL DEFAULT 0,
    cleared_rows bigint NOT NULL DEFAULT 0,
    batches integer NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    restored_at timestamptz,
    restored_rows bigint NOT NULL DEFAULT 0)
"""


@dataclass(frozen=True)
class Trust:
    """What the catalog says of a table found under a backup or state table's name."""

    relkind: str
    owner: str
    trusted_owner: bool
    rls: bool
    triggers: list[str]
    rules: list[str]
    inherits: bool
    public_writes: list[str]

    def faults(self) -> list[str]:
        """What makes the table untrustworthy, in words; empty when nothing does."""
        wrong = []
        if self.relkind != "r":
            wrong.append("it is not an ordinary table")
        if not self.trusted_owner:
            wrong.append(
                f"it belongs to {self.owner}, neither this role nor the weeks table's owner"
            )
        if self.rls:
            wrong.append("it has row-level security")
        if self.triggers:
            wrong.append(f"it has triggers ({', '.join(self.triggers)})")
        if self.rules:
            wrong.append(f"it has rules ({', '.join(self.rules)})")
        if self.inherits:
            wrong.append("it has parent or child tables")
        if self.public_writes:
            wrong.append(f"PUBLIC may {', '.join(self.public_writes)} it")
        return wrong


_TRUST = """
SELECT c.relkind::text AS relkind, pg_get_userbyid(c.relowner) AS owner,
       c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)
         OR c.relowner = (SELECT relowner FROM pg_class WHERE oid = to_regclass(%(weeks)s))
         AS trusted_owner,
       c.relrowsecurity OR c.relforcerowsecurity AS rls,
       ARRAY(SELECT tgname::text FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal
             ORDER BY 1) AS triggers,
       ARRAY(SELECT rulename::text FROM pg_rewrite
             WHERE ev_class = c.oid AND rulename <> '_RETURN' ORDER BY 1) AS rules,
       EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = c.oid OR inhrelid = c.oid)
         AS inherits,
       ARRAY(SELECT p FROM unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) AS p
             WHERE has_table_privilege('public', c.oid, p)) AS public_writes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(name)s
"""


def trust_of(
    conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables, name: str
) -> Trust | None:
    """The catalog's word on table `name` of the backup schema; None if there is none."""
    with conn.cursor(row_factory=class_row(Trust)) as cur:
        return cur.execute(
            _TRUST, {"schema": tables.schema, "name": name, "weeks": db.weeks.as_string(conn)}
        ).fetchone()


def columns_of(conn: psycopg.Connection, schema: str, name: str) -> dict[str, Column]:
    statement = """
        SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,
               a.attnotnull AS not_null, pg_get_expr(d.adbin, d.adrelid) AS default,
               a.attidentity::text AS identity
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
        """
    with conn.cursor(row_factory=namedtuple_row) as by_name:
        rows = by_name.execute(statement, [schema, name]).fetchall()
    return {row.name: Column(row.type, row.not_null, row.default, row.identity) for row in rows}


def column_faults(found: dict[str, Column], want: dict[str, Column]) -> list[str]:
    """The columns of `found` that differ from `want`, in words; empty when none does."""
    if found == want:
        return []
    differing = sorted(set(found) ^ set(want) | {c for c in found if found[c] != want.get(c)})
    return [f"its columns differ from the rollback's ({', '.join(differing)})"]


def trusted_table(
    conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables, name: str, expected: dict
) -> bool:
    """Whether `name` exists; refuses, naming what is wrong, a table not to be trusted."""
    trust = trust_of(conn, db, tables, name)
    if trust is None:
        return False
    label = tables.label(name)
    found = columns_of(conn, tables.schema, name)
    legacy = name == tables.backup_name and "relid" not in found
    want = {k: v for k, v in expected.items() if not (legacy and k == "relid")}
    wrong = trust.faults() + column_faults(found, want)
    if wrong:
        raise refuse(
            f"{label} exists but is not a table rdw_tracking can trust with a rollback's "
            f"backup: {'; '.join(wrong)}. Nothing was changed. Drop or rename it, or set "
            "backup_schema, backup_table or state_table to names of their own (in a schema "
            "where PUBLIC cannot create tables)"
        )
    if legacy:
        add_relid(conn, tables, trust.owner)
    return True


def add_relid(conn: psycopg.Connection, tables: BackupTables, owner: str) -> None:
    """Give a backup table from before partitions were known its leaf column."""
    label = tables.label(tables.backup_name)
    try:
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN relid oid").format(tables.backup))
    except errors.InsufficientPrivilege:
        raise refuse(
            f"{label} predates partition support and needs a column relid oid; run "
            f"ALTER TABLE {label} ADD COLUMN relid oid as its owner {owner}"
        ) from None


def tables_present(conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables) -> bool:
    """Whether both tables exist; refuses when one exists but cannot be trusted."""
    backup = trusted_table(conn, db, tables, tables.backup_name, BACKUP_COLUMNS)
    state = trusted_table(conn, db, tables, tables.state_name, STATE_COLUMNS)
    return backup and state


def create_tables(conn: psycopg.Connection, db: TargetDatabase, tables: BackupTables) -> None:
    # CREATE ... IF NOT EXISTS still needs CREATE on the schema: a role granted only
    # INSERT on tables its owner made must not get that far.
    if tables_present(conn, db, tables):
        return
    exists = conn.execute(
        "SELECT 1 FROM pg_namespace WHERE nspname = %s", [tables.schema]
    ).fetchone()
    try:
        if not exists:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(tables.schema)))
        conn.execute(sql.SQL(CREATE_BACKUP).format(backup=tables.backup))
        conn.execute(
            sql.SQL(CREATE_BACKUP_INDEX).format(
                name=sql.Identifier(f"{tables.backup_name[:50]}_rollback_seq"),
                backup=tables.backup,
            )
        )
        conn.execute(sql.SQL(CREATE_STATE).format(state=tables.state))
    except errors.InsufficientPrivilege:
        raise refuse(
            f"cannot create the backup tables {tables.label(tables.backup_name)} and "
            f"{tables.label(tables.state_name)}: permission denied; create them as their "
            "owner or set backup_schema to a schema this user may create tables in"
        ) from None


def analyze_backup(conn: psycopg.Connection, tables: BackupTables, log) -> None:
    """Give the backup table fresh statistics: created empty by the rollback, it is not
    yet analyzed when the restore plans its batches over it, and the planner then took
    it for a few rows. ANALYZE takes no lock that writers or readers wait for."""
    try:
        conn.execute(sql.SQL("ANALYZE {}").format(tables.backup))
    except errors.InsufficientPrivilege:
        log.info(
            f"{tables.label(tables.backup_name)} could not be analyzed by this role (its "
            "owner, or MAINTAIN on it, may); the batches are planned without its statistics"
        )
