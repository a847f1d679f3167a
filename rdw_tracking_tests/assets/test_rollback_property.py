"""Property test of the rollback and the restore, on every layout, against a model.

For random rows (NULL and non-NULL ids, rows a second or a minute either side of the
cutoff's UTC midnight, rows dated in the future, rows already written after the run's
start), a random cutoff and batch size, a database whose own time zone is UTC or not,
and a crash inside a random batch followed by a rerun:

- rows outside the matched set never change;
- every matched row is cleared exactly once, and the backup holds its true old values;
- rollback + restore gives back the original table (id, execution_id, updated_at of
  every row, in the physical table it lives in).

Partitions and child tables repeat each other's ctids, so on these layouts a statement
that identified rows by ctid alone clears, and backs up, rows of other partitions.
`RDW_PROPERTY_EXAMPLES` sets the examples per layout and time zone (default 6).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from rdw_tracking.assets.restore import RestoreConfig, restore
from rdw_tracking.assets.rollback import RollbackConfig, rollback
from rdw_tracking.layout import table_layout
from rdw_tracking.resources import TargetDatabase
from rdw_tracking.rollback import walk as rollback_module

EXAMPLES = int(os.environ.get("RDW_PROPERTY_EXAMPLES", "6"))
LOG = logging.getLogger("rdw_tracking_tests.property")
NOW = dt.datetime.now(dt.timezone.utc)
TODAY = NOW.date()
STATUSES = ("completed", "failed", "pending")
# How far from the cutoff's midnight a row is created: mostly right at it.
NEAR = st.sampled_from([-86_400, -3_600, -60, -1, 0, 1, 60, 3_600, 86_400])
FAR = st.integers(min_value=-40 * 86_400, max_value=40 * 86_400)


class Crash(Exception):
    """The process dies inside a batch: its transaction never commits."""


@st.composite
def row_strategy(draw):
    return {
        "offset": draw(st.one_of(NEAR, FAR)),
        "tracked": draw(st.booleans()),
        "status": draw(st.sampled_from(STATUSES)),
        "leaf": draw(st.integers(min_value=0, max_value=2)),
        # a row a writer touched after the run started is not the run's to clear
        "touched_after_start": draw(st.integers(min_value=0, max_value=30)) == 0,
    }


CASES = st.fixed_dictionaries(
    {
        "rows": st.lists(row_strategy(), min_size=1, max_size=400),
        "cutoff_days": st.integers(min_value=0, max_value=35),
        "batch_size": st.integers(min_value=100, max_value=400),
        "crash_at": st.one_of(st.none(), st.integers(min_value=1, max_value=8)),
    }
)


def table_rows(conn: psycopg.Connection) -> dict:
    """(table the row lives in, id) -> (execution_id, updated_at, created_at)."""
    rows = conn.execute(
        "SELECT tableoid::regclass::text, id, execution_id, updated_at, created_at "
        "FROM report_data_weeks"
    ).fetchall()
    return {(t, i): (e, u, c) for t, i, e, u, c in rows}


def fill(conn: psycopg.Connection, case: dict, collection: uuid.UUID, leaves: list) -> None:
    """Empty the table (and any earlier backup), then insert the case's rows."""
    conn.execute("TRUNCATE report_data_weeks")
    conn.execute("DROP TABLE IF EXISTS execution_id_rollback_backup, execution_id_rollback_runs")
    midnight = dt.datetime.combine(
        TODAY - dt.timedelta(days=case["cutoff_days"]), dt.time(), tzinfo=dt.timezone.utc
    )
    inserts: dict[int, list] = {}
    for row in case["rows"]:
        created = min(midnight + dt.timedelta(seconds=row["offset"]), NOW + dt.timedelta(days=2))
        updated = NOW + dt.timedelta(days=1) if row["touched_after_start"] else created
        inserts.setdefault(row["leaf"] % len(leaves), []).append(
            (
                uuid.uuid4(),
                collection,
                created.date(),
                created.date() + dt.timedelta(days=6),
                row["status"],
                uuid.uuid4() if row["tracked"] else None,
                created,
                updated,
            )
        )
    for target, values in inserts.items():
        target = leaves[target]
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL(
                    "INSERT INTO {} (id, collection_id, week_start_date, week_end_date, status, "
                    "execution_id, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                ).format(target),
                values,
            )
    conn.execute("ANALYZE report_data_weeks")


