"""The rollback trusts its backup and state tables only when they are its own.

A table pre-created under the expected name (where PUBLIC may create in the schema) could
run code as the rollback's role, swallow the backup of the rows it clears, or steer the
next run and the restore with forged rows. Each case is refused before any change.
"""

import datetime as dt
import logging

import dagster as dg
import psycopg
import pytest

from rdw_tracking.assets.restore import RestoreConfig, restore
from rdw_tracking.assets.rollback import RollbackConfig, rollback
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.rollback.backup import CREATE_BACKUP, CREATE_STATE
from rdw_tracking_tests.conftest import database_checksums

LOG = logging.getLogger("rdw_tracking_tests.trust")
CUTOFF = (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=30)).isoformat()
BACKUP = "public.execution_id_rollback_backup"
STATE = "public.execution_id_rollback_runs"


def create_own_tables(sql_exec) -> None:
    sql_exec(CREATE_BACKUP.format(backup=BACKUP))
    sql_exec(CREATE_STATE.format(state=STATE))


def refused(db: TargetDatabase, **config) -> str:
    with pytest.raises(dg.Failure) as err:
        rollback(db, RollbackConfig(cutoff_date=CUTOFF, dry_run=False, **config), LOG)
    return err.value.description


def test_a_trigger_that_swallows_the_backup_is_refused(db, database_url, sql_exec):
    create_own_tables(sql_exec)
    sql_exec(
        "CREATE FUNCTION swallow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$"
    )
    sql_exec(
        f"CREATE TRIGGER swallow BEFORE INSERT ON {BACKUP} FOR EACH ROW EXECUTE FUNCTION swallow()"
    )
    before = database_checksums(database_url)
    message = refused(db)
    assert BACKUP in message and "triggers (swallow)" in message
    assert "Nothing was changed" in message
    assert database_checksums(database_url) == before


def test_a_table_someone_else_created_is_refused(db, database_url, sql_exec, role_url):
    intruder = role_url("GRANT USAGE, CREATE ON SCHEMA public TO {role}")
    with psycopg.connect(intruder, autocommit=True) as conn:
        conn.execute(CREATE_BACKUP.format(backup=BACKUP))
    before = database_checksums(database_url)
    message = refused(db)
    assert "neither this role nor the weeks table's owner" in message
    assert database_checksums(database_url) == before


@pytest.mark.parametrize(
    "tamper, says",
    [
        (f"ALTER TABLE {STATE} ENABLE ROW LEVEL SECURITY", "row-level security"),
        (f"GRANT INSERT ON {STATE} TO PUBLIC", "PUBLIC may INSERT"),
        (
            f"ALTER TABLE {BACKUP} ADD COLUMN note text DEFAULT 'x'",
            "columns differ from the rollback's (note)",
        ),
        (
            f"ALTER TABLE {BACKUP} ALTER COLUMN updated_at TYPE timestamp",
            "columns differ from the rollback's (updated_at)",
        ),
        (
            f"CREATE RULE hide AS ON INSERT TO {BACKUP} DO INSTEAD NOTHING",
            "rules (hide)",
        ),
        (f"CREATE TABLE public.more_state () INHERITS ({STATE})", "parent or child tables"),
    ],
)
def test_tampered_tables_are_refused(db, database_url, sql_exec, tamper, says):
    create_own_tables(sql_exec)
    sql_exec(tamper)
    before = database_checksums(database_url)
    message = refused(db)
    assert says in message
    assert database_checksums(database_url) == before


def test_a_forged_state_row_with_a_future_bound_is_refused(db, database_url, sql_exec):
    create_own_tables(sql_exec)
    sql_exec(
        f"INSERT INTO {STATE} (rollback_id, schema_name, table_name, cutoff_date, upper_bound, "
        "matched_rows, phase) VALUES (gen_random_uuid(), 'public', 'report_data_weeks', %s, "
        "'2999-01-01', 1, 'walking')",
        [CUTOFF],
    )
    before = database_checksums(database_url)
    message = refused(db)
    assert "in the future" in message
    assert database_checksums(database_url) == before


def test_a_backup_from_before_partitions_gets_its_column_and_restores(db, sql_exec):
    # The backup table as earlier releases made it: no relid column.
    create_own_tables(sql_exec)
    sql_exec(f"ALTER TABLE {BACKUP} DROP COLUMN relid")
    original = sql_exec("SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM report_data_weeks t")
    report = rollback(db, RollbackConfig(cutoff_date=CUTOFF, dry_run=False), LOG)
    assert report.cleared_rows == report.matched_rows > 0
    restore(db, RestoreConfig(dry_run=False), LOG)
    assert (
        sql_exec("SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM report_data_weeks t")
        == original
    )
