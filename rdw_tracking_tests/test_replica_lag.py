"""The rollback and the restore wait for a lagging standby (issue 25): a real primary and
a streaming standby, started here as the `postgres` OS user on ports of their own, with
the binaries of `pg_config --bindir` (PostgreSQL 15 here) and with the embedded server's
(18); the standby's replay paused with pg_wal_replay_pause()."""

from __future__ import annotations

import logging
import threading
import time

import psycopg

from rdw_tracking.assets.restore import RestoreConfig
from rdw_tracking.assets.restore import restore as run_restore
from rdw_tracking.assets.rollback import RollbackConfig, rollback
from rdw_tracking.resources import TargetDatabase
from rdw_tracking_tests.assets.test_rollback import days_ago
from rdw_tracking_tests.standby import Cluster, caught_up

LOG = logging.getLogger("rdw_tracking_tests.replica_lag")
OS_USER = "postgres"


def lagging_standby(primary: Cluster, standby: Cluster, resume_after: float) -> threading.Thread:
    """Pause the standby's replay and write some WAL on the primary until the primary
    sees the standby more than 1.5 s behind; resume replay `resume_after` seconds after
    the pause, on a thread."""
    with psycopg.connect(standby.url(), autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    paused = time.monotonic()
    with psycopg.connect(primary.url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS wal_maker (n int)")
        deadline = time.monotonic() + 20
        while not conn.execute(
            "SELECT 1 FROM pg_stat_replication WHERE replay_lag > interval '1.5 s'"
        ).fetchone():
            assert time.monotonic() < deadline, "the standby never lagged"
            conn.execute("INSERT INTO wal_maker SELECT generate_series(1, 1000)")
            time.sleep(0.2)

    def resume() -> None:
        time.sleep(max(0.0, resume_after - (time.monotonic() - paused)))
        with psycopg.connect(standby.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    thread = threading.Thread(target=resume, daemon=True)
    thread.start()
    return thread


def test_rollback_and_restore_pause_while_a_standby_lags(primary_and_standby, caplog):
    primary, standby = primary_and_standby
    db = TargetDatabase(url=primary.url("rdw_replica"))
    with psycopg.connect(db.url) as conn:
        original = sorted(
            conn.execute("SELECT id, execution_id, updated_at FROM report_data_weeks").fetchall()
        )
    caught_up(primary)
    resumer = lagging_standby(primary, standby, 5.0)
    config = RollbackConfig(
        cutoff_date=days_ago(300), dry_run=False, batch_size=100, max_replica_lag_s=1
    )
    with caplog.at_level(logging.INFO):
        report = rollback(db, config, LOG)
    resumer.join()
    assert report.cleared_rows == report.matched_rows > 0
    meta = report.metadata()
    assert 1 <= meta["replica_paused_s"] <= 30, meta
    assert any("pausing, standby" in m and "max_replica_lag_s 1" in m for m in caplog.messages)
    assert any("the standbys caught up after" in m for m in caplog.messages)

    caught_up(primary)
    caplog.clear()
    resumer = lagging_standby(primary, standby, 5.0)
    with caplog.at_level(logging.INFO):
        back = run_restore(
            db, RestoreConfig(dry_run=False, batch_size=100, max_replica_lag_s=1), LOG
        )
    resumer.join()
    assert back.restored_rows == report.cleared_rows
    assert 1 <= back.metadata()["replica_paused_s"] <= 30
    with psycopg.connect(db.url) as conn:
        now = sorted(
            conn.execute("SELECT id, execution_id, updated_at FROM report_data_weeks").fetchall()
        )
    assert now == original


def test_max_replica_lag_s_0_never_pauses(primary_and_standby):
    primary, standby = primary_and_standby
    db = TargetDatabase(url=primary.url("rdw_replica"))
    caught_up(primary)
    resumer = lagging_standby(primary, standby, 3.0)
    config = RollbackConfig(
        cutoff_date=days_ago(20), dry_run=False, batch_size=100, max_replica_lag_s=0
    )
    report = rollback(db, config, LOG)
    assert report.metadata()["replica_paused_s"] == 0
    resumer.join()
    run_restore(db, RestoreConfig(dry_run=False, max_replica_lag_s=0), LOG)