def matched(before: dict, cutoff: dt.date, bound: dt.datetime) -> set:
    """The model: the spec's predicate, fixed at the run's start."""
    since = dt.datetime.combine(cutoff, dt.time(), tzinfo=dt.timezone.utc)
    return {
        key
        for key, (execution_id, updated_at, created_at) in before.items()
        if execution_id is not None
        and since <= created_at < bound
        and (updated_at is None or updated_at < bound)
    }


def crash_inside_batch(monkeypatch, at: int) -> None:
    """The `at`-th batch dies after its UPDATE, before it commits."""
    real = rollback_module.still_a_leaf
    calls = {"n": 0}

    def dying(conn, root_oid, leaf):
        calls["n"] += 1
        if calls["n"] == at:
            raise Crash(f"crash in batch {at}")
        return real(conn, root_oid, leaf)

    monkeypatch.setattr(rollback_module, "still_a_leaf", dying)


@pytest.mark.parametrize("time_zone", ["UTC", "Asia/Kolkata"])
def test_rollback_and_restore_are_exact_on_every_layout(
    layout, layout_url, time_zone, sql_exec, monkeypatch
):
    database = psycopg.conninfo.conninfo_to_dict(layout_url)["dbname"]
    sql_exec(
        sql.SQL("ALTER DATABASE {} SET timezone = {}").format(
            sql.Identifier(database), sql.Literal(time_zone)
        )
    )
    db = TargetDatabase(url=layout_url)
    with psycopg.connect(layout_url, autocommit=True) as conn:
        found = table_layout(conn, "public", "report_data_weeks")
        collection = conn.execute("SELECT id FROM report_data_collections LIMIT 1").fetchone()[0]
    # Rows go in through the parent (routed to their partition) or, for inheritance,
    # straight into the parent itself or one of its children.
    leaves = [m.ident for m in found.leaves] if found.kind == "inheritance" else [found.root.ident]
    cases = {"n": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(case=CASES)
    def check(case):
        cases["n"] += 1
        with psycopg.connect(layout_url, autocommit=True) as conn:
            fill(conn, case, collection, leaves)
            before = table_rows(conn)
        cutoff = TODAY - dt.timedelta(days=case["cutoff_days"])
        config = RollbackConfig(
            cutoff_date=cutoff.isoformat(), dry_run=False, batch_size=case["batch_size"]
        )
        with monkeypatch.context() as patch:
            if case["crash_at"]:
                crash_inside_batch(patch, case["crash_at"])
            try:
                report = rollback(db, config, LOG)
            except Crash:
                report = None
        if report is None:  # the rerun continues the same rollback
            report = rollback(db, config, LOG)
            assert report.resumed
        expected = matched(before, cutoff, report.upper_bound)
        assert report.matched_rows == len(expected)
        assert report.cleared_rows == len(expected)

        with psycopg.connect(layout_url, autocommit=True) as conn:
            after = table_rows(conn)
            backup = (
                conn.execute(
                    "SELECT relid::regclass::text, id, execution_id, updated_at "
                    "FROM execution_id_rollback_backup WHERE rollback_id = %s",
                    [report.rollback_id],
                ).fetchall()
                if report.rollback_id
                else []
            )
        assert after.keys() == before.keys()
        for key, (execution_id, updated_at, _) in after.items():
            if key in expected:
                assert execution_id is None, f"matched row {key} kept its execution_id"
                assert updated_at >= report.upper_bound
            else:
                assert (execution_id, updated_at) == before[key][:2], f"row {key} changed"
        # each matched row backed up once, with its true old values
        assert len(backup) == len(expected)
        assert {(t, i): (e, u) for t, i, e, u in backup} == {
            key: before[key][:2] for key in expected
        }

        if report.rollback_id:
            restored = restore(
                db, RestoreConfig(rollback_id=report.rollback_id, dry_run=False), LOG
            )
            assert restored.restored_rows == len(expected)
        with psycopg.connect(layout_url, autocommit=True) as conn:
            assert table_rows(conn) == before

    check()
    assert cases["n"] >= min(EXAMPLES, 1)
