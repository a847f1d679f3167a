"""A primary and its streaming standby, started by a test on ports of their own.

Built with the server binaries of `pg_config --bindir` (PostgreSQL 15 on these
machines), run as the `postgres` OS user when the suite runs as root, and stopped by
their own pids; the data folders are removed afterwards. Skips where no such binaries
are installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

SETTINGS = (
    "listen_addresses = '127.0.0.1'\nfsync = off\nsynchronous_commit = off\n"
    "full_page_writes = off\nmax_wal_senders = 4\nhot_standby = on\nshared_buffers = 32MB\n"
)


@dataclass(frozen=True)
class Pair:
    primary: str  # URL of database `postgres` on each
    standby: str


def _bindir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(out.stdout.strip())
    return path if (path / "initdb").exists() and (path / "pg_basebackup").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _run(args: list[str]) -> None:
    env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8")
    subprocess.run(_as_postgres(args), check=True, capture_output=True, env=env, timeout=120)


def _url(port: int) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def _pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def streaming_pair() -> Iterator[Pair]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (pg_config --bindir) to start a standby")
    base = Path(tempfile.mkdtemp(prefix="rdw_standby_"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    primary, standby = base / "primary", base / "standby"
    ports = _free_port(), _free_port()
    try:
        _run([str(bindir / "initdb"), "-D", str(primary), "-U", "postgres", "--auth=trust"])
        with open(primary / "postgresql.conf", "a") as conf:
            conf.write(SETTINGS + f"unix_socket_directories = '{base}'\n")
        _run([str(bindir / "pg_ctl"), "-D", str(primary), "-w", "-l", str(base / "primary.log"),
              "-o", f"-p {ports[0]}", "start"])  # fmt: skip
        _run([str(bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(ports[0]),
              "-U", "postgres", "-D", str(standby), "-R", "-X", "stream"])  # fmt: skip
        _run([str(bindir / "pg_ctl"), "-D", str(standby), "-w", "-l", str(base / "standby.log"),
              "-o", f"-p {ports[1]}", "start"])  # fmt: skip
        yield Pair(_url(ports[0]), _url(ports[1]))
    finally:
        for data in (standby, primary):
            pid = _pid(data)
            if pid:
                with_signal(pid, signal.SIGQUIT)  # immediate shutdown
        shutil.rmtree(base, ignore_errors=True)


def with_signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def wait_for_replay(primary_url: str, standby_url: str, timeout_s: float = 30) -> None:
    """Until the standby has replayed everything the primary has written."""
    with psycopg.connect(primary_url, autocommit=True) as p:
        target = p.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(standby_url, autocommit=True) as s:
        while time.monotonic() < deadline:
            done = s.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target]).fetchone()[
                0
            ]
            if done:
                return
            time.sleep(0.1)
    raise AssertionError(f"the standby did not replay up to {target} in {timeout_s} s")
